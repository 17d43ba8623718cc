"""CPU quantization of the LM under its LoRA adapters, and the CPU path the app picks.

Decode on a CPU is memory-bound: every token reads every weight once. int8 weights read 4x fewer
bytes than fp32 (2x fewer than bf16), and fbgemm's u8 x s8 kernels also prefill faster than fp32
or bf16 GEMMs on CPUs without AMX (docs/benchmarks.md, "CPU path"). So CPU inference quantizes the
LM's linears to int8 (per output channel; activations quantized per call, to 8 bits where the kernel
cannot saturate, else 7: `activation_bits`) and keeps everything else, LoRA included, in the model's
float dtype:

- `Int8Linear` *is* an `nn.Linear` (a subclass), so PEFT wraps it like any linear: adapters can be
  attached, loaded as named adapters (several rounds on one base) and disabled after quantization,
  and `disable_adapter()` gives exactly the quantized base.
- It takes and returns any float dtype (fp32, bf16, fp16): the int8 kernel runs in fp32 inside, so
  `quantize="int8"` works with every `dtype` choice.
- `load_int8_lm` (what `build_model` uses) reads the checkpoint tensor by tensor, without a memory
  map, and quantizes each linear as soon as it is read: the peak stays near the int8 model plus one
  float tensor. `quantize_int8_` converts a model already in memory, one decoder layer at a time.

The kernels are torch's own (`torch.ops.quantized.linear_dynamic`, fbgemm on x86), no extra
dependency; the `torch.ao.quantization` *Python* API around them is deprecated, the ops are not
used through it.
"""

from __future__ import annotations

import functools
import gc
import os
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

INT8_SKIP = ("lora_",)  # never quantize an adapter: it must stay float, trainable and switchable


class Int8Linear(nn.Linear):
    """y = x @ W^T + b with W int8 per output channel (symmetric), x quantized per call.

    The weight lives only in fbgemm's packed form, so the module holds one int8 copy; `weight` is a
    value-less stand-in for PEFT (device, dtype, shape), `unpack()` gives the values.
    """

    def __init__(self, linear: nn.Linear, reduce_range: bool | None = None):
        self._init(linear.weight, linear.bias, reduce_range)

    @classmethod
    def from_tensors(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, reduce_range: bool | None = None):
        """From a float weight [out, in] (and bias [out]) read straight from a checkpoint: no nn.Linear."""
        q = cls.__new__(cls)
        q._init(weight, bias, reduce_range)
        return q

    def _init(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool | None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        self.out_features, self.in_features = weight.shape
        qweight = quantize_rows(weight.detach())
        bias = None if bias is None else bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self._bias = bias  # [out] fp32 (tiny), so that reading it never unpacks
        # 7-bit activations where 8 would saturate the kernel (None: `activation_bits()` decides)
        self.reduce_range = activation_bits() == 7 if reduce_range is None else reduce_range

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the weight's shape, dtype (qint8) and device, and no values (one element,
        expanded). PEFT reads `weight` several times for each adapter it attaches, for device and
        dtype only, and unpacking fbgemm's packed form costs ~0.6 s for one Phi-3.5 gate_up_proj:
        minutes per round loaded. Quantized, it fails loudly in float math. The values: `unpack()`."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one = torch._empty_affine_quantized([1], scale=1.0, zero_point=0, dtype=torch.qint8)
        return one.expand(self.out_features, self.in_features)  # [out, in], no memory

    @property
    def bias(self) -> torch.Tensor | None:
        return self._bias

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The int8 weight (qint8 [out, in], per-channel scales) and the fp32 bias, unpacked (slow)."""
        return torch.ops.quantized.linear_unpack(self._packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.float().reshape(-1, self.in_features)  # [N, in]: the kernel wants 2-D at least (1-D: one row)
        y = torch.ops.quantized.linear_dynamic(rows, self._packed, self.reduce_range)  # [N, out] fp32
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)  # [..., out]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


@functools.cache
def activation_bits() -> int:
    """8 where fbgemm's int8 kernel on this CPU adds u8 x s8 products in int32 (AVX-512 VNNI), else 7.

    Without VNNI fbgemm adds pairs of products in int16 (`vpmaddubsw`), which saturates once
    activations use all 8 bits (255 x 127 x 2 > 32767); torch's own dynamic Linear therefore always
    quantizes them to 7. With VNNI nothing saturates, and 8 bits cut the error by about 40 % at the same speed
    (docs/benchmarks.md, section 5). Probed on the kernel itself, not read off CPU flags: fbgemm
    picks its kernel at run time (`FBGEMM_ENABLE_INSTRUCTIONS` can hold it to AVX2), and has none for
    AVX-VNNI (Intel's desktop chips since Alder Lake get its AVX2 kernel, so 7)."""
    return probe_activation_bits(lambda w: torch.ops.quantized.linear_prepack(quantize_rows(w), None))


def probe_activation_bits(pack) -> int:
    """8 where the int8 kernel that `pack` (float weight [out, in] -> packed weight) packs for adds 8-bit
    activations without saturating, else 7: one product that saturates int16 if the kernel adds in it."""
    ones = torch.ones(1, 64, dtype=torch.float32, device="cpu")  # [1, in]: activations 255, weights 127:
    # every product pair saturates int16 (the kernel takes float32 only, whatever the default dtype)
    y = torch.ops.quantized.linear_dynamic(ones, pack(ones), False)  # [1, 1]: 64 exactly, or ~32 saturated
    return 8 if abs(float(y) - 64.0) < 1.0 else 7


ROWS_PER_CHUNK = 2048  # rows converted to fp32 at a time: lm_head (32064 x 3072) in fp32 alone is 394 MB


def quantize_rows(weight: torch.Tensor) -> torch.Tensor:
    """Float weight [out, in] -> qint8 per output channel (symmetric), a chunk of rows at a time.

    Each row's scale and values depend on that row only, so chunking gives exactly what one
    `quantize_per_channel` over the whole fp32 copy gives, without ever holding that copy."""
    out = weight.shape[0]
    values = torch.empty(weight.shape, dtype=torch.int8)  # [out, in]
    scales = torch.empty(out, dtype=torch.double)
    zeros = torch.zeros(out, dtype=torch.long)
    with warnings.catch_warnings():  # torch's quantized tensors are deprecated: docs/benchmarks.md
        warnings.simplefilter("ignore")
        for start in range(0, out, ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            w = weight[rows].float()  # [chunk, in]
            # per_channel_symmetric as torch's per-channel observer computes it: max|w| / 127.5
            # (max(max, -min) is max|w| exactly, without a second [chunk, in] temporary)
            scale = (torch.maximum(w.amax(dim=1), w.amin(dim=1).neg()) / 127.5).clamp(min=1e-8).double()
            values[rows] = torch.quantize_per_channel(w, scale, zeros[rows], 0, torch.qint8).int_repr()
            scales[rows] = scale
        return torch._make_per_channel_quantized_tensor(values, scales, zeros, 0)


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
    else:  # wrapped by an adapter: its base layer
        count += quantize_module_int8_(base.lm_head)
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


def int8_target_names(base) -> set[str]:
    """What int8 converts in a causal LM without adapters: the decoder layers' plain linears and lm_head."""
    names = {f"model.layers.{i}.{name}" for i, layer in enumerate(base.model.layers) for name in _int8_targets(layer)}
    if type(base.lm_head) is nn.Linear:
        names.add("lm_head")
    return names


# -- int8 straight from the checkpoint ---------------------------------------------------------------
# Buffers old checkpoints still carry; transformers drops them on load too.
IGNORED_CHECKPOINT_KEYS = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")


def load_int8_lm(model_id: str | os.PathLike, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """The causal LM at `model_id` (a folder or a Hub id at `revision`) with its linears int8 as they are read.

    Why not `from_pretrained` then `quantize_int8_`: transformers maps the whole float checkpoint and
    touches every page before anything can be quantized, and mapped file pages count in RSS until they
    are unmapped (Phi-3.5: 13 GB peak for 3.8 GB of int8; docs/benchmarks.md, section 5). Here the model
    is built without weights and filled one tensor at a time by plain reads (`pread`, no mapping); each
    linear becomes an `Int8Linear` as soon as its weight is read and the float copy is dropped, so the
    peak is the int8 model plus one float tensor. The result equals `from_pretrained(dtype="auto")` then
    `quantize_int8_(lm, dtype)`: same int8 weights and scales, buffers, config (tests/test_quantize.py).
    Reads safetensors checkpoints (one file or sharded); a missing, unexpected or misshapen tensor is an
    error that names it, never a random weight.
    """
    from accelerate import init_empty_weights
    from huggingface_hub import is_offline_mode
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils.hub import resolve_revision

    model_id = str(model_id)
    offline = is_offline_mode()
    revision = resolve_revision(model_id, revision, local_files_only=offline)  # one commit for every file
    hub = dict(revision=revision, local_files_only=offline)
    config = AutoConfig.from_pretrained(model_id, **hub)
    files = checkpoint_files(model_id, **hub)
    load_dtype = _auto_dtype(config, files)  # what from_pretrained(dtype="auto") loads in
    config.name_or_path = model_id
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary) computed for real
        lm = AutoModelForCausalLM.from_config(config, dtype=load_dtype)

    targets = int8_target_names(lm)
    tied = lm.get_expanded_tied_weights_keys(all_submodels=True)  # {"lm_head.weight": "model.embed_tokens.weight"}
    ignored = re.compile("|".join([*IGNORED_CHECKPOINT_KEYS, *(lm._keys_to_ignore_on_load_unexpected or ())]))
    pending: dict[str, dict[str, torch.Tensor]] = {}  # a linear whose bias or weight is still to come
    seen: set[str] = set()

    def put(key: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = key.rpartition(".")
        if module_name in targets:
            parts = pending.setdefault(module_name, {})
            parts[attr] = tensor
            linear = lm.get_submodule(module_name)
            if set(parts) == {n for n, p in linear._parameters.items() if p is not None}:
                parent, _, child = module_name.rpartition(".")
                setattr(lm.get_submodule(parent), child, Int8Linear.from_tensors(parts["weight"], parts.get("bias")))
                del pending[module_name]
        else:
            lm.get_submodule(module_name).register_parameter(attr, nn.Parameter(tensor.to(dtype)))

    for file in files:
        with safe_open(file, framework="pt", device="cpu", backend="pread") as f:
            for key in f.offset_keys():  # in file order: sequential reads
                if key in tied or ignored.search(key):
                    continue  # a tied copy (transformers ties over it) or a stale buffer
                expected = _expected_param(lm, key)
                shape = list(f.get_slice(key).get_shape())
                if expected is None or key in seen:
                    why = "appears twice" if key in seen else f"is not a parameter of {type(lm).__name__}"
                    raise ValueError(f"{model_id}: checkpoint tensor {key!r} {why}: a checkpoint for another model?")
                if shape != list(expected.shape):
                    raise ValueError(f"{model_id}: checkpoint tensor {key!r} has shape {shape}, the model's config "
                                     f"expects {list(expected.shape)}: the checkpoint and config.json disagree")
                seen.add(key)
                tensor = f.get_tensor(key).to(load_dtype)
                put(key, tensor)
                for target, source in tied.items():
                    if source == key:
                        put(target, tensor)
                del tensor
    unset = [n for n, b in lm.named_buffers() if b.is_meta]
    if unset:  # buffers are computed by the modules themselves, never read: a transformers change?
        raise RuntimeError(f"{model_id}: buffers {unset[:5]} were not initialised; load with quantize='none'")
    missing = [*(f"{m}.{a}" for m, parts in pending.items() for a in parts),
               *(n for n, p in lm.named_parameters() if p.is_meta)]
    if missing:
        raise ValueError(f"{model_id}: the checkpoint has no tensor {', '.join(sorted(missing)[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}: an incomplete download or another model?")
    lm.config.dtype = dtype
    lm.eval()
    lm.adjust_generation_fn(None, True, None, model_id, cache_dir=None, force_download=False, proxies=None,
                            token=None, subfolder="", trust_remote_code=None, **hub)  # as from_pretrained
    gc.collect()
    return lm


def _expected_param(lm, key: str) -> torch.Tensor | None:
    """The (meta) parameter a checkpoint key fills, or None if the model has none by that name."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = lm.get_submodule(module_name)
    except AttributeError:
        return None
    if isinstance(module, Int8Linear):  # already read
        return None
    param = module._parameters.get(attr)
    return param if param is not None and param.is_meta else None


def checkpoint_files(model_id: str, **hub) -> list[str]:
    """The safetensors files of a model folder or Hub repo, resolved (and cached) as transformers does."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file
    from transformers.utils.hub import get_checkpoint_shard_files

    single = cached_file(model_id, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub)
    if single is not None:
        return [single]
    index = cached_file(model_id, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **hub)
    if index is not None:
        return get_checkpoint_shard_files(model_id, index, **hub)[0]
    raise FileNotFoundError(f"{model_id} (revision {hub.get('revision') or 'main'}) has no {SAFE_WEIGHTS_NAME} or "
                            f"{SAFE_WEIGHTS_INDEX_NAME}: the int8 load reads safetensors only (or use quantize='none')")


def _auto_dtype(config, files: list[str]) -> torch.dtype:
    """from_pretrained's dtype="auto": config.json's dtype, else the checkpoint's first float tensor's."""
    from safetensors import safe_open

    if config.dtype is not None:
        return getattr(torch, config.dtype) if isinstance(config.dtype, str) else config.dtype
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    with safe_open(files[0], framework="pt", backend="pread") as f:
        for key in f.keys():
            if f.get_slice(key).get_dtype() in names:
                return names[f.get_slice(key).get_dtype()]
    return torch.get_default_dtype()


# -- the CPU path --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CPUPath:
    """What CPU inference uses when nothing is asked for: a quantization mode, the dtype of everything
    around it (None: `mmft.loading.pick_dtype`), and why."""

    quantize: str
    dtype: torch.dtype | None
    why: str


def cpu_has_amx() -> bool:
    """AMX tiles present and usable (Sapphire Rapids and later Xeons). torch's own probe (cpuinfo, as
    inductor uses it), not oneDNN's "bf16 supported", which is True on any AVX-512 core because oneDNN
    emulates bf16 there (docs/benchmarks.md, 'CPU path')."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe and probe())
    except RuntimeError:
        return False


CPU_INFERENCE = CPUPath(
    quantize="int8",
    dtype=torch.float32,
    why="int8 weights with float32 around them: on a CPU without AMX as fast to decode as bf16 around them "
        "(Cascade Lake, Zen 4) and faster to prefill where bf16 is emulated; the only path that fits 16 GB "
        "with rounds loaded (docs/benchmarks.md, 'CPU path')",
)
CPU_INFERENCE_AMX = CPUPath(
    quantize="int8",
    dtype=torch.bfloat16,
    why="int8 weights with bf16 around them: on a CPU with AMX, faster to decode and prefill than float32 "
        "around them and faster to decode than llama.cpp's Q4_K_M in the same run (docs/benchmarks.md)",
)


def pick_cpu_path(trainable: bool = False) -> CPUPath:
    """int8 for inference everywhere on CPU, bf16 around it where the CPU has AMX, float32 elsewhere;
    training on CPU stays unquantized (gradients must flow through the base linears, to LoRA or to
    the projector, and the int8 kernel has no backward)."""
    if trainable:
        return CPUPath("none", None, "CPU training: float weights")
    return CPU_INFERENCE_AMX if cpu_has_amx() else CPU_INFERENCE
