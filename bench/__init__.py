"""Benchmarks: `python -m bench.<name>`; each prints a table and one JSON line last (docs/benchmarks.md).

Each script builds its flags in `build_parser()` and parses them before importing torch, so `--help` and
an unknown flag answer at once (values are checked later, in `main`); what the flags name lives here,
light, for the same reason.
"""

PRECISIONS = ("fp32", "bf16", "int8", "nf4")
GGUF_TYPES = ("Q4_K_M", "Q8_0")
VOCAB_GGUF = "/work/shared/phi3-tokenizer/ggml-vocab-phi-3.gguf"
