"""Training entry points: thin, they parse arguments, call `mmft` and print.

torchao, when installed, is imported by transformers' quantizers and registers enums that torch
2.14 logs a deprecation warning about ("KernelPreference ... register_constant"), twice, on every
command: not ours to fix and no news to a user, so that one logger is quieted for these commands.
"""

import logging

logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
