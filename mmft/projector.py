"""Projector: CLIP feature tokens -> LM embedding space, and its strict safetensors file.

Module names follow transformers' `LlavaMultiModalProjector` (`linear_1`, `act`, `linear_2`) so the
weights drop into a `LlavaForConditionalGeneration` unchanged. Loading is strict on purpose: the
original code loaded with `strict=False`, and a layout mismatch silently gave a random projector.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


class Projector(nn.Module):
    """Linear -> GELU -> Linear (-> GELU -> Linear ... for depth > 2)."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int | None = None, depth: int = 2):
        super().__init__()
        if depth < 2:  # one linear would ignore output_dim or hidden_dim: LLaVA's projector has two or more
            raise ValueError(f"a projector has depth >= 2 (Linear -> GELU -> Linear), got {depth}")
        hidden_dim = hidden_dim or output_dim
        self.depth = depth
        self.linear_1 = nn.Linear(input_dim, hidden_dim)
        self.act = nn.GELU()
        for i in range(2, depth + 1):
            out = output_dim if i == depth else hidden_dim
            setattr(self, f"linear_{i}", nn.Linear(hidden_dim, out))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(features)  # [B, N, D_h]
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x  # [B, N, D_lm]


def save_projector(projector: Projector, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "depth": str(projector.depth)})
    return path


def load_projector(projector: Projector, path: str | Path) -> Projector:
    """Load weights into `projector`; any missing/extra key or shape mismatch is an error naming both."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projector weights not found: {path}")
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    expected = projector.state_dict()
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    for key in sorted(set(expected) & set(saved)):
        if saved[key].shape != expected[key].shape:
            problems.append(
                f"{key}: file has shape {tuple(saved[key].shape)}, "
                f"model expects {tuple(expected[key].shape)}"
            )
    if problems:
        raise ValueError(
            f"{path} does not match the projector (depth {projector.depth}): " + "; ".join(problems)
            + ". Was it trained with another feature mode, LM or mp_depth?"
        )
    projector.load_state_dict(saved, strict=True)
    return projector
