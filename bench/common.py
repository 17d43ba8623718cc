"""Shared by the benchmarks: the machine, memory guards, models (tiny or real-size), timing, output.

Real-size models are Phi-3.5-mini's architecture with random weights, built without the Hub:
config -> model on the meta device -> `to_empty` -> a fast uniform fill, one decoder layer at a
time, so a precision conversion (int8, NF4) never holds the whole model in fp32. Speed does not
depend on the values; they are scaled so that 32 layers stay finite (greedy decoding of NaNs would
still run, but it would not be a fair test of anything).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import resource
import time
from pathlib import Path

import psutil
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, Phi3Config, Phi3ForCausalLM
from transformers.generation.streamers import BaseStreamer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from bench import PRECISIONS  # the flags name them: defined where --help can read them without torch
from mmft.config import MMFTConfig
from mmft.model import MultimodalModel
from mmft.projector import Projector
from mmft.quantize import quantize_module_int8_
from mmft.vision import VisionEncoder

GB = 1e9
QUESTION = "What is the man in the picture doing, and what is next to him on the street?"


# -- the machine --------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _probe(name: str) -> bool | None:
    """One of torch's private CPU-feature probes (torch.cpu._is_*): None where this torch lacks it."""
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe else None
    except RuntimeError:
        return None


def machine() -> dict:
    import transformers

    from mmft.loading import cpu_has_bf16
    from mmft.quantize import activation_bits, cpu_has_amx

    return dict(
        cpu=cpu_model(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
        # oneDNN's "bf16" is True on any AVX-512 core (emulated); the two probes say what is native
        cpu_onednn_bf16=cpu_has_bf16(), cpu_avx512_bf16=_probe("_is_avx512_bf16_supported"),
        cpu_amx=cpu_has_amx(), int8_activation_bits=activation_bits(),
        ram_gb=round(psutil.virtual_memory().total / GB, 1),
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        date=datetime.datetime.now().isoformat(timespec="seconds"), load_avg=load_avg(),
    )


def set_threads(n: int | None) -> int:
    """Intra-op threads. On a shared 2-core machine 1 thread can beat 2: every parallel op waits at a
    barrier for a thread the other jobs may have descheduled (see docs/benchmarks.md)."""
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def available_gb() -> float:
    return psutil.virtual_memory().available / GB


def need_memory(gb: float, what: str) -> None:
    """Refuse, with a message that says what to do, rather than push the machine out of memory."""
    free = available_gb()
    if free < gb:
        raise SystemExit(
            f"not enough free memory for {what}: needs about {gb:.1f} GB, {free:.1f} GB available. "
            "Wait for other jobs to finish, or use fewer layers (--layers N) or a smaller precision."
        )


def peak_rss_gb() -> float:
    """This process's peak resident set size. Linux: VmHWM, the peak of this process's own memory
    map; ru_maxrss would also carry the parent's peak across fork + exec (a worker started after
    the parent's 1 GiB bandwidth probe would report at least that)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def rss_gb() -> float:
    return psutil.Process().memory_info().rss / GB


# -- output ---------------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def emit(result: dict) -> None:
    """The one JSON line every benchmark prints last."""
    print(json.dumps(result, default=str), flush=True)


# -- bandwidth --------------------------------------------------------------------------------------
def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Read bandwidth (GB/s): the best of several streaming reads over a buffer far larger than L3."""
    import numpy as np

    n = int(gib * 2**30) // 4
    x = torch.ones(n)  # fp32
    matrix = x.view(4096, -1)
    vector = torch.ones(matrix.shape[1])
    array = x.numpy()
    probes = {"torch.sum": lambda: x.sum(), "torch.mv": lambda: torch.mv(matrix, vector),
              "numpy.sum": lambda: array.sum()}
    result = {}
    for name, fn in probes.items():
        fn()
        best = min(_timed(fn) for _ in range(repeats))
        result[name] = round(n * 4 / best / GB, 2)
    del x, matrix, vector, array
    return {"read_gb_s": max(result.values()), "probes_gb_s": result, "buffer_gib": gib}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- real-size models -------------------------------------------------------------------------------
def phi35_config(layers: int = 32) -> Phi3Config:
    """Phi-3.5-mini-instruct's shapes (3.8 B parameters at 32 layers)."""
    return Phi3Config(hidden_size=3072, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=8192, vocab_size=32064,
                      max_position_embeddings=4096, pad_token_id=32000, eos_token_id=32000, bos_token_id=1)


def small_phi3_config() -> Phi3Config:
    """Phi-3 at toy size, for the benchmarks' --tiny runs (shapes a 4-bit block size divides)."""
    return Phi3Config(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=512, vocab_size=2048, max_position_embeddings=512,
                      pad_token_id=0, eos_token_id=2, bos_token_id=1)


def lm_param_count(config: Phi3Config) -> dict:
    d, f, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    per_layer_linear = d * 3 * d + d * d + d * 2 * f + f * d  # qkv, o, gate_up, down
    return dict(layer_linear=per_layer_linear * n, lm_head=v * d, embed=v * d, norms=(2 * n + 1) * d)


def _fill_(module: nn.Module, generator: torch.Generator, scale: float = 1.0) -> None:
    """Uniform weights scaled by fan-in (finite through 32 layers); norm weights 1."""
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 1:
                p.fill_(1.0) if "weight" in name else p.zero_()
            elif isinstance(module, nn.Embedding):
                p.uniform_(-0.05, 0.05, generator=generator)
            else:
                bound = scale / p.shape[-1] ** 0.5
                p.uniform_(-bound, bound, generator=generator)


def _materialize(module: nn.Module, dtype: torch.dtype, generator: torch.Generator) -> None:
    module.to_empty(device="cpu")
    module.to(dtype)
    for name, sub in module.named_modules():
        # A trained LoRA moves the output a little: B small, not zero (zero would be the identity).
        _fill_(sub, generator, scale=0.05 if "lora_B" in name else 1.0)


def _quantizable(module: nn.Module) -> dict[str, nn.Linear]:
    """The linears a precision converts: LoRA's base layers (never LoRA itself), or every linear."""
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    if any("lora_A" in n for n in linears):
        return {n: m for n, m in linears.items() if n.endswith("base_layer")}
    return linears


def _quantize_nf4(module: nn.Module) -> None:
    """Linears -> bitsandbytes Linear4bit (NF4, double quant, bf16 compute), as `load_lm` asks for."""
    import bitsandbytes as bnb

    for name, child in _quantizable(module).items():
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data, requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, q.to("cpu"))  # .to() quantizes


def build_real_lm(layers: int = 32, precision: str = "fp32", seed: int = 0, lora=None, config=None):
    """Phi-3.5-mini-shaped LM with random weights in `precision` (fp32, bf16, int8, nf4).

    `lora` (a peft LoraConfig) wraps the model before any weight exists, so int8 / nf4 convert the
    LoRA base layers only, as an app would quantize after attaching the adapter. int8 and nf4 are
    converted one decoder layer at a time (fp32 -> quantized): the peak is one layer in fp32 plus the
    quantized model. nf4 keeps lm_head in fp32 (transformers' bitsandbytes integration never
    quantizes the output layer); int8 quantizes it too. `config` replaces the Phi-3.5 shapes (tests).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    config = config or phi35_config(layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        lm = Phi3ForCausalLM(config)
        if lora is not None:
            from peft import get_peft_model

            lm = get_peft_model(lm, lora)
    base = lm.get_base_model() if lora is not None else lm
    store = torch.bfloat16 if precision == "bf16" else torch.float32
    convert = {"int8": quantize_module_int8_, "nf4": _quantize_nf4}.get(precision)  # int8: the app's own
    _materialize(base.model.embed_tokens, store, generator)
    _materialize(base.model.norm, store, generator)
    for layer in base.model.layers:
        _materialize(layer, store, generator)
        if convert:
            convert(layer)
            gc.collect()  # the replaced fp32 modules sit in reference cycles: free them now, not later
    _materialize(base.lm_head, store, generator)
    if precision == "int8":
        from mmft.quantize import Int8Linear

        base.lm_head = Int8Linear(base.lm_head)
    base.model.rotary_emb = Phi3RotaryEmbedding(config=config)  # its buffers were on meta
    base.config.dtype = store
    base.generation_config.pad_token_id = config.pad_token_id
    lm.eval()
    return lm


def build_real_vision(mode: str = "patch", seed: int = 0) -> VisionEncoder:
    """A ViT-B/32-sized CLIP (224 px, 32 px patches: 49 x 768 patch tokens without CLS, 1 x 512 pooled), random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig())  # defaults are ViT-B/32's shapes
    clip.text_model = None  # never used: the vision tower and its projection are all we keep
    for module in (clip.vision_model, clip.visual_projection):
        _materialize(module, torch.float32, generator)
    # Position ids are a buffer; on meta they were never written.
    emb = clip.vision_model.embeddings
    emb.position_ids = torch.arange(emb.num_positions).unsqueeze(0)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return VisionEncoder(clip, processor, mode, 50_000_000)


def real_size_model(tokenizer, layers: int = 32, precision: str = "fp32", mode: str = "patch",
                    adapter: bool = True, seed: int = 0) -> MultimodalModel:
    """The app's model at real size: CLIP -> projector -> Phi-3.5-shaped LM (+ LoRA), random weights.

    The tokenizer is the tiny kit's (Phi-3.5's special tokens and chat template); the LM's vocab is
    the real 32064, so generated ids above the tokenizer's range are timed, never decoded.
    """
    from mmft.loading import lora_config

    cfg = MMFTConfig(lm_model_id="random:phi-3.5-mini", vit_model_id="random:clip-vit-base-patch32",
                     vit_feature_mode=mode, gen_max_new_tokens=64)
    vision = build_real_vision(mode, seed)
    lm = build_real_lm(layers, precision, seed, lora=lora_config(cfg) if adapter else None)
    cfg.mp_input_dim, cfg.mp_output_dim = vision.feature_dim, 3072
    cfg.mp_hidden_dim = 3072
    torch.manual_seed(seed)
    projector = Projector(cfg.mp_input_dim, cfg.mp_output_dim, cfg.mp_hidden_dim, cfg.mp_depth)
    if precision == "bf16":
        projector.to(torch.bfloat16)
    return MultimodalModel(cfg, lm, tokenizer, projector, vision).eval()


def _randomise_lora(lm) -> None:
    """LoRA B starts at zero; non-zero B makes the adapter change the output, as a trained one does."""
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.uniform_(-0.01, 0.01)


def bytes_per_token(lm, config: Phi3Config, kv_tokens: int, kv_bytes: int = 4) -> int:
    """Bytes a decode step must read: every linear weight (as stored) + one embedding row + the KV cache."""
    from mmft.quantize import Int8Linear

    total = 0
    for module in lm.modules():
        if isinstance(module, Int8Linear):
            w = module.unpack()[0]  # int8, per output channel: a scale and a zero point each
            total += w.numel()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += w.q_per_channel_scales().numel() * 4 * 2  # as fbgemm keeps them (fp32 + int32)
        elif isinstance(module, nn.Linear):
            w = module.weight
            total += w.numel() * w.element_size() if w.dtype != torch.uint8 else w.numel()
            state = getattr(w, "quant_state", None)
            if state is not None:
                total += _nf4_stats_bytes(state)
    total += config.hidden_size * kv_bytes  # one embedding row
    total += 2 * config.num_hidden_layers * config.hidden_size * kv_tokens * kv_bytes
    return int(total)


def _nf4_stats_bytes(state) -> int:
    absmax = state.absmax
    n = absmax.numel() * absmax.element_size()
    if getattr(state, "state2", None) is not None:
        n += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return n


# -- tiny models --------------------------------------------------------------------------------------
def tiny_model(folder: str | Path, mode: str = "patch", adapter: bool = True) -> MultimodalModel:
    """The tiny kit through the real loading code (`build_model`), fp32 on CPU, LoRA non-zero."""
    from mmft.loading import build_model
    from mmft.testing import build_tiny_models

    cfg = build_tiny_models(folder, mode=mode, gen_max_new_tokens=64)
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu", dtype=torch.float32, trainable=adapter)
    if adapter:
        _randomise_lora(model.lm)
        model.lm.eval()
    return model.eval()


def image_batch(model: MultimodalModel, question: str = QUESTION, seed: int = 0) -> dict:
    """One image prompt (image slots + question), as the pipeline builds it: ids, masks, pixels."""
    import numpy as np
    from PIL import Image

    from mmft.data import pad_batch
    from mmft.prompt import encode_chat

    encoded = encode_chat(model.tokenizer, model.cfg, [("user", question)],
                          num_image_tokens=model.vision.num_tokens)
    batch = pad_batch([vars(encoded)], model.tokenizer.pad_token_id, padding_side="left")
    batch.pop("labels")
    pixels = np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    batch["pixel_values"] = model.vision.preprocess([Image.fromarray(pixels)])
    return batch


class TokenTimer(BaseStreamer):
    """A streamer that records when each new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.start)
        self.tokens += value.reshape(-1).tolist()

    def end(self):
        pass


def rates(times: list[float], n_tokens: int, total: float) -> dict:
    """Time to first token, tokens/s over all tokens, and decode tokens/s (after the first)."""
    ttft = times[0] if times else total
    decode = (n_tokens - 1) / (total - ttft) if n_tokens > 1 and total > ttft else None
    return dict(ttft_s=round(ttft, 3), total_s=round(total, 3), tokens=n_tokens,
                tokens_per_s=round(n_tokens / total, 4), decode_tokens_per_s=None if decode is None else round(decode, 4))
