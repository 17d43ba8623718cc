"""mmft: teach a language model to see, the LLaVA way (see README.md)."""

import logging
import warnings


class _NoKernelsHint(logging.Filter):
    """bitsandbytes, which peft imports, logs on every CPU with avx512_bf16 that its CPU 4-bit kernel wants
    the `kernels` package. mmft never runs 4-bit on a CPU (int8 there, NF4 on CUDA only): on every command
    that hint is noise. Only that record is dropped; the logger's other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHint())

# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` each time it wraps a model: a FutureWarning
# on every start of the app about code that is not mmft's and that no user can act on. That one message only.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
