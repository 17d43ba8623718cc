"""CLIP feature cache: run the frozen CLIP once per image, train many times from safetensors shards.

CLIP is frozen, so its features for an image never change; computing them every epoch (and every
round) is wasted work. The cache records the CLIP id and feature choice it was built with (mode;
in patch mode also the layer and whether CLS is kept), and training refuses a cache that does not
match the run instead of silently using wrong features. Training from a cache needs no image files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmft.config import OLD_ROUND_FEATURES, MMFTConfig, model_key
from mmft.data import DataError
from mmft.vision import ImageError, VisionEncoder

logger = logging.getLogger(__name__)
INDEX_NAME = "cache.json"
INDEX_KEYS = ("vit_model_id", "vit_feature_mode", "num_tokens", "feature_dim", "files", "unreadable")


def build_cache(vision: VisionEncoder, vit_model_id: str, image_dir: str | Path, names: list[str],
                out_dir: str | Path, shard_size: int = 1024, batch_size: int = 32,
                vit_revision: str | None = None) -> dict:
    """Encode every image in `names` (relative to `image_dir`) into `out_dir/features-NNNNN.safetensors`.
    `vit_revision`: the Hub commit CLIP was loaded at (None: a local folder), checked by `FeatureCache.check`.

    Interrupt-safe: an old index is removed first and the new one is written last, each file through a
    temporary name and `os.replace`, so a cache folder either has a complete index whose shards all exist
    with the sizes it records, or no index at all (and a re-run builds it again)."""
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    names = sorted(set(names))
    # before the old cache is touched: a mistyped folder must not replace a good cache with an empty one
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image_dir {image_dir} is not a folder")
    if names and not any((image_dir / name).is_file() for name in names):
        raise FileNotFoundError(f"none of the {len(names)} images is in {image_dir} (e.g. {names[0]}): "
                                "is it the right image_dir?")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"the cache folder {out_dir} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_NAME).unlink(missing_ok=True)  # from here on, old shards are never served
    index = {"vit_model_id": vit_model_id, "vit_revision": vit_revision, "vit_feature_mode": vision.mode,
             "vit_feature_layer": vision.feature_layer, "vit_feature_select_strategy": vision.select_strategy,
             "num_tokens": vision.num_tokens, "feature_dim": vision.feature_dim, "files": {}, "unreadable": {},
             "shard_bytes": {}}
    for shard_no, start in enumerate(range(0, len(names), shard_size)):
        shard_name = f"features-{shard_no:05d}.safetensors"
        tensors = {}
        chunk = names[start : start + shard_size]
        for i in range(0, len(chunk), batch_size):
            batch = chunk[i : i + batch_size]
            pixels, good = [], []
            for name in batch:
                try:
                    pixels.append(vision.preprocess([image_dir / name]))
                    good.append(name)
                except ImageError as err:
                    index["unreadable"][name] = str(err)
            if good:
                features = vision(torch.cat(pixels)).float().cpu()  # [b, N_tok, D_v]
                tensors.update({name: features[j].contiguous() for j, name in enumerate(good)})
        if tensors:
            _replace(out_dir / shard_name, lambda tmp: save_file(tensors, str(tmp)))
            index["files"].update({name: shard_name for name in tensors})
            index["shard_bytes"][shard_name] = (out_dir / shard_name).stat().st_size
    _replace(out_dir / INDEX_NAME, lambda tmp: tmp.write_text(json.dumps(index, indent=1) + "\n"))
    logger.info("cached %d images, %d unreadable", len(index["files"]), len(index["unreadable"]))
    return index


def _replace(path: Path, write) -> None:
    """`write(tmp)` then rename onto `path`: readers see the old file or the whole new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def describe_features(choice: dict) -> str:
    text = f"CLIP {choice['vit_model_id']!r} in {choice['vit_feature_mode']!r} mode"
    if choice["vit_feature_mode"] == "patch":
        text += f" (layer {choice['vit_feature_layer']}, {choice['vit_feature_select_strategy']!r})"
    return text


class FeatureCache:
    """Read side of the cache: `cache[image_name] -> [N_tok, D_v]`, shards opened lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / INDEX_NAME
        if not path.is_file():
            raise DataError(f"{path} not found: build the cache with python -m train.cache_features")
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err}); rebuild the cache") from None
        missing = [k for k in INDEX_KEYS if k not in index] if isinstance(index, dict) else list(INDEX_KEYS)
        if missing:
            raise DataError(f"{path} is not a feature cache index (no {', '.join(missing)}); rebuild the cache")
        self.index = {**OLD_ROUND_FEATURES, **index}  # old caches: last layer + CLS
        for shard, size in self.index.get("shard_bytes", {}).items():  # older caches did not record sizes
            found = (self.folder / shard).stat().st_size if (self.folder / shard).is_file() else None
            if found != size:
                raise DataError(f"{self.folder / shard} is {'missing' if found is None else f'{found} bytes'}, "
                                f"the index says {size} bytes: the cache is damaged; rebuild it")
        self._handles = {}

    def check(self, cfg: MMFTConfig) -> None:
        """Refuse a cache built with another CLIP, another commit of it, or another feature choice than `cfg`'s.
        Both revisions are commits (`mmft.loading.pin_revisions`); a cache or a run that names none is not compared."""
        wanted = cfg.feature_choice
        keys = ["vit_model_id", "vit_feature_mode"]  # the cache's own choice: a patch cache has a layer, a pooled
        if self.index.get("vit_feature_mode") == "patch":  # run's choice does not (and the reverse)
            keys += ["vit_feature_layer", "vit_feature_select_strategy"]
        built = {key: self.index.get(key) for key in keys}
        built["vit_model_id"] = model_key(built["vit_model_id"])  # older caches: a local path as typed
        built_revision = self.index.get("vit_revision")  # older caches did not record it
        if built_revision and cfg.vit_revision and built_revision != cfg.vit_revision:
            raise DataError(f"feature cache {self.folder} was built with CLIP at commit {built_revision}, but this run "
                            f"uses {cfg.vit_revision}; rebuild it with python -m train.cache_features")
        if built != wanted:
            raise DataError(
                f"feature cache {self.folder} was built with {describe_features(built)}, but this run uses "
                f"{describe_features(wanted)}; rebuild it with python -m train.cache_features"
            )

    def problem(self, name: str) -> str | None:
        """Why `name` has no features here (None: it has): the data reader skips such records."""
        if name in self.index["files"]:
            return None
        return "unreadable image" if name in self.index["unreadable"] else "image not in the feature cache"

    @property
    def num_tokens(self) -> int:
        return self.index["num_tokens"]

    @property
    def feature_dim(self) -> int:
        return self.index["feature_dim"]

    def __getitem__(self, name: str) -> torch.Tensor:
        shard = self.index["files"].get(name)
        if shard is None:
            reason = self.index["unreadable"].get(name, "not in the cache")
            raise ImageError(f"no cached features for {name}: {reason}")
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard].get_tensor(name)
