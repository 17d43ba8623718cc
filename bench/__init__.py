"""Benchmarks: `python -m bench.<name>`; each prints a table and one JSON line last (docs/benchmarks.md).

Each script builds its flags in `build_parser()` and parses them before importing torch, so `--help`, an
unknown flag and a count that is not a positive whole number (`POSITIVE`) answer at once (other values are
checked in `main`); what the flags name lives here, light, for the same reason.
"""

from mmft.config import whole_number

POSITIVE = whole_number(1)  # the argparse type of every count: threads, layers, tokens, steps, repeats...

PRECISIONS = ("fp32", "bf16", "int8", "nf4")
GGUF_TYPES = ("Q4_K_M", "Q8_0")
VOCAB_GGUF = "/work/shared/phi3-tokenizer/ggml-vocab-phi-3.gguf"
