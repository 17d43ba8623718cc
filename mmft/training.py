"""Training: QLoRA on the LM with the projector alongside, in rounds, through the HF Trainer.

A *round* continues from the previous round's adapter and projector (the base stays 4-bit on CUDA;
nothing is ever merged) and writes a round folder: `adapter/`, `projector.safetensors`,
`config.json` (model config + round number, lineage, data window, steps), `metrics.json`,
`loss.png`. Trainer checkpoints (for crash recovery) hold only the trained weights
(`model.safetensors`: LoRA + projector), never the base; the Trainer's own resume path reads them
back through `MultimodalModel.load_state_dict`, which is strict about exactly those weights.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Trainer, TrainerState, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from mmft.config import MMFTConfig, RunArguments, load_config
from mmft.data import Collator, ConversationDataset, DataError, read_llava, split_records
from mmft.features import FeatureCache, describe_features
from mmft.loading import build_model, pin_revisions, round_config
from mmft.model import MultimodalModel
from mmft.projector import load_projector
from mmft.round import ADAPTER_DIR, LOSS_PLOT, METRICS_NAME, PROJECTOR_NAME, check_round_folder

logger = logging.getLogger(__name__)
CHECKPOINT_WEIGHTS = "model.safetensors"  # the Trainer's name: its resume path looks for it
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence means "complete"


class MMFTTrainer(Trainer):
    """Trainer that optimises the projector at its own lr and checkpoints only what is trained."""

    def __init__(self, *args, projector_lr: float, round_number: int | None = None, **kwargs):
        self.projector_lr = projector_lr
        self.round_number = round_number  # written into each checkpoint: `last` resumes this round's only
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A checkpoint's weights: the trained tensors only (the Trainer would write the whole base)."""
        if self.args.should_save:
            output_dir = Path(output_dir or self.args.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            # the Trainer writes a checkpoint into a folder of that name that may already exist (a run started
            # again from step 0): until its trainer_state.json is written anew, it must read as torn
            (output_dir / TRAINER_STATE).unlink(missing_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            state = {k: v.detach().contiguous().cpu() for k, v in model.trained_state_dict().items()}
            metadata = {"format": "pt"}
            if self.round_number is not None:
                metadata["mmft_round"] = str(self.round_number)
            save_file(state, str(output_dir / CHECKPOINT_WEIGHTS), metadata=metadata)


def _finished_round(folder: Path) -> bool:
    """Whether `folder` holds a finished round: its config.json (written last, atomically) reads."""
    try:
        load_config(folder)
    except (OSError, ValueError):
        return False
    return True


def is_complete_checkpoint(folder: str | Path) -> bool:
    """A checkpoint a kill did not tear: the Trainer writes `trainer_state.json` last, after the
    weights, optimizer and RNG state; both it and the weights must read."""
    folder = Path(folder)
    try:
        json.loads((folder / TRAINER_STATE).read_text())
        with safe_open(str(folder / CHECKPOINT_WEIGHTS), framework="pt") as f:
            f.keys()
    except Exception:  # missing, cut JSON, or safetensors' own error on a cut file: all mean "torn"
        return False
    return True


def checkpoint_header(folder: str | Path) -> tuple[int | None, set[str]]:
    """(the round a checkpoint was written for, or None where written before checkpoints recorded it;
    the names of the weights it holds), from one read of its safetensors header."""
    with safe_open(str(Path(folder) / CHECKPOINT_WEIGHTS), framework="pt") as f:
        value, names = (f.metadata() or {}).get("mmft_round"), set(f.keys())
    return (int(value) if value and value.isdigit() else None), names


def checkpoint_round(folder: str | Path) -> int | None:
    return checkpoint_header(folder)[0]


def last_complete_checkpoint(output_dir: str | Path, round_number: int | None = None,
                             weights: set[str] | None = None) -> str | None:
    """The newest checkpoint that is complete; torn ones (a run killed while writing) are skipped, and
    so, given `round_number`, are those of another round (rounds may share an output folder), and,
    given `weights` (the run's trained tensor names), those of another stage (a projector-only stage
    and the LoRA stage after it are both round N)."""
    output_dir = Path(output_dir)
    found = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if output_dir.is_dir() else []:
        step = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    for _, path in sorted(found, reverse=True):
        if not is_complete_checkpoint(path):
            logger.warning("skipping %s: incomplete (the run was killed while writing it)", path)
            continue
        other, names = checkpoint_header(path)
        if round_number is not None and other not in (None, round_number):
            logger.warning("skipping %s: a checkpoint of round %s, not of round %s", path, other, round_number)
        elif weights is not None and names != weights:
            logger.warning("skipping %s: it holds other weights than this run trains (another stage)", path)
        else:
            return str(path)
    return None


def training_dtype(targs: TrainingArguments) -> torch.dtype | None:
    """The weights' dtype for a run: on CUDA the device's default (bf16, QLoRA's compute dtype); on a CPU
    float32 unless `--bf16` asks for it, so a run computes the same on CPUs with and without native bf16
    (`pick_dtype` would pick bf16 on the former: fine for inference, not for reproducible training)."""
    if targs.device.type == "cuda":
        return None
    return torch.bfloat16 if targs.bf16 else torch.float32


def prepare_model(cfg: MMFTConfig, run: RunArguments, device, feature_dim: int | None, dtype=None
                  ) -> tuple[MultimodalModel, dict]:
    """New model (`cfg`), or the previous round's (`run.resume_round`, whose config wins); returns the
    model and the round info it continues. Always with a LoRA adapter: the projector-only stage
    freezes it (zero effect), so its round loads, continues and publishes like any other."""
    with_vision = feature_dim is None
    if run.resume_round:
        folder = check_round_folder(run.resume_round)
        cfg, parent = round_config(folder)  # "../base/lm" is relative to the round (the bundled demo's)
        model = build_model(cfg, device, dtype, quantize=run.quantize, with_vision=with_vision,
                            feature_dim=feature_dim, adapter=folder / ADAPTER_DIR, trainable=True)
        load_projector(model.projector, folder / PROJECTOR_NAME)
    else:
        model, parent = build_model(pin_revisions(cfg), device, dtype, quantize=run.quantize,
                                    with_vision=with_vision, feature_dim=feature_dim, trainable=True), {}
        if run.init_projector:
            load_projector(model.projector, Path(run.init_projector) / PROJECTOR_NAME)
    if run.projector_only:
        model.lm.requires_grad_(False)
    return model, parent


def read_data(run: RunArguments, cache: FeatureCache | None):
    """Train and eval records and the skip report of each (one shared report when the eval records are split
    off the training file). With a feature cache no image file is opened."""
    if not run.train_json:
        raise DataError("no training data: give --train_json (a LLaVA-Instruct JSON file)")
    problem = cache.problem if cache is not None else None
    records, report = read_llava(run.train_json, run.image_dir, run.data_offset, run.max_samples, problem)
    eval_report = report
    if run.eval_json:  # its own report: its skips are not the training data's
        eval_records, eval_report = read_llava(run.eval_json, run.image_dir, 0, run.max_eval_samples, problem)
    elif records:  # by picture, not by seed or window: every round holds out the same images (`split_records`)
        records, eval_records = split_records(records, run.eval_fraction, run.max_eval_samples)
    else:
        eval_records = []
    if not records:
        raise DataError(f"{run.train_json}: no usable training records ({report.summary()})")
    if not eval_records:  # else the run would train to the end and fail at its evaluation, saving nothing
        raise DataError(f"{run.eval_json or run.train_json}: no usable evaluation records "
                        f"({eval_report.summary() if run.eval_json else 'the training file is too small to split'})")
    return records, eval_records, report, eval_report


def make_datasets(records, eval_records, report, eval_report, run: RunArguments, model: MultimodalModel,
                  cache: FeatureCache | None):
    if cache is not None:
        def load(record):
            return {"image_features": cache[record.image]}
        n_tokens = cache.num_tokens
    else:
        image_dir = Path(run.image_dir or ".")

        def load(record):
            return {"pixel_values": model.vision.preprocess([image_dir / record.image])[0]}
        n_tokens = model.vision.num_tokens
    make = lambda recs, rep: ConversationDataset(recs, model.tokenizer, model.cfg, n_tokens, load, rep)
    return make(records, report), make(eval_records, eval_report)


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


def round_train_loss(log_history: list[dict], start: int, end: int, this_run: float) -> float:
    """The mean loss over the round's steps 1..end. A run resumed at `start` reports (`TrainOutput`) the
    mean over start+1..end only; steps 1..start come from the checkpoint's logged losses (each the mean
    over its logging window; exact when the checkpoint step is a logging step, as with the defaults)."""
    total, last = 0.0, 0
    for h in log_history:
        if "loss" in h and last < h["step"] <= start:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    if start > 0 and end <= start and last:  # nothing trained in this run: the checkpoint's losses alone
        return total / last
    if start <= 0 or end <= start or last == 0:
        return this_run
    return (total / last * start + this_run * (end - start)) / end


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


def finetune(cfg: MMFTConfig, run: RunArguments, targs: TrainingArguments, callbacks: list | None = None,
             evaluate: Callable[[MultimodalModel], dict] | None = None) -> tuple[Path, dict]:
    """Train one round; return (round folder, round info).

    `cfg` is the model of a new round (ignored with `run.resume_round`: the round's own config wins).
    `evaluate(model)`, if given, runs on the main process after training; its dict is the round's
    `metrics` (in `config.json`, `metrics.json` and the model card's history)."""
    if Path(targs.output_dir).exists() and not Path(targs.output_dir).is_dir():
        raise DataError(f"--output_dir {targs.output_dir} is a file, not a folder")
    if targs.max_steps <= 0 and targs.num_train_epochs <= 0:  # else a "finished" round of 0 steps, loss 0.0
        raise DataError(f"nothing to train: --num_train_epochs {targs.num_train_epochs:g} and no --max_steps")
    if run.resume_round:
        cfg, continued = round_config(check_round_folder(run.resume_round))
    number = int(continued.get("round", 0)) + 1 if run.resume_round else 1
    done = Path(targs.output_dir) / f"round-{number}"
    if _finished_round(done):  # a finished round, which this run would overwrite
        raise DataError(f"{done} already holds a trained round {number}: choose another --output_dir "
                        "(or --resume_round it for the next round; delete it to train it again)")
    cache = FeatureCache(run.feature_cache) if run.feature_cache else None
    if cache is not None and not run.resume_round:
        cfg = pin_revisions(cfg)  # the commit CLIP will load at, as the cache recorded its own
    if cache is not None:
        cache.check(cfg)
    if run.init_projector and not run.resume_round:  # its shapes are checked on load; what it saw, here
        built = round_config(check_round_folder(run.init_projector))[0].feature_choice
        if built != cfg.feature_choice:
            raise DataError(f"--init_projector {run.init_projector} was trained on {describe_features(built)}, but "
                            f"this run uses {describe_features(cfg.feature_choice)}: train it with the same features")
    # Data errors surface before any model is loaded.
    records, eval_records, report, eval_report = read_data(run, cache)
    set_seed(targs.seed)  # LoRA and projector initialisation, before the Trainer seeds itself
    model, parent = prepare_model(cfg, run, targs.device, cache.feature_dim if cache else None, training_dtype(targs))
    train_set, eval_set = make_datasets(records, eval_records, report, eval_report, run, model, cache)
    print(report.summary() if eval_report is report else f"training: {report.summary()}\n"
                                                        f"evaluation: {eval_report.summary()}")
    if not (run.resume_round or run.init_projector):
        match_projector_scale(model, train_set)

    collator = Collator(model.tokenizer.pad_token_id, run.pad_to_length)
    trainer = MMFTTrainer(model=model, args=targs, train_dataset=train_set, eval_dataset=eval_set,
                          data_collator=collator, projector_lr=run.projector_lr, round_number=number,
                          callbacks=callbacks)
    resume = targs.resume_from_checkpoint
    if resume in ("last", "True", "true"):
        resume = last_complete_checkpoint(targs.output_dir, number, set(model.trained_state_dict()))
        if resume is None:
            logger.warning("no complete checkpoint in %s: starting from step 0", targs.output_dir)
    # the step it resumes at (read now: the checkpoint may be rotated away during training)
    state = Path(resume) / TRAINER_STATE if resume else None
    start = json.loads(state.read_text())["global_step"] if state is not None and state.is_file() else 0
    if resume and 0 < targs.max_steps <= start:
        # stopped after its last step (in the final evaluation or save): train() would take one step more
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(state))
        result = TrainOutput(trainer.state.global_step, float("nan"), {})
    else:
        result = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate()

    info = {
        "round": number,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "stage": "projector" if run.projector_only else "finetune",
        # the base LM's precision in training (the card says QLoRA only for a 4-bit base)
        "quantize": "nf4" if getattr(model.lm.get_base_model(), "is_loaded_in_4bit", False) else "none",
        "steps": trainer.state.global_step,
        "samples": len(train_set),
        "samples_seen": trainer.state.global_step * targs.train_batch_size * targs.gradient_accumulation_steps
        * targs.world_size,
        "train_loss": round(round_train_loss(trainer.state.log_history, start, trainer.state.global_step,
                                             result.training_loss), 4),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "eval_loss": round(eval_metrics["eval_loss"], 4),
        "metrics": {},
        "data": {"dataset": run.dataset_name, "train_json": str(run.train_json), "offset": run.data_offset,
                 "limit": run.max_samples, "seed": targs.seed, "skipped": dict(report.skipped),
                 "feature_cache": run.feature_cache,
                 **({"eval_json": str(run.eval_json), "eval_skipped": dict(eval_report.skipped)} if run.eval_json
                    else {})},
        "parent": {"round": parent["round"], "source": str(run.resume_round)} if parent else None,
    }
    if evaluate is not None and trainer.is_world_process_zero():
        was_training = model.training
        model.eval()
        with torch.no_grad():
            info["metrics"] = dict(evaluate(model))
        model.train(was_training)
    info["history"] = parent.get("history", []) + [
        {k: info[k] for k in ("round", "created", "steps", "samples", "train_loss", "eval_loss", "metrics")}
    ]
    if trainer.is_world_process_zero():  # config.json last: it marks the round finished (checked above)
        done.mkdir(parents=True, exist_ok=True)
        history = trainer.state.log_history
        (done / METRICS_NAME).write_text(json.dumps(
            {"train_loss": info["train_loss"], "eval_loss": info["eval_loss"], "eval_metrics": info["metrics"],
             "log_history": history}, indent=1) + "\n")
        plot_loss(history, done / LOSS_PLOT)
        model.save_pretrained(done, info)
    return done, info


def default_training_args(**overrides) -> dict:
    """Our defaults for TrainingArguments (the CLI can override each)."""
    defaults = dict(remove_unused_columns=False, report_to="none", logging_steps=10, save_strategy="steps",
                    save_steps=200, save_total_limit=2, eval_strategy="steps", eval_steps=200,
                    activation_checkpointing=True, max_grad_norm=1.0, lr_scheduler_type="cosine",
                    warmup_steps=0.03, learning_rate=2e-4, per_device_train_batch_size=4,
                    per_device_eval_batch_size=8, dataloader_num_workers=0, seed=42,
                    bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                    dataloader_pin_memory=torch.cuda.is_available(),
                    ddp_find_unused_parameters=False)  # every step touches every trained weight (model.embed)
    defaults.update(overrides)
    return defaults
