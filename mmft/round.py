"""What a round folder holds — one definition for training, loading and the Hub (no torch import here).

    round-N/adapter/adapter_config.json, adapter/adapter_model.safetensors   PEFT LoRA
    round-N/projector.safetensors                                          the projector
    round-N/config.json                                                    {"mmft": MMFTConfig, "round": {...}}
    round-N/metrics.json, loss.png                                         from training (optional)
"""

from __future__ import annotations

import os
import re
from fnmatch import fnmatch
from pathlib import Path

from mmft.config import CONFIG_NAME

ADAPTER_DIR = "adapter"
PROJECTOR_NAME = "projector.safetensors"
COMMIT_RE = re.compile(r"[0-9a-f]{40}")  # a Hub commit id: the one revision that never moves
ROUND_FILES = [CONFIG_NAME, PROJECTOR_NAME, f"{ADAPTER_DIR}/adapter_config.json",
               f"{ADAPTER_DIR}/adapter_model.safetensors"]
METRICS_NAME, LOSS_PLOT = "metrics.json", "loss.png"  # what a finished run adds: published, never needed to load


def path_matches(path: str, pattern: str) -> bool:
    """A repo-relative POSIX path against a glob, segment by segment: `*` never crosses a `/` (fnmatch's
    does: `adapter/*.json` would take `adapter/old/x.json`), and a dotfile matches only a pattern
    segment that names one (a stray `.env` never travels)."""
    parts, pats = path.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(
        fnmatch(part, pat) and (not part.startswith(".") or pat.startswith(".")) for part, pat in zip(parts, pats))


def check_round_folder(folder: str | Path) -> Path:
    """The folder, or a clear error naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected a round folder ({', '.join(ROUND_FILES)})")
    missing = [name for name in ROUND_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete round folder: missing {', '.join(missing)}")
    return folder


def is_local_path(value: str) -> bool:
    """An absolute (or home-relative) path, POSIX or Windows (drive or UNC): a place on one machine only."""
    return (os.path.isabs(value) or value.startswith(("~", "\\\\"))
            or bool(re.match(r"[A-Za-z]:[\\/]", value)))


def without_local_paths(value):
    """Round info as it may leave the build machine: every absolute path becomes its base name (split at
    either separator: a round trained on Windows is published from Linux too)."""
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and is_local_path(value):
        return re.split(r"[\\/]+", value.rstrip("/\\"))[-1] or value
    return value
