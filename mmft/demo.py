"""Rebuild the bundled shapes demo from nothing, through the same fine-tuning path as the real model.

1. tiny CLIP + tiny Phi-3 + tokenizer (mmft.testing);
2. the tiny CLIP learns shapes captions, the tiny base LM a language: rewriting imperfect drafts into
   sentences and plain Q&A (`mmft.demo_text`) — Phi-3.5's pre-training, in small;
3. a shapes data set in the LLaVA-Instruct format, CLIP features cached once;
4. projector + LoRA trained by `mmft.training.finetune` (HF Trainer), exactly as for LLaVA-Instruct;
5. accuracy per question kind through the full staged pipeline (draft + refine) on fresh images,
   in-distribution and held-out (phrasings and image styles training never saw).
With two workers (one per core) the LM pre-trains beside the CLIP pre-training and the feature
caches, then the two rounds train and are evaluated side by side.
Everything here exists only for the demo; `mmft.training` knows nothing of it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import CLIPModel, Phi3ForCausalLM, TrainingArguments
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mmft import shapes
from mmft.config import MMFTConfig, RunArguments, load_config, save_config
from mmft.demo_text import fit, pretrain_text, refine_corpus
from mmft.features import INDEX_NAME, build_cache
from mmft.loading import load_round
from mmft.pipeline import Pipeline
from mmft.quantize import activation_bits, int8_linears
from mmft.round import ADAPTER_DIR, METRICS_NAME, without_local_paths
from mmft.testing import make_clip, make_lm, make_tokenizer
from mmft.training import default_training_args, finetune
from mmft.vision import VisionEncoder

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
BASE_REL = "../base"  # where a demo round finds its base models, relative to itself


def pretrain_clip(clip_dir: Path, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                  pool: int = 6000) -> list[float]:
    """Brief contrastive pre-training of the tiny CLIP on shapes captions ("red circle").

    A random CLIP keeps colour in its pooled token but loses shape; CLIP ViT-B/32 learnt both from
    400M captioned images, so the stand-in gets a (tiny) version of that. Captions are word ids:
    bos, colour, shape, eos. Images: a pool drawn once in `shapes.CLIP_STYLE`, preprocessed once.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).train()
    processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    colors = list(shapes.COLORS)
    pairs = [shapes.sample(rng) for _ in range(pool)]
    images = [shapes.draw(c, s, rng, size=None, style=shapes.CLIP_STYLE) for c, s in pairs]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]  # [pool, 3, 56, 56]
    ids = torch.tensor([[0, 2 + colors.index(c), 2 + len(colors) + shapes.SHAPES.index(s), 1] for c, s in pairs])

    def loss_of_batch() -> torch.Tensor:
        pick = torch.tensor(rng.sample(range(pool), batch_size))
        batch_ids = ids[pick]
        # identical captions in a batch are true positives too: soft targets over equal captions
        same = (batch_ids[:, None, 1:3] == batch_ids[None, :, 1:3]).all(-1).float()
        out = clip(input_ids=batch_ids, pixel_values=pixels[pick])
        targets = same / same.sum(1, keepdim=True)
        return (torch.sum(-targets * out.logits_per_image.log_softmax(-1), -1).mean()
                + torch.sum(-targets * out.logits_per_text.log_softmax(-1), -1).mean()) / 2

    losses = fit(clip, steps, lr, loss_of_batch)
    clip.save_pretrained(clip_dir)
    return losses


def init_base(folder: Path, seed: int = 0, hidden: int = 64, clip_hidden: int = 64) -> MMFTConfig:
    """Untrained tiny models under `folder/lm`, `folder/clip`, and the config the pre-trainings use.

    The LM ties its input and output embeddings and is saved in float16: with the real 32,064-id
    vocabulary the two embedding matrices would otherwise be most of the bundle."""
    tokenizer = make_tokenizer()
    config = make_lm(tokenizer, hidden=hidden, seed=seed).config
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    lm = Phi3ForCausalLM(config)
    lm.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(folder / "lm")
    tokenizer.save_pretrained(folder / "lm")
    clip, processor = make_clip(hidden=clip_hidden, seed=seed)
    clip.save_pretrained(folder / "clip")
    processor.save_pretrained(folder / "clip")
    return MMFTConfig(lm_model_id=str(folder / "lm"), vit_model_id=str(folder / "clip"), vit_feature_mode="patch",
                      lora_r=8, lora_alpha=16, lora_dropout=0.0, gen_max_new_tokens=16,
                      prompt_max_question_tokens=64, prompt_max_answer_tokens=64)


def _round_cfg(base: Path, mode: str) -> MMFTConfig:
    return MMFTConfig(lm_model_id=str(base / "lm"), vit_model_id=str(base / "clip"), vit_feature_mode=mode,
                      vit_feature_layer=-1, vit_feature_select_strategy="full",  # as the bundled rounds were built
                      lora_r=16, lora_alpha=32, lora_dropout=0.0)


def prepare_features(base: Path, work: Path, modes, samples: int, seed: int = 0) -> None:
    """The shapes data set under `work/data` and each mode's CLIP feature cache (what is missing).
    Needs only the pre-trained CLIP, so it can run while the LM still pre-trains."""
    data = work / "data"
    if not (data / "train.json").exists():
        shapes.write_dataset(data, samples, seed=seed + 1)
    names = [r["image"] for r in json.loads((data / "train.json").read_text())]
    for mode in modes:
        if not (work / f"cache-{mode}" / INDEX_NAME).exists():
            cfg = _round_cfg(base, mode)
            vision = VisionEncoder.from_config(cfg)
            build_cache(vision, cfg.vit_model_id, data / "images", names, work / f"cache-{mode}")


def train_round(base: Path, work: Path, mode: str, samples: int, steps: int, seed: int = 0,
                batch_size: int = 16) -> Path:
    """Shapes data -> feature cache -> `finetune` (the real training path) -> round folder."""
    prepare_features(base, work, [mode], samples, seed)
    data = work / "data"
    run = RunArguments(train_json=str(data / "train.json"), image_dir=str(data / "images"), eval_fraction=0.05,
                       feature_cache=str(work / f"cache-{mode}"), projector_lr=3e-3, quantize="none",
                       dataset_name="synthetic shapes world (mmft.shapes)")
    targs = TrainingArguments(**default_training_args(
        output_dir=str(work / f"runs-{mode}"), max_steps=steps, learning_rate=3e-3,
        per_device_train_batch_size=batch_size,
        eval_steps=max(steps // 4, 1), save_steps=steps, logging_steps=max(steps // 20, 1), seed=seed,
        disable_tqdm=True, activation_checkpointing=False, prediction_loss_only=True))
    folder, _ = finetune(_round_cfg(base, mode), run, targs)
    return folder


def relocate(round_dir: Path, dest: Path, base_rel: str) -> Path:
    """Copy a round next to its base models, naming them relative to the round (`../base/lm`), with no
    path of the build machine left in it: not in config.json's round info, not in the adapter's config
    (its base, for information only: loading passes the base) and no PEFT stub card naming it."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(round_dir, dest)
    cfg, info = load_config(dest)
    cfg.lm_model_id, cfg.vit_model_id = f"{base_rel}/lm", f"{base_rel}/clip"
    save_config(dest, cfg, without_local_paths(info))
    adapter_config = dest / ADAPTER_DIR / "adapter_config.json"
    adapter = json.loads(adapter_config.read_text())
    adapter["base_model_name_or_path"] = cfg.lm_model_id
    adapter_config.write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n")
    (dest / ADAPTER_DIR / "README.md").unlink(missing_ok=True)
    return dest


def evaluate_round(folder: Path, n: int, n_indist: int, seed: int) -> dict:
    """Held-out, independent-wording and in-distribution evaluation of a round folder, recorded in its
    config.json (the model card's table: unprefixed = held-out, `independent_` = the same held-out
    pictures asked in an independent writer's wordings, `indist_` = training phrasings and image style,
    `heldout_frames_` / `heldout_synonyms_` = the held-out questions no model saw / only the base LM's
    text saw) and metrics.json (everything, with examples, and how the round was loaded: int8 answers
    move a little with the activations' bits, `mmft.quantize.activation_bits`)."""
    model, _ = load_round(folder, device="cpu", dtype=torch.float32)
    int8 = bool(int8_linears(model.lm))
    loaded = dict(device="cpu", dtype="float32", quantize="int8" if int8 else "none",
                  **({"int8_activation_bits": activation_bits()} if int8 else {}))
    pipe = Pipeline(model)
    with torch.no_grad():
        heldout = shapes.evaluate(pipe, n=n, seed=seed, split="heldout")
        independent = shapes.evaluate(pipe, n=n, seed=seed, split="independent")  # the same pictures
        indist = shapes.evaluate(pipe, n=n_indist, seed=seed + 1, split="train")
    flat = {}
    for prefix, result in (("", heldout), ("independent_", independent), ("indist_", indist)):
        flat.update({f"{prefix}{k}_accuracy": v for k, v in shapes.summary(result).items() if k != "refine_damage"})
        flat[f"{prefix}refine_damage"] = result["refine_damage"]
    for family, figures in sorted(heldout.get("by_family", {}).items()):  # unseen frames / base-LM-only synonyms
        flat[f"heldout_{family}s_accuracy"] = figures["accuracy"]
    cfg, info = load_config(folder)
    info["metrics"] = flat
    info["data"] = {**info.get("data", {}), "synthetic": True}
    if info.get("history"):
        info["history"][-1]["metrics"] = flat
    save_config(folder, cfg, info)
    metrics_path = folder / METRICS_NAME
    record = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    record["eval_metrics"] = flat
    record["evaluated_with"] = loaded
    record["shapes_eval"] = {"heldout": heldout, "independent": independent, "in_distribution": indist}
    metrics_path.write_text(json.dumps(record, indent=1) + "\n")
    return record["shapes_eval"]


def round_job(base: Path, work: Path, mode: str, samples: int, steps: int, seed: int, batch_size: int,
              dest: Path, eval_n: int, indist_n: int, eval_seed: int) -> tuple[dict, float]:
    """Train one feature mode's round, move it to `dest` beside the base, evaluate it."""
    folder, seconds = _timed(train_round, (base, work, mode, samples, steps, seed, batch_size), {})
    relocate(folder, dest, BASE_REL)
    return evaluate_round(dest, eval_n, indist_n, eval_seed), seconds


def _one_worker() -> None:
    from transformers.utils import logging as hf_logging
    torch.set_num_threads(1)
    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()


@contextmanager
def worker_pool(workers: int):
    """`workers` spawned processes of one thread each (None for 1: jobs then run here, in order).

    The models are so small that a second thread speeds a step up by 0-30 %, while a second process
    doubles the throughput (`build_demo` says what runs beside what); one thread whatever the core
    count, so a bigger machine computes as the 2-core build does. Spawned, not forked (no fork of a
    process holding torch threads); one pool per build, so torch is imported once per worker."""
    if workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_worker) as pool:
        yield pool


def _timed(fn, args, kwargs) -> tuple:
    t = time.time()
    return fn(*args, **kwargs), round(time.time() - t, 1)


def submit(pool: ProcessPoolExecutor | None, fn, *args, **kwargs) -> Future:
    """`fn` in `pool`, or here and now for None; either way a Future of (result, seconds)."""
    if pool is not None:
        return pool.submit(_timed, fn, args, kwargs)
    done = Future()
    done.set_result(_timed(fn, args, kwargs))
    return done


def _cores() -> int:
    """The cores this process may run on (all of them where the OS cannot say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """One process per core, at most one per job (two pre-trainings, two rounds)."""
    return max(1, min(2, _cores()))


def _reads_base(folder: Path) -> bool:
    """Whether `folder` is a round on the demo's "../base" (an earlier build's, say with other --modes)."""
    try:
        return load_config(folder)[0].lm_model_id == f"{BASE_REL}/lm"
    except (OSError, ValueError):  # not a round (no config.json, or not one that reads)
        return False


def move_in(stage: Path, out: Path) -> None:
    """A finished build's base and rounds into `out`. Old rounds go first, then the base, then the new
    rounds: a kill in between leaves rounds missing (a re-run builds them), never an old round reading the
    new "../base" (it would answer nonsense), whichever rounds either build made."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if _reads_base(old):
            shutil.rmtree(old)
    for part in sorted(stage.iterdir(), key=lambda p: p.name != "base"):
        shutil.rmtree(out / part.name, ignore_errors=True)
        part.rename(out / part.name)
    stage.rmdir()


def build_demo(out: Path = DEMO_DIR, modes=("patch", "pooled"), samples: int = 4000, steps: int = 900,
               lm_steps: int = 800, clip_steps: int = 1200, eval_n: int = 300, indist_n: int = 100,
               seed: int = 0, workers: int | None = None, batch_size: int = 16, lm_batch_size: int = 32,
               eval_seed: int | None = None) -> dict:
    """The whole rebuild; returns metrics per mode and stage times. `out/round` is the first mode's.
    `eval_seed` (default `seed + 10_000`) draws the evaluation's images and questions. Built in
    `out.partial` and moved into `out` at the end: a build that fails or is interrupted before then
    leaves `out` as it was (a new base under old rounds would answer nonsense)."""
    eval_seed = seed + 10_000 if eval_seed is None else eval_seed
    start = time.time()
    workers = default_workers() if workers is None else workers
    stage = out.parent / (out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)  # left by an interrupted build: start again
    stage.mkdir(parents=True)
    results = {"seconds": {}, "workers": workers}
    with tempfile.TemporaryDirectory() as tmp, worker_pool(workers) as pool:
        work, base = Path(tmp), stage / "base"
        cfg = init_base(base, seed)
        # two processes: [LM pre-training | CLIP pre-training, then data + feature caches], then a round each
        lm = submit(pool, pretrain_text, base / "lm", cfg, refine_corpus(cfg, 6000, seed), steps=lm_steps,
                    batch_size=lm_batch_size, seed=seed)
        if clip_steps:
            clip = submit(pool, pretrain_clip, base / "clip", clip_steps, seed=seed)
            results["seconds"]["base_clip"] = clip.result()[1]
        data = submit(pool, prepare_features, base, work, modes, samples, seed)
        results["seconds"].update(data=data.result()[1], base_lm=lm.result()[1], base=round(time.time() - start, 1))
        rounds = [submit(pool, round_job, base, work, mode, samples, steps, seed, batch_size,
                         stage / ("round" if i == 0 else f"round-{mode}"), eval_n, indist_n, eval_seed)
                  for i, mode in enumerate(modes)]
        for mode, future in zip(modes, rounds):
            (metrics, train_s), total_s = future.result()
            results[mode] = metrics
            results["seconds"].update({f"{mode}_train": train_s, f"{mode}_eval": round(total_s - train_s, 1)})
    move_in(stage, out)
    results["seconds"]["total"] = round(time.time() - start, 1)
    return results
