"""mmft: teach a language model to see, the LLaVA way (see README.md)."""

import logging


class _NoKernelsHint(logging.Filter):
    """bitsandbytes, which peft imports, logs on every CPU with avx512_bf16 that its CPU 4-bit kernel wants
    the `kernels` package. mmft never runs 4-bit on a CPU (int8 there, NF4 on CUDA only): on every command
    that hint is noise. Only that record is dropped; the logger's other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHint())
