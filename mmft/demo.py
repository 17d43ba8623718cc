"""Rebuild the bundled shapes demo from nothing, through the same fine-tuning path as the real model.

1. tiny CLIP + tiny Phi-3 + tokenizer (mmft.testing), the tokenizer trained on shapes text;
2. the tiny base LM learns a language (refining drafts, plain Q&A) — Phi-3.5's pre-training, in small;
3. a shapes data set in the LLaVA-Instruct format, CLIP features cached once;
4. projector + LoRA trained by `mmft.training.finetune` (HF Trainer), exactly as for LLaVA-Instruct;
5. held-out accuracy through the full staged pipeline (draft + refine) on fresh images.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPModel, TrainingArguments
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mmft import shapes
from mmft.config import MMFTConfig, load_config, save_config
from mmft.features import build_cache
from mmft.loading import load_round
from mmft.pipeline import Pipeline
from mmft.testing import build_tiny_models
from mmft.training import DataArguments, ModelArguments, default_training_args, finetune, pretrain_text
from mmft.vision import VisionEncoder

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"


def pretrain_clip(clip_dir: Path, steps: int, batch_size: int = 48, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Brief contrastive pre-training of the tiny CLIP on shapes captions ("red circle").

    A random CLIP keeps colour in its pooled token but loses shape; CLIP ViT-B/32 learnt both from
    400M captioned images, so the stand-in gets a (tiny) version of that. Captions are word ids:
    bos, colour, shape, eos.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).train()
    processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    colors = list(shapes.COLORS)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        pairs = [shapes.sample(rng) for _ in range(batch_size)]
        pixels = processor(images=[shapes.draw(c, s, rng) for c, s in pairs], return_tensors="pt")["pixel_values"]
        ids = torch.tensor([[0, 2 + colors.index(c), 2 + len(colors) + shapes.SHAPES.index(s), 1] for c, s in pairs])
        # identical captions in a batch are true positives too: soft targets over equal captions
        same = (ids[:, None, 1:3] == ids[None, :, 1:3]).all(-1).float()
        out = clip(input_ids=ids, pixel_values=pixels)
        targets = same / same.sum(1, keepdim=True)
        loss = (torch.sum(-targets * out.logits_per_image.log_softmax(-1), -1).mean()
                + torch.sum(-targets * out.logits_per_text.log_softmax(-1), -1).mean()) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    clip.save_pretrained(clip_dir)
    return losses


def build_base(folder: Path, lm_steps: int, clip_steps: int, seed: int = 0) -> MMFTConfig:
    """Tiny models under `folder/lm`, `folder/clip`; the LM taught shapes language, CLIP shapes captions."""
    cfg = build_tiny_models(folder, mode="patch")
    if clip_steps:
        pretrain_clip(folder / "clip", clip_steps, seed=seed)
    pretrain_text(folder / "lm", cfg, shapes.text_corpus(cfg, 4000, seed), steps=lm_steps, seed=seed)
    return cfg


def train_round(base: Path, work: Path, mode: str, samples: int, steps: int, seed: int = 0) -> Path:
    """Shapes data -> feature cache -> `finetune` (the real training path) -> round folder."""
    data = work / "data"
    train_json = shapes.write_dataset(data, samples, seed=seed + 1)
    cfg = MMFTConfig(lm_model_id=str(base / "lm"), vit_model_id=str(base / "clip"), vit_feature_mode=mode)
    vision = VisionEncoder.from_pretrained(cfg.vit_model_id, mode, cfg.vit_max_pixels)
    names = [r["image"] for r in json.loads(train_json.read_text())]
    build_cache(vision, cfg.vit_model_id, data / "images", names, work / f"cache-{mode}")
    margs = ModelArguments(lm_model_id=cfg.lm_model_id, vit_model_id=cfg.vit_model_id, vit_feature_mode=mode,
                           lora_r=8, lora_alpha=16, lora_dropout=0.0, projector_lr=3e-3, quantize="no")
    dargs = DataArguments(train_json=str(train_json), image_dir=str(data / "images"), eval_fraction=0.05,
                          feature_cache=str(work / f"cache-{mode}"), eval_shapes_accuracy=60,
                          dataset_name="synthetic shapes world (mmft.shapes)")
    targs = TrainingArguments(**default_training_args(
        output_dir=str(work / f"runs-{mode}"), max_steps=steps, learning_rate=3e-3, per_device_train_batch_size=16,
        eval_steps=max(steps // 4, 1), save_steps=steps, logging_steps=max(steps // 20, 1), seed=seed,
        disable_tqdm=True, activation_checkpointing=False))
    folder, _ = finetune(margs, dargs, targs)
    return folder


def relocate(round_dir: Path, dest: Path, base_rel: str) -> Path:
    """Copy a round next to its base models, naming them relative to the round (`../base/lm`)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(round_dir, dest)
    cfg, info = load_config(dest)
    cfg.lm_model_id, cfg.vit_model_id = f"{base_rel}/lm", f"{base_rel}/clip"
    save_config(dest, cfg, info)
    return dest


def build_demo(out: Path = DEMO_DIR, modes=("patch", "pooled"), samples: int = 3000, steps: int = 600,
               lm_steps: int = 500, clip_steps: int = 400, eval_n: int = 200, seed: int = 0) -> dict:
    """The whole rebuild; returns held-out metrics per mode and stage times. `out/round` is the first mode's."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    results = {"seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if (out / "base").exists():
            shutil.rmtree(out / "base")
        build_base(out / "base", lm_steps, clip_steps, seed)
        results["seconds"]["base"] = round(time.time() - start, 1)
        for i, mode in enumerate(modes):
            t = time.time()
            folder = train_round(out / "base", work, mode, samples, steps, seed)
            dest = relocate(folder, out / ("round" if i == 0 else f"round-{mode}"), "../base")
            model, info = load_round(dest, device="cpu", dtype=torch.float32)
            metrics = shapes.evaluate(Pipeline(model), n=eval_n, seed=seed + 10_000)
            results[mode] = {k: metrics[k] for k in ("color_accuracy", "shape_accuracy")}
            results[mode].update(eval_loss=info["eval_loss"], steps=info["steps"], examples=metrics["examples"])
            results["seconds"][mode] = round(time.time() - t, 1)
    results["seconds"]["total"] = round(time.time() - start, 1)
    return results
