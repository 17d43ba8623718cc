"""CPU quantization of the LM under its LoRA adapters, and the CPU path the app picks.

Decode on a CPU is memory-bound: every token reads every weight once. int8 weights read 4x fewer
bytes than fp32 (2x fewer than bf16), and fbgemm's u8 x s8 kernels also prefill faster than fp32
or bf16 GEMMs on CPUs without AMX (docs/benchmarks.md, "CPU path"). So CPU inference quantizes the
LM's linears to int8 (per output channel, activations quantized per call) and keeps everything
else, LoRA included, in the model's float dtype:

- `Int8Linear` *is* an `nn.Linear` (a subclass), so PEFT wraps it like any linear: adapters can be
  attached, loaded as named adapters (several rounds on one base) and disabled after quantization,
  and `disable_adapter()` gives exactly the quantized base.
- It takes and returns any float dtype (fp32, bf16, fp16): the int8 kernel runs in fp32 inside, so
  `quantize="int8"` works with every `dtype` choice.
- Layers are converted one decoder layer at a time and each float copy is freed at once, so the
  peak stays near one quantized model plus one float layer.

The kernels are torch's own (`torch.ops.quantized.linear_dynamic`, fbgemm on x86), no extra
dependency; the `torch.ao.quantization` *Python* API around them is deprecated, the ops are not
used through it.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass

import torch
from torch import nn

INT8_SKIP = ("lora_",)  # never quantize an adapter: it must stay float, trainable and switchable


class Int8Linear(nn.Linear):
    """y = x @ W^T + b with W int8 per output channel (symmetric), x quantized per call.

    The weight lives only in fbgemm's packed form; `weight` unpacks it on demand (PEFT reads it
    for device and dtype when it attaches an adapter), so the module holds one int8 copy.
    """

    def __init__(self, linear: nn.Linear, reduce_range: bool = True):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # [out, in]
        # per_channel_symmetric as torch's per-channel observer computes it: max|w| / 127.5
        scale = (w.abs().amax(dim=1) / 127.5).clamp(min=1e-8).double()
        with warnings.catch_warnings():  # torch's quantized tensors are deprecated: docs/benchmarks.md
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        # fbgemm's x86 kernels saturate int16 intermediates without VNNI: 7-bit activations avoid
        # it (torch's own dynamic Linear always passes True; the error is measured in the bench).
        self.reduce_range = reduce_range

    @property
    def weight(self) -> torch.Tensor:
        return torch.ops.quantized.linear_unpack(self._packed)[0]  # qint8 [out, in]

    @property
    def bias(self) -> torch.Tensor | None:
        return torch.ops.quantized.linear_unpack(self._packed)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.float(), self._packed, self.reduce_range)  # [..., out] fp32
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _int8_targets(module: nn.Module) -> dict[str, nn.Linear]:
    """Plain float linears under `module`: LoRA's base layers and lm_head, never LoRA itself."""
    return {name: m for name, m in module.named_modules()
            if type(m) is nn.Linear and not any(s in name for s in INT8_SKIP)}


def quantize_module_int8_(module: nn.Module) -> int:
    """Swap every plain float linear under `module` (never the root) for an `Int8Linear`."""
    names = list(_int8_targets(module))
    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = module.get_submodule(parent) if parent else module
        setattr(holder, attr, Int8Linear(getattr(holder, attr)))
    gc.collect()  # replaced linears can sit in reference cycles: free their float weights now
    return len(names)


def quantize_int8_(lm, dtype: torch.dtype | None = None) -> int:
    """int8 on the LM's linears, in place, layer by layer: works before or after adapters are
    attached (PEFT wraps an `Int8Linear` like any linear). `dtype`: cast what stays float in the base
    (embeddings, norms) to it; adapters keep PEFT's dtype. Returns how many linears were converted."""
    from peft import PeftModel

    base = lm.get_base_model() if isinstance(lm, PeftModel) else lm
    count = sum(quantize_module_int8_(layer) for layer in base.model.layers)
    if type(base.lm_head) is nn.Linear:
        base.lm_head = Int8Linear(base.lm_head)
        gc.collect()
        count += 1
    # What stays float is copied, cast to `dtype`: a checkpoint loaded as a memory map (safetensors)
    # stays mapped, all of it, while any tensor still views it; copying releases the map, and the
    # pages of the float weights just replaced (docs/benchmarks.md, section 5: 1.89 -> 1.44 GB at 2 layers).
    for name, module in base.named_modules():
        if not any(s in name for s in INT8_SKIP):
            for p in module.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(dtype or p.dtype, copy=True)
    if dtype is not None:
        base.config.dtype = dtype
    gc.collect()
    return count


def int8_linears(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, Int8Linear)]


# -- the CPU path --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CPUPath:
    """What CPU inference uses when nothing is asked for: a quantization mode and why."""

    quantize: str
    why: str


CPU_INFERENCE = CPUPath(
    quantize="int8",
    why="int8 weights: fastest decode and prefill on CPUs with and without native bf16, and the only "
        "path that fits 16 GB with rounds loaded (docs/benchmarks.md, 'CPU path')",
)


def pick_cpu_path(trainable: bool = False) -> CPUPath:
    """int8 for inference everywhere on CPU; training on CPU stays unquantized (gradients must flow
    through the base linears, to LoRA or to the projector, and the int8 kernel has no backward)."""
    if trainable:
        return CPUPath("none", "CPU training: float weights")
    return CPU_INFERENCE
