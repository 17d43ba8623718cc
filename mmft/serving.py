"""Serving: the rounds an app (or a script) answers with, kept loaded within a budget; no UI here.

One base, many rounds. Every loaded round whose base is the same shares one copy of the base LM and
of CLIP: a round is a PEFT *named* adapter on that base (`load_adapter`) plus its own projector, so a
loaded round costs megabytes (Phi-3.5, LoRA r=16 on all linears: ~100 MB in fp32; a patch-mode
projector ~47 MB), switching rounds is a flag flip, and the refine stage runs with every adapter off.

Budget: `cache_size` counts *rounds* (adapter + projector each), `max_bases` counts *base models*
(LM + CLIP: ~7.6 GB for Phi-3.5 in bf16). A round whose base differs — another LM or CLIP id or
revision, feature mode or any other `lm_*`/`vit_*` field, or other device/dtype/quantization — cannot
share: it loads a second base only while fewer than `max_bases` are loaded; otherwise the least
recently used base is dropped with its rounds *before* the new one loads (never two bases over budget).

Thread safety lives in the model layer (`mmft.model.AdapterSwitch`): adapter choice and generation
hold the base's lock, and loading or deleting an adapter takes the same lock.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import traceback
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path


from mmft.config import MMFTConfig
from mmft.hub import RoundNotFound, error_line, list_rounds, pull_round
from mmft.loading import load_round, pick_device, projector_for, round_config
from mmft.pipeline import Pipeline
from mmft.projector import load_projector
from mmft.round import ADAPTER_DIR, COMMIT_RE, PROJECTOR_NAME

log = logging.getLogger(__name__)

DEMO_KEY = ":demo"  # the bundled shapes round; ':' is in no git ref name, so no Hub revision is this key
MAIN_KEY = "main"  # a Hub repo's latest round
CACHE_SIZE = 4  # rounds (adapter + projector each); they share their base
MAX_BASES = 1  # base models (LM + CLIP); a free CPU Space (16 GB) holds one Phi-3.5


def load_pipeline(source: str | Path, revision: str | None = None, **load_kwargs) -> Pipeline:
    """A `Pipeline` for a local round folder or any Hub revision; kwargs go to `mmft.loading.load_round`
    (the base LM and CLIP load at the `lm_revision` / `vit_revision` the round's config.json pins)."""
    return Pipeline.from_round(pull_round(source, revision), **load_kwargs)


def base_key(cfg: MMFTConfig, device=None, dtype=None, quantize=None) -> tuple:
    """What must be equal for two rounds to share a base: every `lm_*` and `vit_*` field + how it is loaded.
    (An int8 base takes any LoRA targets: `mmft.quantize.Int8Linear` is an `nn.Linear` that PEFT wraps.)"""
    names = [f.name for f in fields(cfg) if f.name.startswith(("lm_", "vit_"))]
    return (*((n, repr(getattr(cfg, n))) for n in names), ("load", str(device), str(dtype), str(quantize)))


def _delete_adapter(base, name: str) -> None:
    """Take a named adapter off a shared base (if PEFT holds it) and re-list the base's LoRA layers."""
    with base.switch.lock, warnings.catch_warnings():  # "Adapter ... was active which is now deleted"
        warnings.simplefilter("ignore", UserWarning)
        if name in base.lm.peft_config:
            base.lm.delete_adapter(name)
        base.switch.refresh()


class RoundCache:
    """Loaded rounds by key, least recently used dropped first; rounds on one base share it."""

    def __init__(self, cache_size: int = CACHE_SIZE, max_bases: int = MAX_BASES):
        if cache_size < 1 or max_bases < 1:
            raise ValueError(f"cache_size and max_bases must be >= 1, got {cache_size} and {max_bases}")
        self.cache_size, self.max_bases = cache_size, max_bases
        self._rounds: OrderedDict[str, Pipeline] = OrderedDict()
        self._base_of: dict[str, tuple] = {}
        self._folder_of: dict[str, Path] = {}  # round key -> the folder it was loaded from (a Hub snapshot: one commit)
        self._bases: OrderedDict[tuple, object] = OrderedDict()  # base key -> a loaded round's MultimodalModel on it
        self._names = (f"round{i}" for i in itertools.count(1))  # adapter names; round keys may hold "/" or "."
        self._lock = threading.RLock()

    def get(self, key: str) -> Pipeline | None:
        with self._lock:
            pipe = self._rounds.get(key)
            if pipe is not None:
                self._rounds.move_to_end(key)
                self._bases.move_to_end(self._base_of[key])
            return pipe

    def loaded(self) -> list[str]:
        return list(self._rounds)

    def bases(self) -> int:
        return len(self._bases)

    def load(self, key: str, folder: str | Path, device=None, dtype=None, quantize=None) -> Pipeline:
        """The round in `folder` under `key`: onto its base if that is loaded, else onto a new base."""
        with self._lock:
            pipe = self._load(key, folder, device, dtype, quantize)
            self._evict()
            return pipe

    def _evict(self) -> None:
        while len(self._rounds) > self.cache_size:  # least recently used first
            self._drop_round(next(iter(self._rounds)))

    def _load(self, key: str, folder: str | Path, device=None, dtype=None, quantize=None) -> Pipeline:
        """`load` without evicting: `replace` holds the old and the new round for a moment."""
        with self._lock:
            if (pipe := self.get(key)) is not None:
                return pipe
            folder = Path(folder)
            cfg, _ = round_config(folder)
            bkey = base_key(cfg, device, dtype, quantize)
            if bkey in self._bases:
                self._bases.move_to_end(bkey)
                model = self._add_round(self._bases[bkey], folder, cfg)
            else:
                dropped = []  # (key, folder) of the rounds that made way: back if the new base fails
                while len(self._bases) >= self.max_bases:  # drop first: never two bases over budget
                    dropped += self._drop_base(next(iter(self._bases)))
                try:
                    model, _ = load_round(folder, device=device, dtype=dtype, quantize=quantize)
                except Exception as err:
                    # its frames hold the failed base: cleared, so the old one does not load beside it
                    traceback.clear_frames(err.__traceback__)
                    gc.collect()
                    self._restore(dropped, device, dtype, quantize)
                    raise
                self._bases[bkey] = model
                log.info("loaded a base (%s, %s) for round %s", cfg.lm_model_id, cfg.vit_model_id, key)
            # Pipeline() cannot fail here: a config with both stages off is refused by round_config above
            self._rounds[key], self._base_of[key], self._folder_of[key] = Pipeline(model), bkey, folder
            return self._rounds[key]

    def _restore(self, rounds: list[tuple[str, Path]], device, dtype, quantize) -> None:
        """Load again the rounds a failed load dropped (best effort: the failure is what the caller hears)."""
        for key, folder in rounds:
            try:
                self._load(key, folder, device, dtype, quantize)
            except Exception as err:
                log.warning("could not reload %s after a failed load: %s", key, err)

    def folder(self, key: str) -> Path | None:
        return self._folder_of.get(key)

    def replace(self, key: str, folder: str | Path, device=None, dtype=None, quantize=None) -> Pipeline:
        """`key` serves the round in `folder` from now on (a branch moved on). The new round loads first,
        so that on a shared base the base stays; then the old one is dropped."""
        with self._lock:
            new = f"{key}\0new"  # no picker key holds a NUL
            # both held meanwhile (no eviction): no other round makes way for the new one; a failed load
            # puts back the rounds (`key` among them) whose base made way for the new one's
            pipe = self._load(new, folder, device, dtype, quantize)
            if key in self._rounds:
                self._drop_round(key)
            self._rounds[key], self._base_of[key] = self._rounds.pop(new), self._base_of.pop(new)
            self._folder_of[key] = self._folder_of.pop(new)
            self._evict()
            return pipe

    def _add_round(self, base, folder: Path, cfg: MMFTConfig):
        """Another named adapter on the base's PeftModel, and this round's own projector (strict)."""
        try:
            cfg, projector = projector_for(cfg, base.cfg.mp_input_dim, base.cfg.mp_output_dim)
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None
        load_projector(projector, folder / PROJECTOR_NAME)
        projector.to(base.device).eval().requires_grad_(False)
        name = next(self._names)
        with base.switch.lock:  # no generation on this base while its adapters change
            try:
                base.lm.load_adapter(str(folder / ADAPTER_DIR), adapter_name=name, is_trainable=False)
            except Exception:  # PEFT adds the adapter's layers before it reads the weights: take them off
                _delete_adapter(base, name)
                raise
            return base.sibling(cfg, projector, name)

    def _drop_round(self, key: str) -> None:
        pipe, bkey = self._rounds.pop(key), self._base_of.pop(key)
        self._folder_of.pop(key, None)
        if bkey not in self._bases:
            return
        if bkey not in self._base_of.values():  # its base's last round: the base goes too
            self._drop_base(bkey)
            return
        base = self._bases[bkey]
        _delete_adapter(base, pipe.model.adapter_name)
        if base is pipe.model:  # the base's handle is this round's model: hand it to a round that stays,
            survivor = next(k for k, b in self._base_of.items() if b == bkey)  # so its projector can go
            self._bases[bkey] = self._rounds[survivor].model
        log.info("dropped round %s from the cache", key)

    def _drop_base(self, bkey: tuple) -> list[tuple[str, Path]]:
        """Forget a base and its rounds (returned as (key, folder)); the memory is freed once no request
        still holds them."""
        dropped = []
        for key in [k for k, b in self._base_of.items() if b == bkey]:
            del self._rounds[key], self._base_of[key]
            dropped.append((key, self._folder_of.pop(key)))  # set with every round (_load, replace)
            log.info("dropped round %s from the cache (its base was dropped)", key)
        del self._bases[bkey]
        return dropped


@dataclass
class Settings:
    """Where the model comes from and how it is loaded (app.py fills this from flags and env)."""

    demo_round: Path
    repo: str | None = None  # Hub repo id (or a local round folder); None serves the demo
    revision: str | None = None  # tag, branch or commit id; None = main
    demo: bool = False  # serve the demo even if a repo is set
    device: str | None = None  # None: CUDA when present
    dtype: str | None = None  # None: the CPU path's or mmft.loading.pick_dtype (the demo: float32, it is tiny)
    quantize: str | None = None  # "nf4", "int8", "none"; None: the device's default
    asr_model: str | None = None  # None: mmft.speech.DEFAULT_MODEL_ID
    cache_size: int = CACHE_SIZE  # rounds kept loaded
    max_bases: int = MAX_BASES  # base models kept loaded


class Rounds:
    """The rounds an app can serve, by picker key (`demo`, `main`, a tag or commit id), loaded on demand."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.repo = None if settings.demo else settings.repo
        self.on_hub = self.repo is not None and not Path(self.repo).is_dir()  # else a local round folder
        self.cache = RoundCache(max(settings.cache_size, 1), max(settings.max_bases, 1))
        self._lock = threading.Lock()
        self._listed: list[tuple[str, str]] = []  # the repo's rounds as last listed (kept if a listing fails)

    def _locate(self, key: str) -> Path:
        """The round's folder: cheap checks and, for the Hub, the download; raises before anything is dropped."""
        if key == DEMO_KEY:
            if not Path(self.settings.demo_round).is_dir():
                raise FileNotFoundError(f"the bundled demo round {self.settings.demo_round} is missing: rebuild "
                                        "it with `python -m train.build_demo`, or serve a Hub round with --repo")
            return pull_round(self.settings.demo_round)
        return pull_round(self.repo, None if key == MAIN_KEY else key)

    def _options(self, key: str) -> dict:
        s = self.settings
        if key == DEMO_KEY:  # tiny: loaded as its evaluation loads it (mmft.demo.evaluate_round: float32,
            # the CPU default int8), so the app answers as its figures say; NF4 on CUDA would gain nothing
            cpu = pick_device(s.device).type == "cpu"
            return dict(device=s.device, dtype=s.dtype or "float32", quantize=s.quantize or (None if cpu else "none"))
        return dict(device=s.device, dtype=s.dtype, quantize=s.quantize)

    def get(self, key: str, refresh: bool = False) -> Pipeline:
        """The round's pipeline, loaded once. `refresh` (the picker's choice): where the Hub's `main`, a
        branch or a tag (`push_to_hub.py --force` moves one) has moved on since it was loaded, the new
        round replaces it, so what is served is what the picker's label names; unreachable, the loaded
        one stays. A commit id never moves."""
        folder = None
        movable = key != DEMO_KEY and not COMMIT_RE.fullmatch(key)
        if refresh and movable and self.on_hub and self.cache.folder(key) is not None:
            try:  # asked outside the lock: other visitors' questions do not wait for the Hub
                folder = self._locate(key)  # a snapshot folder: one per commit
            except RoundNotFound as err:
                log.warning("serving the loaded %s of %s: %s", key, self.repo, err)
        with self._lock:
            pipe = self.cache.get(key)
            if pipe is None:
                return self.cache.load(key, folder or self._locate(key), **self._options(key))
            if folder is not None and folder != self.cache.folder(key):
                log.info("%s of %s moved on: loading %s", key, self.repo, folder.name)
                pipe = self.cache.replace(key, folder, **self._options(key))
            return pipe

    def loaded(self) -> list[str]:
        return self.cache.loaded()

    def start(self) -> tuple[str, str | None]:
        """(key served at start-up, why the configured round could not be served or None); loads it."""
        if self.repo is None:
            self.get(DEMO_KEY)
            return DEMO_KEY, None
        key = self.settings.revision or MAIN_KEY
        try:
            self.get(key)
            return key, None
        except (RoundNotFound, OSError, RuntimeError, ValueError) as err:
            if not (isinstance(err, RoundNotFound) or self.on_hub):
                raise  # a local round folder is its developer's: app.py says what is wrong and stops
            # pulled but not loadable (its base is not on the Hub, a mismatched adapter): a Space stays up
            reason = str(err) if isinstance(err, RoundNotFound) else \
                f"{self.repo} at {key!r} was pulled but cannot be loaded: {error_line(err)}"
            log.warning("serving the demo round instead: %s", reason)
            try:
                self.get(DEMO_KEY)
            except FileNotFoundError as missing:
                raise FileNotFoundError(f"{reason} The fallback failed too: {missing}") from err
            return DEMO_KEY, reason

    def choices(self, current: str) -> list[tuple[str, str]]:
        """(label, key) for the round picker: the repo's round-N tags, newest first, and what is served."""
        if self.repo is None:
            return [("shapes demo (bundled)", DEMO_KEY)]
        options = [(f"{MAIN_KEY} (latest)" if self.on_hub else f"{self.repo} (local folder)", MAIN_KEY)]
        if self.on_hub:
            try:
                self._listed = [(f"{tag} ({sha[:7]})", tag) for tag, sha in reversed(list_rounds(self.repo))]
            except Exception as err:  # the picker is a convenience: the app serves on, with the last listing
                log.warning("could not list the rounds of %s: %s", self.repo, error_line(err))
            options += self._listed
        keys = {key for _, key in options}
        for extra in (self.settings.revision, current):  # the configured round and the one being served
            if extra and extra != DEMO_KEY and extra not in keys:
                options.append((extra, extra))
                keys.add(extra)
        if current == DEMO_KEY:
            options.append(("shapes demo (bundled)", DEMO_KEY))
        return options
