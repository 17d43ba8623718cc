"""Loading, shared by training, the app and the Hub: device, dtype, quantization, rounds.

CUDA -> 4-bit NF4 with bf16 compute (QLoRA); CPU inference -> int8 linears under the adapters with
bf16 around them where the CPU has AMX, float32 elsewhere (`mmft.quantize.pick_cpu_path`), CPU
training -> none; otherwise the dtype is bf16 only where the CPU reports bf16 (else fp32). Every
choice can be overridden.
No `trust_remote_code`: Phi-3 and CLIP are native to transformers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmft.config import DTYPE_NAMES, QUANTIZE_MODES, MMFTConfig, load_config, model_key
from mmft.model import MultimodalModel
from mmft.projector import Projector, load_projector
from mmft.quantize import load_int8_lm, pick_cpu_path
from mmft.round import ADAPTER_DIR, COMMIT_RE, PROJECTOR_NAME, check_round_folder
from mmft.vision import VisionEncoder

DTYPES = {name: getattr(torch, dtype) for name, dtype in DTYPE_NAMES.items()}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a float dtype, one of {sorted(DTYPES)}, got {dtype!r}")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def resolve_quantize(quantize: str | None, device: torch.device, inference: bool = False) -> str:
    """One spelling everywhere: "nf4" (4-bit, QLoRA), "int8" (int8 linears, CPU inference), "none".
    None = the device's default: NF4 on CUDA; on CPU `pick_cpu_path`: int8 for inference (`load_round`),
    nothing for any training, projector-only included (int8 has no backward; NF4 is 40x slower than
    fp32 on CPU: docs/benchmarks.md); nothing on mps."""
    if quantize is None:
        if device.type == "cuda":
            return "nf4"
        if device.type == "cpu":
            return pick_cpu_path(trainable=not inference).quantize
        return "none"  # mps and other accelerators: neither bitsandbytes nor the int8 CPU kernels run there
    if not isinstance(quantize, str) or quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES} or None (the device's default), got {quantize!r}")
    return quantize


def load_tokenizer(cfg: MMFTConfig):
    tokenizer = AutoTokenizer.from_pretrained(cfg.lm_model_id, revision=cfg.lm_revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_lm(cfg: MMFTConfig, device: torch.device, dtype: torch.dtype, quantize: str | None = None):
    """The base LM and its tokenizer; 4-bit NF4 by default on CUDA only. int8 ("int8") is read straight
    into int8 linears (`mmft.quantize.load_int8_lm`: the float checkpoint is never held whole)."""
    mode = resolve_quantize(quantize, device)
    tokenizer = load_tokenizer(cfg)
    if mode == "int8":
        return load_int8_lm(cfg.lm_model_id, cfg.lm_revision, dtype), tokenizer
    quantize = mode == "nf4"
    kwargs = dict(revision=cfg.lm_revision, dtype=dtype)
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    lm = AutoModelForCausalLM.from_pretrained(cfg.lm_model_id, **kwargs)
    if not quantize:
        lm.to(device)
    return lm, tokenizer


def load_vision(cfg: MMFTConfig, device: torch.device, dtype: torch.dtype) -> VisionEncoder:
    return VisionEncoder.from_config(cfg, dtype).to(device)


def lora_config(cfg: MMFTConfig) -> LoraConfig:
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")


def projector_for(cfg: MMFTConfig, feature_dim: int, lm_dim: int) -> tuple[MMFTConfig, Projector]:
    """Check the projector dims against the actual models; a new config with them filled in (the
    caller's config is never changed) and a fresh projector of that shape (random until loaded)."""
    for name, actual in (("mp_input_dim", feature_dim), ("mp_output_dim", lm_dim)):
        stored = getattr(cfg, name)
        if stored is not None and stored != actual:
            raise ValueError(f"config {name}={stored} but the models give {actual}: wrong CLIP/LM or feature mode?")
    cfg = replace(cfg, mp_input_dim=feature_dim, mp_output_dim=lm_dim, mp_hidden_dim=cfg.mp_hidden_dim or lm_dim)
    return cfg, Projector(cfg.mp_input_dim, cfg.mp_output_dim, cfg.mp_hidden_dim, cfg.mp_depth)


def _assemble(cfg, lm, feature_dim) -> tuple[MMFTConfig, Projector]:
    weight = lm.get_input_embeddings().weight  # [V, D_lm]
    cfg, projector = projector_for(cfg, feature_dim, weight.shape[1])
    return cfg, projector.to(weight.device)


def build_model(cfg: MMFTConfig, device=None, dtype=None, quantize=None, with_vision: bool = True,
                feature_dim: int | None = None, adapter: str | Path | None = None,
                trainable: bool = False) -> MultimodalModel:
    """Base LM (+ new LoRA, or the adapter at `adapter`) + CLIP + projector (random until loaded).

    `quantize`: "nf4", "int8", "none" or None (the device's default). `cfg` is not changed: the
    model carries a copy with the projector sizes filled in (`model.cfg`)."""
    device = pick_device(device)
    mode = resolve_quantize(quantize, device)
    if dtype is None and mode == "int8":  # the measured CPU path: bf16 (AMX) or float32 around int8
        dtype = pick_cpu_path().dtype
    dtype = pick_dtype(device, dtype)
    if mode == "int8" and (trainable or device.type != "cpu"):
        raise ValueError("int8 dynamic quantization is for CPU inference; train with quantize='nf4' (CUDA) or 'none'")
    # CLIP first: its load briefly holds the fp32 checkpoint and the cast copy (~0.9 GB for ViT-B/32),
    # better before the LM is in memory than on top of it (docs/benchmarks.md, section 5)
    vision = load_vision(cfg, device, dtype) if with_vision else None
    lm, tokenizer = load_lm(cfg, device, dtype, mode)
    if vision is not None:
        feature_dim = vision.feature_dim
    if feature_dim is None:
        raise ValueError("feature_dim is needed when the model is built without its vision encoder")
    cfg, projector = _assemble(cfg, lm, feature_dim)
    if trainable and getattr(lm, "is_quantized", False):
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)  # the Trainer enables it
    if adapter is not None:
        try:
            lm = PeftModel.from_pretrained(lm, str(adapter), is_trainable=trainable)
        except SafetensorError as err:  # not an OSError/ValueError: callers' one-line handlers missed it
            raise ValueError(f"{adapter}/adapter_model.safetensors is not a readable safetensors file: {err}") from err
    elif trainable:
        lm = get_peft_model(lm, lora_config(cfg))
    return MultimodalModel(cfg, lm, tokenizer, projector, vision)


def pin_revisions(cfg: MMFTConfig) -> MMFTConfig:
    """Record the Hub commit of the base LM and CLIP, so a round says exactly which weights it was trained
    on: none given, or a branch or tag (which can move), becomes the commit it points to now; a commit id
    is kept. Local folders have no commit: their revision stays as given, and their path becomes absolute
    (a round reads "./x" relative to its own folder, `round_config`; any other relative path only works
    from the directory training ran in)."""
    local = {key: model_key(getattr(cfg, key)) for key in ("lm_model_id", "vit_model_id")}
    return replace(cfg, lm_revision=pin_revision(cfg.lm_model_id, cfg.lm_revision),
                   vit_revision=pin_revision(cfg.vit_model_id, cfg.vit_revision), **local)


def check_model_id(model_id: str, what: str = "") -> None:
    """A folder that is there or a Hub repo id; a mistyped "/data/models/lm" otherwise reaches the Hub
    client, whose "Repo id must be in the form…" points elsewhere."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(model_id).exists():
        return
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise OSError(f"{what}{model_id!r} is neither a model folder on disk nor a Hub repo id (OWNER/NAME)") from None


def pin_revision(model_id: str, revision: str | None) -> str | None:
    """The commit `revision` of `model_id` points to now (kept if it is one; a local folder's stays as given)."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    if Path(model_id).exists() or (revision and COMMIT_RE.fullmatch(revision)):
        return revision
    check_model_id(model_id)
    # the Hub cache keeps files under snapshots/<commit>/: the commit of what will be loaded
    return extract_commit_hash(cached_file(model_id, "config.json", revision=revision), None)


def round_config(folder: str | Path) -> tuple[MMFTConfig, dict]:
    """A round folder's config with "./x" or "../x" model ids made absolute: they are relative to the
    round folder (the bundled demo round uses them)."""
    folder = Path(folder)
    cfg, round_info = load_config(folder)
    for key in ("lm_model_id", "vit_model_id"):
        if getattr(cfg, key).startswith("."):
            setattr(cfg, key, str((folder / getattr(cfg, key)).resolve()))
    return cfg, round_info


def load_round(folder: str | Path, device=None, dtype=None, quantize=None, trainable: bool = False,
               with_vision: bool = True, **config_overrides) -> tuple[MultimodalModel, dict]:
    """A trained round folder -> (model, round info). The folder's config.json names the base models."""
    folder = check_round_folder(folder)
    cfg, round_info = round_config(folder)
    cfg = replace(cfg, **config_overrides)
    for key in ("lm_model_id", "vit_model_id") if with_vision else ("lm_model_id",):
        check_model_id(getattr(cfg, key), f"{folder / 'config.json'} names {key} ")
    if quantize is None and not trainable:  # inference: the CPU path of mmft.quantize (int8)
        quantize = resolve_quantize(None, pick_device(device), inference=True)
    model = build_model(cfg, device, dtype, quantize, with_vision=with_vision, feature_dim=cfg.mp_input_dim,
                        adapter=folder / ADAPTER_DIR, trainable=trainable)
    load_projector(model.projector, folder / PROJECTOR_NAME)
    model.projector.requires_grad_(trainable)
    if not trainable:
        model.eval()
    return model, round_info
