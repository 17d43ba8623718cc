"""One place for every knob: which models, how features are taken, projector, LoRA, prompt, pipeline.

Fields are prefixed by the part they configure (`lm_`, `vit_`, `mp_`, `lora_`, `prompt_`, `pipe_`,
`gen_`) so a grep finds every knob of a component. A trained round folder carries its own
`config.json`, written by `save_config`, so loading needs nothing but the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
FEATURE_MODES = ("pooled", "patch")
SELECT_STRATEGIES = ("default", "full")  # LlavaConfig's: "default" drops CLS, "full" keeps it
QUANTIZE_MODES = ("nf4", "int8", "none")
# A saved round without the feature-choice keys predates them: it was trained on the last layer with CLS.
OLD_ROUND_FEATURES = {"vit_feature_layer": -1, "vit_feature_select_strategy": "full"}


@dataclass
class MMFTConfig:
    # Language model: the base weights both pipeline stages share.
    lm_model_id: str = "microsoft/Phi-3.5-mini-instruct"
    lm_revision: str | None = None

    # Vision: CLIP, frozen. "pooled" = get_image_features (1 token); "patch" = one token per patch
    # (+ CLS), taken like LlavaConfig: `hidden_states[vit_feature_layer]`, "default" drops CLS, "full"
    # keeps it. New rounds use LLaVA's choice (second-to-last layer, no CLS: 49 tokens for ViT-B/32).
    # `pooled` ignores both (it is the projection head on the last layer's CLS).
    vit_model_id: str = "openai/clip-vit-base-patch32"
    vit_revision: str | None = None
    vit_feature_mode: str = field(default="pooled", metadata={"help": "pooled (1 token) or patch (1 per patch)"})
    vit_feature_layer: int = field(default=-2, metadata={
        "help": "patch mode: CLIP hidden_states index, -1 last, -2 second-to-last (LLaVA, the default)"})
    vit_feature_select_strategy: str = field(default="default", metadata={
        "help": "patch mode: default = drop CLS (LLaVA, 49 tokens for ViT-B/32), full = keep it (50)"})
    vit_max_pixels: int = 50_000_000  # refuse larger images before decoding them

    # Projector: Linear -> GELU -> Linear (mp_depth linear layers). Dims are filled in when the
    # model is built, so a saved round can be checked against the weights it loads.
    mp_depth: int = 2
    mp_input_dim: int | None = None
    mp_hidden_dim: int | None = None  # default: the LM's hidden size (as LLaVA)
    mp_output_dim: int | None = None

    # LoRA on the LM (Phi-3 fuses q/k/v and gate/up, so these four cover every linear).
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    )

    # Prompt: shared by training and inference through mmft.prompt.
    prompt_system: str = ""
    prompt_max_question_tokens: int = 256
    prompt_max_answer_tokens: int = 256
    prompt_clean_answers: bool = True  # drop stopwords and punctuation from training answers
    prompt_end_of_turn: str = "<|end|>"

    # Staged pipeline: draft (LoRA model, sees the image) then refine (base model, adapter off).
    pipe_draft: bool = True
    pipe_refine: bool = True
    pipe_refine_template: str = (
        "Question: {question}\nDraft answer: {draft}\n"
        "Rewrite the draft answer as one clear sentence that answers the question."
    )

    # Generation defaults.
    gen_max_new_tokens: int = 64
    gen_do_sample: bool = False
    gen_temperature: float = 0.7
    gen_top_p: float = 0.9
    gen_repetition_penalty: float = 1.0  # 1.0 = off; tidy() removes repeats

    def __post_init__(self):
        if self.vit_feature_mode not in FEATURE_MODES:
            raise ValueError(
                f"vit_feature_mode must be one of {FEATURE_MODES}, got {self.vit_feature_mode!r}"
            )
        if self.vit_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"vit_feature_select_strategy must be one of {SELECT_STRATEGIES} (as LlavaConfig), "
                             f"got {self.vit_feature_select_strategy!r}")
        if not isinstance(self.lora_target_modules, (list, tuple, str)):
            raise ValueError(f"lora_target_modules must be list[str], got {self.lora_target_modules!r}")
        if isinstance(self.lora_target_modules, str) or any(
                isinstance(m, str) and re.search(r"[,\s]", m) for m in self.lora_target_modules):
            # "a,b" (the old flag's spelling) and "a b" both work: module names hold no commas or spaces
            joined = " ".join([self.lora_target_modules] if isinstance(self.lora_target_modules, str)
                              else self.lora_target_modules)
            self.lora_target_modules = [m for m in re.split(r"[,\s]+", joined) if m]
        if isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)
        _check_types(self)
        for name in ("lm_model_id", "vit_model_id"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must name a model (a Hub id or a folder), got {getattr(self, name)!r}")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module")
        if self.mp_depth < 2:
            raise ValueError(f"mp_depth must be >= 2 (Linear -> GELU -> Linear), got {self.mp_depth}")
        _at_least(self, 1, "lora_r", "prompt_max_question_tokens", "prompt_max_answer_tokens", "gen_max_new_tokens",
                  "vit_max_pixels")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(self.pipe_refine_template) if name is not None}
        except ValueError as err:  # a lone "{" or "}"
            raise ValueError(f"pipe_refine_template is not a format string: {err} "
                             "(write a literal brace as {{ or }})")
        if names != {"question", "draft"}:
            raise ValueError(f"pipe_refine_template must use exactly {{question}} and {{draft}}, got {sorted(names)}")
        _at_least(self, 1, "mp_input_dim", "mp_hidden_dim", "mp_output_dim")
        for name in ("lora_alpha", "gen_temperature", "gen_repetition_penalty"):
            if not getattr(self, name) > 0:  # alpha 0 scales LoRA to nothing: it would train without an effect
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.gen_top_p <= 1:
            raise ValueError(f"gen_top_p must be in (0, 1], got {self.gen_top_p}")
        if not (self.pipe_draft or self.pipe_refine):  # a round that cannot answer: refused when it is read
            raise ValueError("at least one of pipe_draft and pipe_refine must be on")

    @property
    def feature_choice(self) -> dict:
        """What decides the image features (a feature cache must have been built with the same)."""
        choice = {"vit_model_id": model_key(self.vit_model_id), "vit_feature_mode": self.vit_feature_mode}
        if self.vit_feature_mode == "patch":
            choice.update(vit_feature_layer=self.vit_feature_layer,
                          vit_feature_select_strategy=self.vit_feature_select_strategy)
        return choice

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MMFTConfig":
        """A saved config; one written before the feature-choice keys existed loads as it was trained."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{**OLD_ROUND_FEATURES, **data})


_TYPES = {"str": (str,), "str | None": (str, type(None)), "int": (int,), "int | None": (int, type(None)),
          "float": (int, float), "bool": (bool,), "list[str]": (list,)}


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}  # what a --dtype flag takes -> torch's name


def whole_number(low: int = 1):
    """An argparse type for counts: a whole number >= `low`, in ASCII digits ("²".isdigit() is True, int("²")
    fails), or a one-line usage error; the entry points share it."""
    def parse(value: str) -> int:
        value = value.strip()
        if not (value.isascii() and value.isdigit()) or int(value) < low:
            wanted = "positive whole number" if low == 1 else f"whole number >= {low}"
            raise argparse.ArgumentTypeError(f"{value!r} is not a {wanted}")
        return int(value)
    return parse


def model_key(model_id: str) -> str:
    """A model id as compared: a local folder by its absolute path ("tiny/clip" typed in one directory and
    "/work/tiny/clip" recorded are one model), a Hub id as it is."""
    return str(Path(model_id).resolve()) if Path(model_id).exists() else model_id


def _check_types(config) -> None:
    """Each field as its annotation says, so that a hand-edited config.json fails here, naming the field,
    and not later: "false" (a string) would switch nothing off, 16.5 would fail deep in PEFT."""
    annotations = type(config).__annotations__  # the strings as written: HfArgumentParser rewrites f.type
    for f in fields(config):
        value, kinds = getattr(config, f.name), _TYPES.get(str(annotations.get(f.name)))
        if kinds is None:
            continue
        bad = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds) or (
            isinstance(value, list) and not all(isinstance(v, str) and v for v in value))
        if bad:
            raise ValueError(f"{f.name} must be {annotations[f.name]}, got {value!r}")


def _at_least(config, low: int, *names: str) -> None:
    """A clear error for a count or size below `low` (None: unset, allowed)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass
class RunArguments:
    """What one training run reads and how it starts; the model itself is `MMFTConfig`'s flags.
    (No torch here: `python -m train.finetune --help` stays fast.)"""

    train_json: str | None = field(default=None, metadata={"help": "LLaVA-Instruct JSON (e.g. llava_instruct_150k.json)"})
    image_dir: str | None = field(default=None, metadata={
        "help": "folder with the images (COCO train2017); not needed with --feature_cache"})
    eval_json: str | None = field(default=None, metadata={"help": "held-out JSON; else eval_fraction is held out"})
    eval_fraction: float = 0.02
    max_eval_samples: int = 200
    data_offset: int = field(default=0, metadata={"help": "first record of train_json this round uses"})
    max_samples: int | None = field(default=None, metadata={"help": "records this round uses"})
    feature_cache: str | None = field(default=None, metadata={"help": "CLIP feature cache folder (train.cache_features)"})
    pad_to_length: int | None = field(default=None, metadata={
        "help": "pad every batch to this length (only to measure what dynamic padding saves)"})
    dataset_name: str | None = field(default=None, metadata={
        "help": "the training data, for the model card: a Hub dataset id (e.g. liuhaotian/LLaVA-Instruct-150K) "
                "or a name; unset, the card says the run did not declare it"})
    quantize: str | None = field(default=None, metadata={
        "help": f"base LM precision: {'|'.join(QUANTIZE_MODES)} (default: nf4 on CUDA, none on CPU)"})
    projector_lr: float = field(default=1e-4, metadata={"help": "learning rate of the projector"})
    resume_round: str | None = field(default=None, metadata={
        "help": "previous round folder to continue; its config.json then sets the model (model flags are ignored)"})
    init_projector: str | None = field(default=None, metadata={"help": "round folder with a pre-trained projector"})
    projector_only: bool = field(default=False, metadata={
        "help": "stage 1: LM frozen, train the projector (the round still carries a zero-effect LoRA adapter)"})

    def __post_init__(self):
        _at_least(self, 0, "data_offset")
        _at_least(self, 1, "max_eval_samples", "max_samples")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not self.projector_lr > 0:
            raise ValueError(f"projector_lr must be > 0, got {self.projector_lr}")
        if self.resume_round and self.init_projector:
            raise ValueError("--init_projector seeds a new round's projector; --resume_round continues the round's "
                             "own: give one of them")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {QUANTIZE_MODES} (or unset for the device's default), "
                             f"got {self.quantize!r}")


def save_config(folder: str | Path, config: MMFTConfig, round_info: dict | None = None) -> Path:
    """Write `config.json`: the model config, plus what training recorded about this round."""
    path = Path(folder) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"mmft": asdict(config)}
    if round_info is not None:
        data["round"] = round_info
    partial = path.with_name(CONFIG_NAME + ".partial")  # a kill mid-write must not leave half a config.json
    partial.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(partial, path)
    return path


def load_config(folder: str | Path) -> tuple[MMFTConfig, dict]:
    """Read `config.json` from a round folder: (model config, round info or {})."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a round folder must contain {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text())
        round_info = data.get("round", {})
        _check_round_info(round_info)
        return MMFTConfig.from_dict(data["mmft"]), round_info
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid mmft config: {err}") from err


def _check_round_info(info) -> None:
    """The `round` section's shape (training writes it; a hand edit may not), so that publishing and the
    card name what is wrong instead of failing on it."""
    if not isinstance(info, dict):
        raise ValueError(f"'round' must be an object, got {type(info).__name__}")
    for key in ("data", "parent", "metrics"):
        if info.get(key) is not None and not isinstance(info[key], dict):
            raise ValueError(f"'round.{key}' must be an object or null, got {type(info[key]).__name__}")
    history = info.get("history")
    if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise ValueError("'round.history' must be a list of objects (one per round)")
