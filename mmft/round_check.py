"""Is a folder a round whose tensors fit its config.json? Names, shapes, dtypes and values, read from
the safetensors files alone (the LM is never loaded), so `push_to_hub.py` refuses a broken round before
any request and `pull_round` before anything is served.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import SafetensorError

from mmft.config import MMFTConfig, load_config
from mmft.round import ADAPTER_DIR, PROJECTOR_NAME, check_round_folder


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file  # torch: only when a round is checked (bf16 has no numpy dtype)

    try:
        tensors = load_file(str(path))
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if not tensors:
        raise ValueError(f"{path} is not a readable safetensors file: it holds no tensors")
    ints = sorted(f"{name} ({t.dtype})" for name, t in tensors.items() if not t.is_floating_point())
    if ints:  # loading would cast them to float silently: weights that were never trained
        raise ValueError(f"{path} holds non-float tensors: {', '.join(ints[:3])}{' ...' if len(ints) > 3 else ''}; "
                         "a round's weights are floating point")
    bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all())
    if bad:
        raise ValueError(f"{path} holds NaN or Inf values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}: "
                         "the training run diverged or the file is damaged; publish a good checkpoint")
    return {name: tuple(t.shape) for name, t in tensors.items()}


def _check_projector(path: Path, cfg: MMFTConfig) -> None:
    """Names and shapes against mp_depth and the mp_* dims (Linear -> GELU -> Linear ..., LLaVA names)."""
    shapes = _tensors(path)
    dims = [cfg.mp_input_dim] + [cfg.mp_hidden_dim] * (cfg.mp_depth - 1) + [cfg.mp_output_dim]
    expected = {}
    for i in range(1, cfg.mp_depth + 1):
        expected[f"linear_{i}.weight"] = (dims[i], dims[i - 1])
        expected[f"linear_{i}.bias"] = (dims[i],)
    if set(shapes) != set(expected):
        raise ValueError(f"{path} holds tensors {sorted(shapes)}, but a projector of mp_depth={cfg.mp_depth} "
                         f"holds {sorted(expected)}: config.json and the projector do not belong together")
    for name, want in expected.items():  # None: a dim the config does not record, any size matches
        if len(shapes[name]) != len(want) or any(w is not None and w != g for w, g in zip(want, shapes[name])):
            raise ValueError(f"{path}: {name} has shape {shapes[name]}, but config.json (mp_input_dim="
                             f"{cfg.mp_input_dim}, mp_hidden_dim={cfg.mp_hidden_dim}, mp_output_dim="
                             f"{cfg.mp_output_dim}) says {tuple('?' if w is None else w for w in want)}")
    for i in range(1, cfg.mp_depth + 1):  # the chain itself, where the config leaves a dim open
        out = shapes[f"linear_{i}.weight"][0]
        if shapes[f"linear_{i}.bias"] != (out,) or (i < cfg.mp_depth and shapes[f"linear_{i + 1}.weight"][1] != out):
            nxt = f", linear_{i + 1}.weight {shapes[f'linear_{i + 1}.weight']}" if i < cfg.mp_depth else ""
            raise ValueError(f"{path}: linear_{i}.weight {shapes[f'linear_{i}.weight']}, linear_{i}.bias "
                             f"{shapes[f'linear_{i}.bias']}{nxt} do not chain: the layers are not one projector")


# PEFT's names: base_model.model.<module path>.lora_A.weight (linears), .lora_embedding_A (embeddings)
LORA_KEY_RE = re.compile(r"base_model\.model\.(?P<module>(?:.+\.)?(?P<target>[^.]+))"
                         r"\.lora_(?:(?P<ab>[AB])\.weight|embedding_(?P<emb>[AB]))")
LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def _check_adapter(folder: Path, cfg: MMFTConfig, adapter_cfg: dict) -> None:
    """Every tensor a LoRA A/B pair on one of the configured targets, with the configured rank, under
    PEFT's `base_model.model.` prefix (other names load as nothing: PEFT only warns, and the round is
    the base model); every target present, on the same layers."""
    path = folder / ADAPTER_DIR / "adapter_model.safetensors"
    shapes = _tensors(path)
    targets = adapter_cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{folder / ADAPTER_DIR}/adapter_config.json: target_modules is {targets!r}, "
                         "expected a module name or a list of them")
    r, alpha = adapter_cfg.get("r"), adapter_cfg.get("lora_alpha")  # PEFT scales by alpha / r: both matter
    if sorted(targets) != sorted(cfg.lora_target_modules) or (r, alpha) != (cfg.lora_r, cfg.lora_alpha):
        raise ValueError(f"{folder / ADAPTER_DIR}/adapter_config.json (r={r}, lora_alpha={alpha}, "
                         f"targets {targets}) does not match config.json (lora_r={cfg.lora_r}, lora_alpha="
                         f"{cfg.lora_alpha}, lora_target_modules={list(cfg.lora_target_modules)})")
    pairs: dict[str, dict] = {}
    for name, shape in shapes.items():
        match = LORA_KEY_RE.fullmatch(name)
        if not match or match["target"] not in targets or len(shape) != 2:
            raise ValueError(f"{path}: unexpected tensor {name} {shape}: expected only 2-D lora_A/lora_B "
                             f"weights of the targets {targets}, named base_model.model.<module>")
        pairs.setdefault(match["module"], {})[match["ab"] or match["emb"]] = shape
    fixed_rank = not adapter_cfg.get("rank_pattern")
    maps: dict[str, tuple[str, tuple[int, int]]] = {}  # target -> (first module, its d_in -> d_out)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: {module} has lora_{''.join(ab)} but not its pair")
        (rank, d_in), (d_out, rank_b) = ab["A"], ab["B"]
        if rank != rank_b or (fixed_rank and rank != cfg.lora_r):
            raise ValueError(f"{path}: {module} has rank {rank} (A) / {rank_b} (B), config.json says {cfg.lora_r}")
        if cfg.mp_output_dim and cfg.mp_output_dim not in (d_in, d_out):
            raise ValueError(f"{path}: {module} maps {d_in} -> {d_out}, but the LM's hidden size is "
                             f"{cfg.mp_output_dim} (mp_output_dim): an adapter for another LM?")
        # every layer's copy of a target has the same shape (the base LM is not read here)
        target = module.rpartition(".")[2]
        first, shape = maps.setdefault(target, (module, (d_in, d_out)))
        if shape != (d_in, d_out):
            raise ValueError(f"{path}: {module} maps {d_in} -> {d_out}, but {first} maps {shape[0]} -> {shape[1]}: "
                             "the file is damaged or mixes two adapters")
    if missing := sorted(set(targets) - set(maps)):
        raise ValueError(f"{path} has no LoRA weights for {', '.join(missing)}, which adapter_config.json targets: "
                         "the file is damaged or incomplete")
    layers: dict[str, set[str]] = {}  # target -> the decoder layers it sits on (targets outside them: none)
    for module in pairs:
        if index := LAYER_RE.search(module + "."):
            layers.setdefault(module.rpartition(".")[2], set()).add(index[1])
    if len({frozenset(found) for found in layers.values()}) > 1:
        counts = ", ".join(f"{t}: {len(found)} layers" for t, found in sorted(layers.items()))
        raise ValueError(f"{path}: the targets sit on different layers ({counts}): the file is damaged or incomplete")


def check_round(folder: str | Path) -> tuple[MMFTConfig, dict]:
    """Raise a clear error unless `folder` holds a complete round whose tensors fit its config.json."""
    folder = check_round_folder(folder)
    cfg, round_info = load_config(folder)  # ValueError naming the file if it is not an mmft config
    adapter_config = folder / "adapter/adapter_config.json"
    try:
        adapter_cfg = json.loads(adapter_config.read_text())
        if not isinstance(adapter_cfg, dict) or "peft_type" not in adapter_cfg:
            raise ValueError("no 'peft_type' key")
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{adapter_config} is not a PEFT adapter config: {err}") from err
    _check_projector(folder / PROJECTOR_NAME, cfg)
    _check_adapter(folder, cfg, adapter_cfg)
    return cfg, round_info
