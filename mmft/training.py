"""Training: QLoRA on the LM with the projector alongside, in rounds, through the HF Trainer.

A *round* continues from the previous round's adapter and projector (the base stays 4-bit on CUDA;
nothing is ever merged) and writes a round folder: `adapter/`, `projector.safetensors`,
`config.json` (model config + round number, lineage, data window, steps), `metrics.json`,
`loss.png`. Trainer checkpoints (for crash recovery) hold only adapter + projector, never the base.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from mmft.config import MMFTConfig, load_config
from mmft.data import Collator, ConversationDataset, read_llava
from mmft.features import FeatureCache
from mmft.loading import build_model
from mmft.model import MultimodalModel
from mmft.projector import load_projector
from mmft.round import ADAPTER_DIR, PROJECTOR_NAME, check_round_folder

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    lm_model_id: str = field(default=MMFTConfig.lm_model_id, metadata={"help": "base LM (Hub id or folder)"})
    vit_model_id: str = field(default=MMFTConfig.vit_model_id, metadata={"help": "CLIP (Hub id or folder)"})
    vit_feature_mode: str = field(default="pooled", metadata={"help": "pooled (1 token) or patch (CLS + patches)"})
    mp_depth: int = field(default=2, metadata={"help": "linear layers in the projector"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default="qkv_proj,o_proj,gate_up_proj,down_proj")
    clean_answers: bool = field(default=True, metadata={"help": "drop stopwords/punctuation from answers"})
    quantize: str = field(default="auto", metadata={"help": "4-bit NF4: auto (CUDA only), yes, no"})
    projector_lr: float = field(default=1e-4, metadata={"help": "learning rate of the projector"})
    resume_round: str | None = field(default=None, metadata={
        "help": "previous round folder to continue; its config.json then sets the model (the flags above are ignored)"})
    init_projector: str | None = field(default=None, metadata={"help": "folder with a pre-trained projector"})
    projector_only: bool = field(default=False, metadata={"help": "stage 1: LM frozen, train the projector"})

    def to_config(self) -> MMFTConfig:
        return MMFTConfig(
            lm_model_id=self.lm_model_id, vit_model_id=self.vit_model_id, vit_feature_mode=self.vit_feature_mode,
            mp_depth=self.mp_depth, lora_r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            lora_target_modules=[m.strip() for m in self.lora_target_modules.split(",") if m.strip()],
            prompt_clean_answers=self.clean_answers,
        )


@dataclass
class DataArguments:
    train_json: str = field(default=None, metadata={"help": "LLaVA-Instruct JSON (e.g. llava_instruct_150k.json)"})
    image_dir: str | None = field(default=None, metadata={"help": "folder with the images (COCO train2017)"})
    eval_json: str | None = field(default=None, metadata={"help": "held-out JSON; else eval_fraction is held out"})
    eval_fraction: float = 0.02
    max_eval_samples: int = 200
    data_offset: int = field(default=0, metadata={"help": "first record of train_json this round uses"})
    max_samples: int | None = field(default=None, metadata={"help": "records this round uses"})
    feature_cache: str | None = field(default=None, metadata={"help": "CLIP feature cache folder"})
    pad_to_length: int | None = field(default=None, metadata={"help": "pad every batch to this length "
                                                                      "(only to measure what dynamic padding saves)"})
    dataset_name: str = field(default="liuhaotian/LLaVA-Instruct-150K", metadata={"help": "for the model card"})


class MMFTTrainer(Trainer):
    """Trainer that optimises the projector at its own lr and checkpoints only what is trained."""

    def __init__(self, *args, projector_lr: float, **kwargs):
        self.projector_lr = projector_lr
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            lm = [p for n, p in named if not n.startswith("projector.")]
            groups = [{"params": [p for n, p in named if n.startswith("projector.")], "lr": self.projector_lr,
                       "weight_decay": 0.0}]
            if lm:
                groups.insert(0, {"params": lm, "weight_decay": self.args.weight_decay})
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict=None):
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None):
        model = self.accelerator.unwrap_model(model or self.model)
        load_projector(model.projector, Path(resume_from_checkpoint) / PROJECTOR_NAME)
        adapter = Path(resume_from_checkpoint) / ADAPTER_DIR / "adapter_model.safetensors"
        if model.has_adapter:
            set_peft_model_state_dict(model.lm, load_file(str(adapter)))


def _quantize_flag(value: str) -> bool | None:
    choices = {"auto": None, "yes": True, "true": True, "no": False, "false": False}
    if value.lower() not in choices:
        raise ValueError(f"--quantize must be auto, yes or no; got {value!r}")
    return choices[value.lower()]


def prepare_model(margs: ModelArguments, device, feature_dim: int | None) -> tuple[MultimodalModel, dict]:
    """New model, or the previous round's; returns the model and the round info it continues."""
    quantize = _quantize_flag(margs.quantize)
    with_vision = feature_dim is None
    if margs.resume_round:
        folder = check_round_folder(margs.resume_round)
        cfg, parent = load_config(folder)
        model = build_model(cfg, device, quantize=quantize, with_vision=with_vision, feature_dim=feature_dim,
                            adapter=folder / ADAPTER_DIR, trainable=True)
        load_projector(model.projector, folder / PROJECTOR_NAME)
        return model, parent
    model = build_model(margs.to_config(), device, quantize=quantize, with_vision=with_vision,
                        feature_dim=feature_dim, trainable=not margs.projector_only)
    if margs.init_projector:
        load_projector(model.projector, Path(margs.init_projector) / PROJECTOR_NAME)
    if margs.projector_only:
        model.lm.requires_grad_(False)
    return model, {}


def make_datasets(dargs: DataArguments, model: MultimodalModel, cache: FeatureCache | None, seed: int):
    records, report = read_llava(dargs.train_json, dargs.image_dir, dargs.data_offset, dargs.max_samples)
    if dargs.eval_json:
        eval_records, eval_report = read_llava(dargs.eval_json, dargs.image_dir, 0, dargs.max_eval_samples)
        report.skipped.update(eval_report.skipped)
    else:
        random.Random(seed).shuffle(records)
        n_eval = min(dargs.max_eval_samples, max(1, int(len(records) * dargs.eval_fraction)))
        eval_records, records = records[:n_eval], records[n_eval:]
    if not records:
        raise ValueError(f"no usable training records in {dargs.train_json} ({report.summary()})")

    if cache is not None:
        def load(record):
            return {"image_features": cache[record.image]}
        n_tokens = cache.num_tokens
    else:
        image_dir = Path(dargs.image_dir or ".")

        def load(record):
            return {"pixel_values": model.vision.preprocess([image_dir / record.image])[0]}
        n_tokens = model.vision.num_tokens
    make = lambda recs: ConversationDataset(recs, model.tokenizer, model.cfg, n_tokens, load, report)
    return make(records), make(eval_records), report


@torch.no_grad()
def match_projector_scale(model: MultimodalModel, dataset: ConversationDataset, n: int = 32) -> float:
    """Scale a fresh projector's last layer so image tokens start at the RMS of the LM's token embeddings.

    A default-initialised projector emits image tokens many times larger than text embeddings; they
    then dominate attention and flatten the LM's predictions, which LoRA struggles to undo. Only
    the initial scale changes, not the architecture. Returns the factor applied.
    """
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    items = [item for item in items if "pixel_values" in item or "image_features" in item]
    if not items:
        return 1.0
    key = "image_features" if "image_features" in items[0] else "pixel_values"
    features = model.image_features(**{key: torch.stack([item[key] for item in items]).to(model.device)})
    param = next(model.projector.parameters())
    image_rms = model.projector(features.to(param.device, param.dtype)).pow(2).mean().sqrt()
    text_rms = model.lm.get_input_embeddings().weight.float().pow(2).mean().sqrt()
    factor = float(text_rms / image_rms)
    last = getattr(model.projector, f"linear_{model.projector.depth}")
    last.weight.mul_(factor)
    last.bias.mul_(factor)
    return factor


def plot_loss(log_history: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def finetune(margs: ModelArguments, dargs: DataArguments, targs: TrainingArguments,
             callbacks: list | None = None) -> tuple[Path, dict]:
    """Train one round; return (round folder, round info)."""
    set_seed(targs.seed)  # LoRA and projector initialisation, before the Trainer seeds itself
    cache = None
    if dargs.feature_cache:
        cache = FeatureCache(dargs.feature_cache)
        cache.check(load_config(margs.resume_round)[0] if margs.resume_round else margs.to_config())
    model, parent = prepare_model(margs, targs.device, cache.feature_dim if cache else None)
    train_set, eval_set, report = make_datasets(dargs, model, cache, targs.seed)
    print(report.summary())
    if not (margs.resume_round or margs.init_projector):
        match_projector_scale(model, train_set)

    collator = Collator(model.tokenizer.pad_token_id, dargs.pad_to_length)
    trainer = MMFTTrainer(model=model, args=targs, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collator, projector_lr=margs.projector_lr, callbacks=callbacks)
    resume = targs.resume_from_checkpoint
    if resume in ("last", "True", "true"):
        resume = get_last_checkpoint(targs.output_dir)
    result = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate()

    number = int(parent.get("round", 0)) + 1
    info = {
        "round": number,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "stage": "projector" if margs.projector_only else "finetune",
        "steps": trainer.state.global_step,
        "samples": len(train_set),
        "samples_seen": trainer.state.global_step * targs.train_batch_size * targs.gradient_accumulation_steps
        * targs.world_size,
        "train_loss": round(result.training_loss, 4),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "eval_loss": round(eval_metrics["eval_loss"], 4),
        "metrics": {},
        "data": {"dataset": dargs.dataset_name, "train_json": str(dargs.train_json), "offset": dargs.data_offset, "limit": dargs.max_samples,
                 "seed": targs.seed, "skipped": dict(report.skipped), "feature_cache": dargs.feature_cache},
        "parent": {"round": parent["round"], "source": str(margs.resume_round)} if parent else None,
    }
    info["history"] = parent.get("history", []) + [
        {k: info[k] for k in ("round", "created", "steps", "samples", "train_loss", "eval_loss", "metrics")}
    ]
    folder = Path(targs.output_dir) / f"round-{number}"
    if trainer.is_world_process_zero():
        model.save_pretrained(folder, info)
        history = trainer.state.log_history
        (folder / "metrics.json").write_text(json.dumps(
            {"train_loss": info["train_loss"], "eval_loss": info["eval_loss"], "eval_metrics": info["metrics"],
             "log_history": history}, indent=1) + "\n")
        plot_loss(history, folder / "loss.png")
    return folder, info


def default_training_args(**overrides) -> dict:
    """Our defaults for TrainingArguments (the CLI can override each)."""
    defaults = dict(remove_unused_columns=False, report_to="none", logging_steps=10, save_strategy="steps",
                    save_steps=200, save_total_limit=2, eval_strategy="steps", eval_steps=200,
                    activation_checkpointing=True, max_grad_norm=1.0, lr_scheduler_type="cosine",
                    warmup_steps=0.03, learning_rate=2e-4, per_device_train_batch_size=4,
                    per_device_eval_batch_size=8, dataloader_num_workers=0, seed=42,
                    bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                    dataloader_pin_memory=torch.cuda.is_available(),
                    ddp_find_unused_parameters=False)
    defaults.update(overrides)
    return defaults
