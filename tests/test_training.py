"""Training through the real path (HF Trainer): rounds, projector stage, feature cache, crash resume, DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from mmft import loading, shapes
from mmft.config import MMFTConfig, RunArguments
from mmft.features import FeatureCache, build_cache
from mmft.training import default_training_args, finetune
from mmft.vision import VisionEncoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return shapes.write_dataset(folder, 160, seed=3), folder / "images"


def _args(tiny_dir, data, out, steps=12, mode="patch", **extra):
    """(MMFTConfig, RunArguments, TrainingArguments): how any caller builds a run programmatically."""
    train_json, images = data
    cfg = MMFTConfig(lm_model_id=str(tiny_dir / "lm"), vit_model_id=str(tiny_dir / "clip"), vit_feature_mode=mode,
                     lora_r=8, lora_alpha=16, lora_dropout=0.0,
                     **{k: v for k, v in extra.items() if k in MMFTConfig.__dataclass_fields__})
    run = RunArguments(train_json=str(train_json), image_dir=str(images), eval_fraction=0.1, max_eval_samples=16,
                       projector_lr=3e-3, **{k: v for k, v in extra.items() if k in RunArguments.__dataclass_fields__})
    training = dict(output_dir=str(out), max_steps=steps, learning_rate=3e-3, per_device_train_batch_size=8,
                    eval_steps=steps // 2, save_steps=steps // 2, logging_steps=2, disable_tqdm=True,
                    activation_checkpointing=True, seed=7)
    training.update({k: v for k, v in extra.items() if k in TrainingArguments.__dataclass_fields__})
    targs = TrainingArguments(**default_training_args(**training))
    return cfg, run, targs


def _trained(folder):
    weights = {f"projector.{k}": v for k, v in load_file(str(folder / "projector.safetensors")).items()}
    adapter = folder / "adapter" / "adapter_model.safetensors"
    if adapter.exists():
        weights.update({f"lora.{k}": v for k, v in load_file(str(adapter)).items()})
    return weights


def test_round_folder_and_eval_loss_goes_down(tiny_dir, shapes_data, tmp_path):
    folder, info = finetune(*_args(tiny_dir, shapes_data, tmp_path, steps=20, eval_on_start=True))
    assert folder == tmp_path / "round-1"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.json", "loss.png",
            "metrics.json", "projector.safetensors"} <= set(names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((folder / "metrics.json").read_text())
    evals = [h["eval_loss"] for h in metrics["log_history"] if "eval_loss" in h]
    assert evals[-1] < evals[0]  # step-0 eval vs the end
    config = json.loads((folder / "config.json").read_text())
    assert config["round"]["round"] == 1 and config["round"]["steps"] == 20 and config["round"]["parent"] is None
    assert config["round"]["samples"] == 144 and len(config["round"]["history"]) == 1
    assert config["mmft"]["vit_feature_mode"] == "patch"


def test_next_round_continues_the_last_and_records_lineage(tiny_dir, shapes_data, tmp_path):
    first, _ = finetune(*_args(tiny_dir, shapes_data, tmp_path / "r1", steps=6))
    second, info = finetune(*_args(tiny_dir, shapes_data, tmp_path / "r2", steps=6, resume_round=str(first),
                                   data_offset=80))
    assert second.name == "round-2" and info["round"] == 2
    assert info["parent"] == {"round": 1, "source": str(first)}
    assert [h["round"] for h in info["history"]] == [1, 2]
    assert info["data"]["offset"] == 80
    a, b = _trained(first), _trained(second)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert not (second / "model.safetensors").exists()  # never the merged base


def test_projector_stage_round_loads_continues_publishes_and_seeds(tiny_dir, shapes_data, tmp_path, hub_online):
    from mmft.hub import list_rounds, plan_upload, publish
    from mmft.loading import load_round
    from mmft.training import prepare_model

    stage1, info = finetune(*_args(tiny_dir, shapes_data, tmp_path / "s1", steps=6, projector_only=True))
    assert info["stage"] == "projector"
    # a complete round whose adapter is LoRA's untrained one: B = 0, so it changes nothing
    lora = load_file(str(stage1 / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k for k in lora) and all(not v.any() for k, v in lora.items() if "lora_B" in k)
    model, round_info = load_round(stage1, device="cpu", dtype=torch.float32)
    for key, value in load_file(str(stage1 / "projector.safetensors")).items():
        assert torch.equal(model.projector.state_dict()[key], value)
    assert round_info["stage"] == "projector"
    # publishes (to the local Hub stand-in) ...
    assert info["quantize"] == "none"  # recorded: the card says QLoRA only for a 4-bit base
    upload = plan_upload(stage1, "me/stage1")
    assert "trained the projector alone" in upload.card.text and "QLoRA" not in upload.card.text
    published = publish(upload)
    assert list_rounds("me/stage1") == [("round-1", published.commit_id)]
    # ... continues as round 2 ...
    second, info2 = finetune(*_args(tiny_dir, shapes_data, tmp_path / "s2", steps=2, resume_round=str(stage1)))
    assert info2["round"] == 2 and info2["parent"]["round"] == 1 and info2["stage"] == "finetune"
    # ... and seeds a new round's projector, with LoRA trainable there
    cfg, run, _ = _args(tiny_dir, shapes_data, tmp_path / "s3", steps=2, init_projector=str(stage1))
    model, _ = prepare_model(cfg, run, "cpu", None)
    seeded = model.projector.state_dict()
    for key, value in load_file(str(stage1 / "projector.safetensors")).items():
        assert torch.equal(seeded[key], value)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("projector.") for n in trainable) and any("lora_" in n for n in trainable)


def test_feature_cache_trains_exactly_like_on_the_fly_clip_without_image_files(tiny_dir, shapes_data, tmp_path,
                                                                             monkeypatch):
    train_json, images = shapes_data
    vision = VisionEncoder.from_pretrained(str(tiny_dir / "clip"), "patch", 10**8, dtype=torch.float32)  # LLaVA's choice
    names = [r["image"] for r in json.loads(train_json.read_text())]
    (images / "broken.png").write_bytes(b"nope")
    index = build_cache(vision, str(tiny_dir / "clip"), images, names + ["broken.png"], tmp_path / "cache",
                        shard_size=64)
    assert len(index["files"]) == 160 and list(index["unreadable"]) == ["broken.png"]
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 3
    cache = FeatureCache(tmp_path / "cache")
    assert cache[names[0]].shape == (49, 32)  # 7x7 patches, CLS dropped
    # Exact: the cache holds bit for bit what CLIP computes for the same images in the same batch
    # (build_cache encodes the sorted names 32 at a time; broken.png sorts first, so the first batch holds 31
    # good pictures). The same batch matters: MKL's AVX2 sgemm (AMD) gives a row other bits in a batch of 32
    # than in one of 31 (up to 4.8e-7 apart); its AVX-512 path happened not to.
    first = sorted(names)[:31]
    with torch.no_grad():
        features = vision(torch.cat([vision.preprocess([images / n]) for n in first])).float()  # [31, 49, 32]
    for j, name in enumerate(first):
        assert torch.equal(cache[name], features[j]), name

    # Training from the cache vs CLIP on the fly, both in float32: pick_dtype would pick bf16 on a CPU
    # with native bf16, and the cache holds float32 features, so bf16 CLIP would differ by design.
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: False)
    # the cached run sees no image folder at all
    cached, cached_info = finetune(*_args(tiny_dir, (train_json, tmp_path / "no-images"), tmp_path / "c", steps=4,
                                          feature_cache=str(tmp_path / "cache")))
    live, live_info = finetune(*_args(tiny_dir, shapes_data, tmp_path / "l", steps=4))
    assert cached_info["samples"] == live_info["samples"] == 144
    losses = [[(h["step"], h[k]) for h in json.loads((f / "metrics.json").read_text())["log_history"]
               for k in ("train_loss", "eval_loss") if k in h] for f in (cached, live)]
    assert [s for s, _ in losses[0]] == [s for s, _ in losses[1]] == [2, 4, 4, 4]  # evals at 2, 4; train; final eval
    # Unrounded losses. On the fly, CLIP sees the training batches (8 images), not the cache's 32:
    # same float32 math, but the GEMM blocking may differ with the batch shape (AVX-512/AMX kernels),
    # so features may differ in the last ulp (~1e-7 relative). Loss changes scale with the feature
    # change: bf16 CLIP (~4e-3 relative, 2^15 times more) moves the eval loss by 7.6e-6 relative
    # (measured with cpu_has_bf16 True on an AVX-512 Xeon; 2.2e-5 on an AMX Xeon with the old kit), so
    # float32 noise stays < 1e-9: rel=1e-6 leaves >1000x margin and still catches bf16-precision
    # features, let alone wrong ones.
    for (_, a), (_, b) in zip(*losses):
        assert a == pytest.approx(b, rel=1e-6)


def test_mismatched_feature_cache_is_refused(tiny_dir, shapes_data, tmp_path):
    from mmft.data import DataError

    vision = VisionEncoder.from_pretrained(str(tiny_dir / "clip"), "pooled", 10**8)
    build_cache(vision, str(tiny_dir / "clip"), shapes_data[1], ["train-00000.png"], tmp_path / "cache")
    with pytest.raises(DataError, match=r"built with CLIP .* in 'pooled' mode, but this run uses .* in 'patch' mode"):
        finetune(*_args(tiny_dir, shapes_data, tmp_path / "x", steps=2, feature_cache=str(tmp_path / "cache")))
    # same CLIP and mode, other layer / CLS choice: refused too
    vision = VisionEncoder.from_pretrained(str(tiny_dir / "clip"), "patch", 10**8, feature_layer=-1,
                                           select_strategy="full")
    build_cache(vision, str(tiny_dir / "clip"), shapes_data[1], ["train-00000.png"], tmp_path / "cache-full")
    with pytest.raises(DataError, match=r"'patch' mode \(layer -1, 'full'\), but this run uses .*\(layer -2, 'default'\)"):
        finetune(*_args(tiny_dir, shapes_data, tmp_path / "y", steps=2, feature_cache=str(tmp_path / "cache-full")))
    # a patch cache for a pooled run: the cache is described by its own choice (it has a layer, the run not)
    with pytest.raises(DataError, match=r"'patch' mode \(layer -1, 'full'\), but this run uses .* in 'pooled' mode; "
                                        r"rebuild it"):
        finetune(*_args(tiny_dir, shapes_data, tmp_path / "z", steps=2, mode="pooled",
                        feature_cache=str(tmp_path / "cache-full")))


def test_an_interrupted_cache_build_is_never_served_and_damage_is_named(tiny_dir, shapes_data, tmp_path):
    from mmft.data import DataError

    names = [f"train-{i:05d}.png" for i in range(4)]
    pooled = VisionEncoder.from_pretrained(str(tiny_dir / "clip"), "pooled", 10**8)
    build_cache(pooled, str(tiny_dir / "clip"), shapes_data[1], names, tmp_path / "cache", shard_size=2)
    assert FeatureCache(tmp_path / "cache")[names[0]].shape == (1, pooled.feature_dim)
    patch = VisionEncoder.from_pretrained(str(tiny_dir / "clip"), "patch", 10**8)
    calls = []

    def dies_on_the_second_shard(pixels):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the first shard was rewritten
        return VisionEncoder.forward(patch, pixels)

    patch.forward = dies_on_the_second_shard
    with pytest.raises(KeyboardInterrupt):
        build_cache(patch, str(tiny_dir / "clip"), shapes_data[1], names, tmp_path / "cache", shard_size=2, batch_size=2)
    with pytest.raises(DataError, match="cache.json not found: build the cache"):  # not the old index over new shards
        FeatureCache(tmp_path / "cache")
    patch.forward = lambda pixels: VisionEncoder.forward(patch, pixels)
    build_cache(patch, str(tiny_dir / "clip"), shapes_data[1], names, tmp_path / "cache", shard_size=2)  # re-run
    assert FeatureCache(tmp_path / "cache")[names[3]].shape == (patch.num_tokens, patch.feature_dim)

    shard = tmp_path / "cache" / "features-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # cut short under a complete index
    with pytest.raises(DataError, match=r"features-00001.safetensors is 100 bytes, the index says \d+ bytes"):
        FeatureCache(tmp_path / "cache")
    (tmp_path / "cache" / "cache.json").write_text("[]")
    with pytest.raises(DataError, match="cache.json is not a feature cache index"):
        FeatureCache(tmp_path / "cache")


def test_a_projector_trained_on_other_features_is_refused_before_training(tiny_dir, shapes_data, tmp_path):
    from mmft.data import DataError

    first, _ = finetune(*_args(tiny_dir, shapes_data, tmp_path / "r1", steps=2, vit_feature_layer=-1))
    with pytest.raises(DataError, match=r"--init_projector .* was trained on .*\(layer -1, 'default'\), but this run "
                                        r"uses .*\(layer -2, 'default'\)"):
        finetune(*_args(tiny_dir, shapes_data, tmp_path / "r2", steps=2, init_projector=str(first)))
    assert not (tmp_path / "r2").exists()


def test_a_run_without_evaluation_records_stops_before_loading_anything(tiny_dir, shapes_data, tmp_path):
    from mmft.data import DataError

    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps([{"id": "1", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]}]))
    with pytest.raises(DataError, match=f"^{eval_json}: no usable evaluation records"):
        finetune(*_args(tiny_dir, shapes_data, tmp_path / "out", steps=2, eval_json=str(eval_json)))
    assert not (tmp_path / "out").exists()  # refused before any model was loaded or step trained


def test_a_finished_round_is_never_trained_over(tiny_dir, shapes_data, tmp_path):
    """A second run into the same --output_dir (a "next round" that forgot --resume_round) silently replaced
    round-1 and its checkpoints; it is refused before any model is loaded."""
    from mmft.data import DataError

    first, _ = finetune(*_args(tiny_dir, shapes_data, tmp_path, steps=2, lora_target_modules=["qkv_proj"]))
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert {"metrics.json", "loss.png", "config.json"} <= {p.name for p in before}
    with pytest.raises(DataError, match=r"round-1 already holds a trained round 1: choose another --output_dir"):
        finetune(*_args(tiny_dir, shapes_data, tmp_path, steps=2))
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    second, info = finetune(*_args(tiny_dir, shapes_data, tmp_path, steps=2, resume_round=str(first)))
    assert second == tmp_path / "round-2" and info["round"] == 2  # the next round goes beside it


def test_a_round_whose_config_was_cut_short_is_finished_by_the_rerun(tiny_dir, shapes_data, tmp_path):
    """A kill while config.json (the finished mark) was written left half a file; every re-run was refused as
    "already holds a trained round", a round nothing could load. Now it is written whole or not at all, and
    one that does not read is no finished round."""
    from mmft.config import load_config

    first, _ = finetune(*_args(tiny_dir, shapes_data, tmp_path, steps=2, save_steps=2))
    config = first / "config.json"
    config.write_text(config.read_text()[:300])  # as a kill mid-write left it before
    again, info = finetune(*_args(tiny_dir, shapes_data, tmp_path, steps=2, save_steps=2,
                                  resume_from_checkpoint="last"))
    assert again == first and load_config(again)[1]["round"] == 1 and not (first / "config.json.partial").exists()


def test_a_checkpoint_rewritten_in_place_reads_torn_until_it_is_whole(tiny_dir, shapes_data, tmp_path, monkeypatch):
    """A run started again from step 0 writes checkpoint-2 into the old folder; killed after the new weights, the
    folder still had the old trainer_state.json, read as complete, and `last` crashed on it at every re-run."""
    from mmft.training import MMFTTrainer, is_complete_checkpoint

    finetune(*_args(tiny_dir, shapes_data, tmp_path, steps=4, save_steps=2))
    shutil.rmtree(tmp_path / "round-1")
    shutil.rmtree(tmp_path / "checkpoint-4")  # as if killed at step 3
    assert is_complete_checkpoint(tmp_path / "checkpoint-2")

    def killed(self, output_dir):
        raise KeyboardInterrupt("killed while writing the optimizer state")

    monkeypatch.setattr(MMFTTrainer, "_save_optimizer_and_scheduler", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(*_args(tiny_dir, shapes_data, tmp_path, steps=4, save_steps=2))  # from step 0, no resume
    assert not is_complete_checkpoint(tmp_path / "checkpoint-2")
    monkeypatch.undo()
    folder, info = finetune(*_args(tiny_dir, shapes_data, tmp_path, steps=4, save_steps=2,
                                   resume_from_checkpoint="last"))
    assert info["steps"] == 4 and (folder / "config.json").is_file()


def test_rounds_with_other_windows_never_train_on_each_others_evaluation_pictures(tmp_path):
    """The evaluation split is by picture: round 2, reading a window that overlaps round 1's, holds out the
    pictures round 1 held out and never trains on them (a seeded shuffle per window did)."""
    from mmft.training import read_data

    conversation = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    raw = [{"id": str(i), "image": f"{i // 2}.png", "conversations": conversation} for i in range(400)]
    train_json = tmp_path / "train.json"
    train_json.write_text(json.dumps(raw))  # two conversations per picture, 200 pictures
    rounds = []
    for offset, limit in ((0, 240), (100, 300), (0, None)):
        run = RunArguments(train_json=str(train_json), data_offset=offset, max_samples=limit, eval_fraction=0.1,
                           max_eval_samples=1000)
        train, held, _, _ = read_data(run, FeatureCacheStub())
        rounds.append(({r.image for r in train}, {r.image for r in held}, held))
    for train, _, _ in rounds:
        for _, held, _ in rounds:
            assert not train & held  # no round trains on a picture any round evaluates on
    (_, _, first), (_, _, second), (_, everywhere, _) = rounds
    assert {r.image for r in first} | {r.image for r in second} == everywhere  # the same pictures, held out
    assert 10 <= len(everywhere) <= 32  # about 10 % of the 200 pictures (binomial: 20 +- 4.2)
    assert all(sum(r.image == image for r in rounds[2][2]) == 2 for image in everywhere)  # with both conversations


class FeatureCacheStub:
    """Every picture usable: `read_llava` asks the cache, not the disk."""

    problem = staticmethod(lambda name: None)


def test_a_file_too_small_for_its_fraction_still_holds_one_picture_out(tmp_path):
    from mmft.training import read_data

    conversation = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    train_json = tmp_path / "train.json"
    train_json.write_text(json.dumps([{"id": str(i), "image": f"{i}.png", "conversations": conversation}
                                      for i in range(5)]))
    train, held, _, _ = read_data(RunArguments(train_json=str(train_json), eval_fraction=0.0), FeatureCacheStub())
    assert len(held) == 1 and len(train) == 4 and held[0].image not in {r.image for r in train}
    # ... the whole picture, every conversation about it (the fallback held out one and trained on the rest)
    from mmft.data import Record, split_records

    records = [Record(str(i), f"{i // 3}.png", [("user", "q"), ("assistant", "a")]) for i in range(12)]
    train, held = split_records(records, 0.0, 200)
    assert len(held) == 3 and len({r.image for r in held}) == 1 and not {r.image for r in held} & {r.image for r in train}
    # a file name that is not UTF-8, as Python lists it ("caf\udce9.png"), splits too (it raised UnicodeEncodeError)
    train, held = split_records([Record("1", "caf\udce9.png", [("user", "q")]), Record("2", "b.png", [("user", "q")])],
                                0.5, 10)
    assert len(train) + len(held) == 2


@pytest.mark.parametrize("fields, message", [
    (dict(lora_r=0), "lora_r must be >= 1, got 0"), (dict(lora_dropout=1.5), r"lora_dropout must be in \[0, 1\)"),
    (dict(prompt_max_answer_tokens=0), "prompt_max_answer_tokens must be >= 1"),
    (dict(data_offset=-5), "data_offset must be >= 0, got -5"), (dict(max_samples=-30), "max_samples must be >= 1"),
    (dict(max_eval_samples=0), "max_eval_samples must be >= 1"), (dict(eval_fraction=-1), "eval_fraction must be in"),
    (dict(projector_lr=-1), "projector_lr must be > 0"),
    # a hand-edited config.json: wrong types and values that would fail (or do nothing) much later
    (dict(pipe_refine="false"), "pipe_refine must be bool, got 'false'"), (dict(lora_r=16.5), "lora_r must be int"),
    (dict(lora_alpha=0), "lora_alpha must be > 0"), (dict(gen_top_p=1.5), r"gen_top_p must be in \(0, 1\]"),
    (dict(gen_temperature=0.0), "gen_temperature must be > 0"), (dict(mp_hidden_dim=0), "mp_hidden_dim must be >= 1"),
    (dict(vit_model_id=None), "vit_model_id must be str"), (dict(lm_model_id=" "), "lm_model_id must name a model"),
    (dict(lora_target_modules=[]), "lora_target_modules must name at least one"),
    (dict(pipe_refine_template="{question} {draft} {note}"), r"exactly \{question\} and \{draft\}"),
    (dict(pipe_refine_template="{question} {draft} {"), "not a format string"),
    (dict(pipe_draft=False, pipe_refine=False), "at least one of pipe_draft and pipe_refine"),  # answers nothing
    (dict(resume_round="r/round-1", init_projector="s/round-1"), "--init_projector seeds a new round's"),  # ignored
])
def test_config_values_out_of_range_are_refused_by_name(fields, message):
    from train.finetune import parser_for

    parser_for(MMFTConfig, RunArguments)  # building the CLI's parser rewrites each field's type: checks still hold
    config = MMFTConfig if set(fields) <= set(MMFTConfig.__dataclass_fields__) else RunArguments
    with pytest.raises(ValueError, match=message):
        config(**fields)
    with pytest.raises(ValueError, match="lora_target_modules must be list"):
        MMFTConfig(lora_target_modules=None)


def test_lora_target_modules_split_on_commas_and_spaces():
    assert MMFTConfig(lora_target_modules="qkv_proj o_proj").lora_target_modules == ["qkv_proj", "o_proj"]
    assert MMFTConfig(lora_target_modules=("qkv_proj,o_proj", "down_proj")).lora_target_modules == [
        "qkv_proj", "o_proj", "down_proj"]


def test_a_round_naming_its_bases_relative_to_itself_continues(tiny_dir, shapes_data, tmp_path):
    """The bundled demo's layout: round/config.json names ../base/lm, ../base/clip; run from elsewhere."""
    from mmft.config import load_config, save_config

    first, _ = finetune(*_args(tiny_dir, shapes_data, tmp_path / "r1", steps=2))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "base").symlink_to(tiny_dir, target_is_directory=True)
    shutil.copytree(first, tmp_path / "demo" / "round")
    cfg, info = load_config(tmp_path / "demo" / "round")
    cfg.lm_model_id, cfg.vit_model_id = "../base/lm", "../base/clip"
    save_config(tmp_path / "demo" / "round", cfg, info)
    second, info = finetune(*_args(tiny_dir, shapes_data, tmp_path / "r2", steps=2,
                                   resume_round=str(tmp_path / "demo" / "round")))
    assert info["round"] == 2 and (second / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("content, problem", [(None, "data file not found"), ("", "the data file is empty"),
                                              ('[{"id": "1", "conv', "not valid JSON at line 1.*truncated")])
def test_bad_data_file_is_one_clear_error(tiny_dir, shapes_data, tmp_path, content, problem):
    from mmft.data import DataError

    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=f"^{path}: {problem}"):
        finetune(*_args(tiny_dir, (path, shapes_data[1]), tmp_path / "out", steps=2))


def test_cli_bad_data_file_exits_with_one_line(tiny_dir, tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[{"id": "1", "image": "a.png", "conversations": [{"from": "hum')
    proc = subprocess.run([sys.executable, "-m", "train.finetune", "--lm_model_id", str(tiny_dir / "lm"),
                           "--vit_model_id", str(tiny_dir / "clip"), "--train_json", str(path), "--output_dir",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: not valid JSON at line 1, column 59 (Unterminated string starting at); "
        "is the file truncated? Download or write it again"], proc.stderr[-2000:]


def test_cli_broken_round_config_exits_with_one_line(tiny_dir, shapes_data, tmp_path):
    (tmp_path / "round" / "adapter").mkdir(parents=True)
    for name in ("config.json", "projector.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        (tmp_path / "round" / name).write_text("{}" if name != "config.json" else '{"mmft": {"lora_r": 8')
    proc = subprocess.run([sys.executable, "-m", "train.finetune", "--train_json", str(shapes_data[0]),
                           "--resume_round", str(tmp_path / "round"), "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: {tmp_path / 'round' / 'config.json'}")


def test_cli_help_lists_every_config_field_without_loading_torch():
    code = ("import sys; from train.finetune import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    from dataclasses import fields

    for f in fields(MMFTConfig) + fields(RunArguments):
        assert f"--{f.name}" in out, f.name
    assert "TORCH False" in out


def test_torn_checkpoints_are_never_resumed_from(tmp_path):
    from safetensors.torch import save_file

    from mmft.training import last_complete_checkpoint

    def checkpoint(step, state=True, weights=True):
        folder = tmp_path / f"checkpoint-{step}"
        (folder / "adapter").mkdir(parents=True)  # the old layout's empty adapter/ after a kill
        if weights:
            save_file({"projector.linear_1.weight": torch.ones(2, 2)}, str(folder / "model.safetensors"))
        if state:
            (folder / "trainer_state.json").write_text('{"global_step": %d}' % step)
        return folder

    assert last_complete_checkpoint(tmp_path) is None
    checkpoint(4)
    checkpoint(8, state=False)  # killed before the trainer state was written
    cut = checkpoint(10)
    (cut / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    weights = checkpoint(12, state=True)
    (weights / "model.safetensors").write_bytes((weights / "model.safetensors").read_bytes()[:20])
    checkpoint(6)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")


def test_base_revisions_are_pinned_to_the_hub_commit(tiny_dir, hub_online):
    from huggingface_hub import HfApi

    from mmft.training import pin_revisions

    api = HfApi()
    commits = {}
    for name in ("lm", "clip"):
        api.create_repo(f"base/{name}")
        commits[name] = api.upload_folder(repo_id=f"base/{name}", folder_path=str(tiny_dir / name)).oid
    cfg = pin_revisions(MMFTConfig(lm_model_id="base/lm", vit_model_id="base/clip"))
    assert (cfg.lm_revision, cfg.vit_revision) == (commits["lm"], commits["clip"])
    # a branch or tag the user gave becomes the commit it points to now (both can move); a commit id is kept
    api.create_tag("base/lm", tag="v1", revision=commits["lm"])
    later = api.upload_file(path_or_fileobj=b"main moves on", path_in_repo="later.txt", repo_id="base/lm").oid
    for revision, commit in (("v1", commits["lm"]), ("main", later), (commits["lm"], commits["lm"])):
        assert pin_revisions(MMFTConfig(lm_model_id="base/lm", lm_revision=revision,
                                        vit_model_id=str(tiny_dir / "clip"))).lm_revision == commit, revision
    # local folders have no commit
    local = pin_revisions(MMFTConfig(lm_model_id=str(tiny_dir / "lm"), vit_model_id=str(tiny_dir / "clip")))
    assert (local.lm_revision, local.vit_revision) == (None, None)



def test_a_feature_cache_records_clips_commit_and_refuses_another(tiny_dir, shapes_data, tmp_path, hub_online):
    """train.cache_features records the commit CLIP was loaded at (a branch moves: `main` now); a run whose
    CLIP resolves to another commit is refused before anything trains, one that matches is not."""
    from huggingface_hub import HfApi

    from mmft.data import DataError
    from train.cache_features import main as cache_features

    api = HfApi()
    api.create_repo("base/clip")
    first = api.upload_folder(repo_id="base/clip", folder_path=str(tiny_dir / "clip")).oid
    data = Path(shapes_data[0])
    cache_features(["--train_json", str(data), "--image_dir", str(shapes_data[1]), "--out", str(tmp_path / "cache"),
                    "--vit_model_id", "base/clip", "--vit_revision", "main", "--vit_feature_mode", "patch",
                    "--vit_feature_layer", "-2", "--vit_feature_select_strategy", "default"])
    cache = FeatureCache(tmp_path / "cache")
    assert cache.index["vit_revision"] == first
    cache.check(MMFTConfig(vit_model_id="base/clip", vit_revision=first, vit_feature_mode="patch"))  # same: fine
    later = api.upload_file(path_or_fileobj=b"main moves on", path_in_repo="later.txt", repo_id="base/clip").oid
    with pytest.raises(DataError, match=f"built with CLIP at commit {first}, but this run uses {later}"):
        cache.check(MMFTConfig(vit_model_id="base/clip", vit_revision=later, vit_feature_mode="patch"))
    cfg, run, targs = _args(tiny_dir, shapes_data, tmp_path / "run", steps=2, feature_cache=str(tmp_path / "cache"))
    cfg.vit_model_id = "base/clip"  # no revision: main, which has moved on since the cache was built
    with pytest.raises(DataError, match=f"at commit {first}, but this run uses {later}"):
        finetune(cfg, run, targs)

CRASHING_RUN = """
import os, sys, signal
import torch
torch.set_num_threads(min(2, os.cpu_count() or 1))  # as conftest: the same float sums as the uninterrupted run
from transformers import TrainerCallback, TrainingArguments
sys.path.insert(0, {tests!r})
from test_training import _args
from mmft.training import finetune

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 6:
            os.kill(os.getpid(), signal.SIGKILL)

from pathlib import Path
finetune(*_args(Path({tiny!r}), ({json!r}, Path({images!r})), {out!r}, steps=8, save_steps=4), callbacks=[Kill()])
"""


def test_killed_run_resumes_without_lost_or_repeated_steps(tiny_dir, shapes_data, tmp_path):
    train_json, images = shapes_data
    whole, info = finetune(*_args(tiny_dir, shapes_data, tmp_path / "whole", steps=8, save_steps=4))
    script = CRASHING_RUN.format(tests=str(ROOT / "tests"), tiny=str(tiny_dir), json=str(train_json),
                                 images=str(images), out=str(tmp_path / "crash"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL, mid-run
    assert sorted(p.name for p in (tmp_path / "crash").glob("checkpoint-*")) == ["checkpoint-4"]
    # a checkpoint holds the trained weights only (LoRA + projector), never the base
    saved = load_file(str(tmp_path / "crash" / "checkpoint-4" / "model.safetensors"))
    assert saved and all(k.startswith("projector.") or ".lora_" in k for k in saved)
    assert any(k.startswith("projector.") for k in saved) and any(".lora_" in k for k in saved)
    # a kill while writing checkpoint-6 left it torn: resuming must not pick it
    torn = tmp_path / "crash" / "checkpoint-6"
    (torn / "adapter").mkdir(parents=True)
    (torn / "model.safetensors").write_bytes((tmp_path / "crash" / "checkpoint-4" / "model.safetensors").read_bytes()[:100])
    resumed, rinfo = finetune(*_args(tiny_dir, shapes_data, tmp_path / "crash", steps=8, save_steps=4,
                                     resume_from_checkpoint="last"))
    assert rinfo["steps"] == info["steps"] == 8
    assert rinfo["train_loss"] == info["train_loss"]  # the round's mean loss, not only the resumed steps'
    state = json.loads((tmp_path / "crash" / "checkpoint-8" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [2, 4, 6, 8]
    a, b = _trained(whole), _trained(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def _with_text_only_records(train_json, out, every=4):
    """The shapes data with 3 of every 4 records made text-only (no image, no <image>)."""
    records = json.loads(Path(train_json).read_text())
    for i, record in enumerate(records):
        if i % every:
            del record["image"]
            record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("<image>", "").strip()
    out.write_text(json.dumps(records))
    return out


@pytest.mark.slow
def test_two_process_ddp_on_cpu_with_text_only_records_writes_one_round(tiny_dir, shapes_data, tmp_path):
    """Mixed image and text-only records: a text-only batch on one rank still reduces the projector."""
    _, images = shapes_data
    train_json = _with_text_only_records(shapes_data[0], tmp_path / "mixed.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train.finetune", "--lm_model_id", str(tiny_dir / "lm"), "--vit_model_id", str(tiny_dir / "clip"),
           "--vit_feature_mode", "patch", "--train_json", str(train_json), "--image_dir", str(images),
           "--output_dir", str(tmp_path / "ddp"), "--max_steps", "4", "--save_steps", "4", "--eval_steps", "4",
           "--per_device_train_batch_size", "2", "--ddp_backend", "gloo", "--lora_dropout", "0",
           "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, not just the launcher
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert "[rank 0/2] finished at step 4" in stdout and "[rank 1/2] finished at step 4" in stdout
    assert sorted(p.name for p in (tmp_path / "ddp").glob("round-*")) == ["round-1"]
    config = json.loads((tmp_path / "ddp" / "round-1" / "config.json").read_text())
    assert config["round"]["samples_seen"] == 4 * 2 * 2


def test_fresh_projector_starts_at_the_text_embedding_scale(tiny_model):
    from mmft.training import match_projector_scale

    features = torch.randn(4, 50, tiny_model.cfg.mp_input_dim) * 30
    dataset = [{"image_features": f} for f in features]
    factor = match_projector_scale(tiny_model, dataset)
    image_rms = tiny_model.projector(features).pow(2).mean().sqrt()
    text_rms = tiny_model.lm.get_input_embeddings().weight.pow(2).mean().sqrt()
    assert factor < 1 and image_rms.item() == pytest.approx(text_rms.item(), rel=1e-4)


def test_checkpoint_weights_load_strictly(tiny_model):
    """The Trainer resumes through `load_state_dict(state, False)`: every trained weight, nothing else."""
    state = {k: v.detach().clone() + 1 for k, v in tiny_model.trained_state_dict().items()}
    assert any(k.startswith("projector.") for k in state) and any(".lora_B." in k for k in state)
    result = tiny_model.load_state_dict(state, False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in tiny_model.trained_state_dict().items():
        assert torch.equal(value, state[key])
    partial = {k: v for k, v in state.items() if k != "projector.linear_2.bias"}
    with pytest.raises(ValueError, match=r"missing \['projector.linear_2.bias'\]"):
        tiny_model.load_state_dict(partial, False)
    with pytest.raises(ValueError, match=r"unexpected \['projector.extra'\]"):
        tiny_model.load_state_dict({**state, "projector.extra": torch.zeros(1)}, False)
    with pytest.raises(ValueError, match=r"wrong shape \['projector.linear_1.bias'\]"):
        tiny_model.load_state_dict({**state, "projector.linear_1.bias": torch.zeros(1)}, False)


def test_cpu_training_is_float32_unless_bf16_is_asked_for(tiny_dir, shapes_data, tmp_path, monkeypatch):
    """pick_dtype picks bf16 on CPUs with native bf16: training must not inherit that silently."""
    from mmft import training

    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: True)
    cfg, run, targs = _args(tiny_dir, shapes_data, tmp_path)
    assert training.training_dtype(targs) == torch.float32
    model, _ = training.prepare_model(cfg, run, targs.device, None, training.training_dtype(targs))
    assert {p.dtype for p in model.lm.parameters()} == {torch.float32}
    _, _, bf16 = _args(tiny_dir, shapes_data, tmp_path, bf16=True)
    assert training.training_dtype(bf16) == torch.bfloat16


@pytest.mark.parametrize("change, message", [
    ({"round": None}, "'round' must be an object, got NoneType"), ({"round": [1]}, "'round' must be an object"),
    ({"history": "none"}, "'round.history' must be a list of objects"),
    ({"metrics": [0.9]}, "'round.metrics' must be an object or null, got list"),
    ({"parent": "runs/round-1"}, "'round.parent' must be an object or null, got str"),
])
def test_a_malformed_round_section_is_named(tiny_model, tmp_path, change, message):
    from mmft.config import load_config

    folder = tiny_model.save_pretrained(tmp_path / "r", {"round": 1, "history": [{"round": 1}]})
    data = json.loads((folder / "config.json").read_text())
    data["round"] = change["round"] if "round" in change else {**data["round"], **change}
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"is not a valid mmft config: {message}"):
        load_config(folder)


def test_the_cli_cache_holds_the_features_a_cpu_run_computes_and_takes_a_relative_clip_path(
        tiny_dir, shapes_data, tmp_path, monkeypatch):
    """train.cache_features on a CPU: float32 features, as a CPU run computes them (it took pick_dtype's bf16
    where oneDNN reports bf16: 0.45 % off); a CLIP folder typed relative is recorded absolute, so a run
    from any directory, and one typing the same relative path, is accepted (both were refused)."""
    from mmft.loading import pin_revisions
    from train.cache_features import main as cache_features

    monkeypatch.setattr(loading, "pick_dtype", lambda device=None: torch.bfloat16)  # as on a CPU reporting bf16
    monkeypatch.chdir(tiny_dir)
    cache_features(["--train_json", str(shapes_data[0]), "--image_dir", str(shapes_data[1]), "--out",
                    str(tmp_path / "cache"), "--vit_model_id", "clip", "--vit_feature_mode", "patch", "--batch_size", "32"])
    cache = FeatureCache(tmp_path / "cache")
    assert cache.index["vit_model_id"] == str(tiny_dir / "clip")
    cfg = MMFTConfig(lm_model_id="lm", vit_model_id="clip", vit_feature_mode="patch")
    cache.check(pin_revisions(cfg))  # as finetune checks it: no DataError
    monkeypatch.chdir(tmp_path)
    cache.check(MMFTConfig(vit_model_id=str(tiny_dir / "clip"), vit_feature_mode="patch"))
    vision = VisionEncoder.from_pretrained(str(tiny_dir / "clip"), "patch", 10**8, dtype=torch.float32)
    first = sorted(cache.index["files"])[:32]  # the cache's first batch: the same GEMM shapes, so bit for bit
    with torch.no_grad():
        features = vision(torch.cat([vision.preprocess([shapes_data[1] / n]) for n in first]))  # [32, 49, 32]
    assert all(torch.equal(cache[name], features[j]) for j, name in enumerate(first))


def test_a_seed_projector_and_a_run_naming_one_clip_folder_differently_agree(tiny_dir, monkeypatch):
    """--init_projector's feature check compared a round's absolute CLIP path with the run's relative one."""
    monkeypatch.chdir(tiny_dir.parent)
    relative = MMFTConfig(vit_model_id=f"{tiny_dir.name}/clip", vit_feature_mode="patch")
    absolute = MMFTConfig(vit_model_id=str(tiny_dir / "clip"), vit_feature_mode="patch")
    assert relative.feature_choice == absolute.feature_choice
    assert MMFTConfig(vit_model_id="openai/clip-vit-base-patch32").feature_choice["vit_model_id"] == \
        "openai/clip-vit-base-patch32"  # a Hub id stays as it is


def test_a_mistyped_image_dir_leaves_a_good_cache_alone(tiny_dir, shapes_data, tmp_path, capsys):
    """cache_features with a wrong --image_dir replaced a good cache with an empty one and exited 0."""
    from train.cache_features import main as cache_features

    args = ["--train_json", str(shapes_data[0]), "--vit_model_id", str(tiny_dir / "clip"), "--vit_feature_mode", "pooled"]
    cache_features(args + ["--image_dir", str(shapes_data[1]), "--out", str(tmp_path / "cache")])
    before = FeatureCache(tmp_path / "cache").index
    assert before["files"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for image_dir, message in ((str(shapes_data[1]) + "z", "is not a folder"), (elsewhere, "none of the 160 images is in")):
        with pytest.raises(SystemExit) as done:
            cache_features(args + ["--image_dir", str(image_dir), "--out", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert done.value.code == 1 and message in err and "Traceback" not in err, err
        assert FeatureCache(tmp_path / "cache").index == before  # untouched
    # a JSON that is no list of records, or whose records name no image, emptied the cache and exited 0
    (tmp_path / "dict.json").write_text(json.dumps({"data": [1, 2]}))
    (tmp_path / "textonly.json").write_text(json.dumps([{"id": "1", "conversations": []}, {"image": 5}]))
    for data, message in (("dict.json", "dict.json: expected a JSON list of conversations, got dict"),
                          ("textonly.json", "textonly.json names an image: nothing to cache")):
        with pytest.raises(SystemExit) as done:
            cache_features(["--train_json", str(tmp_path / data), *args[2:], "--image_dir", str(shapes_data[1]),
                            "--out", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert done.value.code == 1 and message in err and len(err.strip().splitlines()) == 1, err
        assert FeatureCache(tmp_path / "cache").index == before  # untouched
    # a record whose "image" is not a file name is skipped (it was a TypeError in sorting the names)
    records = json.loads(shapes_data[0].read_text())
    (tmp_path / "odd.json").write_text(json.dumps(records[:3] + [{**records[3], "image": 5},
                                                                  {**records[4], "image": ["a.png"]}]))
    cache_features(["--train_json", str(tmp_path / "odd.json"), *args[2:], "--image_dir", str(shapes_data[1]),
                    "--out", str(tmp_path / "odd")])
    assert sorted(FeatureCache(tmp_path / "odd").index["files"]) == sorted(r["image"] for r in records[:3])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as done:
        cache_features(args + ["--image_dir", str(shapes_data[1]), "--out", str(tmp_path / "file")])
    assert done.value.code == 1 and "is a file" in capsys.readouterr().err


def test_a_round_trained_on_relative_model_paths_loads_from_anywhere(tiny_dir, shapes_data, tmp_path, monkeypatch):
    """`--lm_model_id ./tiny/lm`: the round recorded "./tiny/lm", which a round folder reads relative to
    itself, so it never loaded. Local folders are recorded absolute."""
    from mmft.config import load_config
    from mmft.loading import load_round

    cfg, run, targs = _args(tiny_dir, shapes_data, tmp_path / "run", steps=1, eval_steps=1, save_steps=1)
    monkeypatch.chdir(tiny_dir.parent)
    cfg.lm_model_id, cfg.vit_model_id = f"./{tiny_dir.name}/lm", f"./{tiny_dir.name}/clip"
    folder, _ = finetune(cfg, run, targs)
    saved = load_config(folder)[0]
    assert (saved.lm_model_id, saved.vit_model_id) == (str((tiny_dir / "lm").resolve()), str((tiny_dir / "clip").resolve()))
    monkeypatch.chdir(tmp_path)
    load_round(folder, device="cpu", dtype=torch.float32, quantize="none")


def test_entry_points_check_sizes_and_modes_before_any_work(tmp_path, capsys):
    """cache_features: a batch or shard size of 0 was a traceback, -1 an empty cache and exit 0;
    build_demo: a typo in --modes surfaced after minutes of pre-training, with demo/base already rebuilt."""
    from train.build_demo import main as build_demo
    from train.cache_features import main as cache_features

    for flag in (["--batch_size", "0"], ["--shard_size", "0"], ["--batch_size", "-1"]):
        with pytest.raises(SystemExit) as done:
            cache_features(["--train_json", "x.json", "--image_dir", ".", "--out", str(tmp_path / "c"), *flag])
        assert done.value.code == 2 and "is not a positive whole number" in capsys.readouterr().err, flag
    for modes in ("patch,pooeld", "patch,patch"):
        with pytest.raises(SystemExit) as done:
            build_demo(["--modes", modes, "--out", str(tmp_path / "demo")])
        assert done.value.code == 2 and f"--modes {modes!r}: a comma-separated list" in capsys.readouterr().err
    # counts: --lm_steps 0 was a traceback after demo/base had been replaced; --eval_n -1 reported -0.0
    for flag, message in ((["--lm_steps", "0"], "'0' is not a positive whole number"),
                          (["--eval_n", "-1"], "'-1' is not a positive whole number"),
                          (["--workers", "0"], "'0' is not a positive whole number"),
                          (["--clip_steps", "-1"], "'-1' is not a whole number >= 0")):
        with pytest.raises(SystemExit) as done:
            build_demo([*flag, "--out", str(tmp_path / "demo")])
        assert done.value.code == 2 and message in capsys.readouterr().err, flag
    assert not (tmp_path / "c").exists() and not (tmp_path / "demo").exists()


def test_last_checkpoint_is_this_rounds_when_rounds_share_an_output_folder(tiny_dir, shapes_data, tmp_path):
    """Rounds may share --output_dir (finetune's docstring). Round 2, killed after its checkpoint-2,
    resumed with `last`: it picked round 1's checkpoint-6 and wrote round 1's weights as round 2."""
    from mmft.training import checkpoint_round, last_complete_checkpoint

    runs = tmp_path / "runs"
    first, _ = finetune(*_args(tiny_dir, shapes_data, runs, steps=6, save_steps=3))
    assert checkpoint_round(runs / "checkpoint-6") == 1
    whole, info = finetune(*_args(tiny_dir, shapes_data, tmp_path / "alone", steps=4, save_steps=2,
                                  resume_round=str(first), data_offset=80))
    shutil.copytree(tmp_path / "alone" / "checkpoint-2", runs / "checkpoint-2")  # round 2, killed at step 3
    assert last_complete_checkpoint(runs, 2) == str(runs / "checkpoint-2") and last_complete_checkpoint(runs, 1)
    resumed, rinfo = finetune(*_args(tiny_dir, shapes_data, runs, steps=4, save_steps=2, resume_round=str(first),
                                     data_offset=80, resume_from_checkpoint="last"))
    assert rinfo["round"] == 2 and rinfo["steps"] == info["steps"] == 4
    a, b = _trained(whole), _trained(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # round 2's own training, not round 1's


def test_a_run_stopped_after_its_last_step_resumes_without_an_extra_step(tiny_dir, shapes_data, tmp_path):
    """Killed in the final evaluation or save, after checkpoint-4 of 4: `last` trained a fifth step (the
    Trainer steps before it checks max_steps). It now finishes the round from the checkpoint as it is."""
    whole, info = finetune(*_args(tiny_dir, shapes_data, tmp_path / "whole", steps=4, save_steps=2))
    shutil.copytree(tmp_path / "whole", tmp_path / "stopped", ignore=shutil.ignore_patterns(whole.name))
    resumed, rinfo = finetune(*_args(tiny_dir, shapes_data, tmp_path / "stopped", steps=4, save_steps=2,
                                     resume_from_checkpoint="last"))
    assert rinfo["steps"] == info["steps"] == 4 and not (tmp_path / "stopped" / "checkpoint-5").exists()
    assert rinfo["train_loss"] == info["train_loss"] and rinfo["eval_loss"] == info["eval_loss"]
    a, b = _trained(whole), _trained(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_last_checkpoint_is_this_stages_when_stages_share_an_output_folder(tiny_dir, shapes_data, tmp_path):
    """A projector-only stage and the LoRA stage after it are both round 1: `last` picked the projector
    stage's checkpoint-4 for the LoRA stage, which then failed on the missing LoRA weights."""
    runs = tmp_path / "runs"
    finetune(*_args(tiny_dir, shapes_data, runs, steps=4, save_steps=2, projector_only=True))
    stage1 = (runs / "round-1").rename(tmp_path / "stage1")  # a finished round-1 is never trained over
    alone, _ = finetune(*_args(tiny_dir, shapes_data, tmp_path / "alone", steps=4, save_steps=2,
                               init_projector=str(stage1)))
    shutil.rmtree(runs / "checkpoint-2")
    shutil.copytree(tmp_path / "alone" / "checkpoint-2", runs / "checkpoint-2")  # stage 2, killed at step 3
    resumed, rinfo = finetune(*_args(tiny_dir, shapes_data, runs, steps=4, save_steps=2, init_projector=str(stage1),
                                     resume_from_checkpoint="last"))
    assert rinfo["steps"] == 4 and rinfo["stage"] == "finetune"
    a, b = _trained(alone), _trained(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_mistyped_model_id_is_one_line(hub_online, tiny_dir, shapes_data, tmp_path, capsys):
    from train.finetune import main

    with pytest.raises(SystemExit) as done:
        main(["--lm_model_id", "nobody/no-such-model", "--vit_model_id", str(tiny_dir / "clip"),
              "--train_json", str(shapes_data[0]), "--image_dir", str(shapes_data[1]),
              "--output_dir", str(tmp_path / "run"), "--max_steps", "2"])
    message = str(done.value.code)
    assert message.startswith("error: ") and "nobody/no-such-model" in message and "\n" not in message


@pytest.mark.parametrize("flags, message", [
    (["--lm_model_id", "{tmp}/no-such/lm"], "error: '{tmp}/no-such/lm' is neither a model folder on disk nor a Hub repo "
                                            "id (OWNER/NAME)"),
    (["--output_dir", "{tmp}/a-file"], "error: --output_dir {tmp}/a-file is a file, not a folder"),
    (["--num_train_epochs", "0"], "error: nothing to train: --num_train_epochs 0 and no --max_steps"),
])
def test_a_run_that_cannot_train_says_why_in_one_line_and_writes_nothing(tiny_dir, shapes_data, tmp_path, flags,
                                                                          message):
    from train.finetune import main

    (tmp_path / "a-file").write_text("kept")
    args = {"--lm_model_id": str(tiny_dir / "lm"), "--vit_model_id": str(tiny_dir / "clip"),
            "--train_json": str(shapes_data[0]), "--image_dir": str(shapes_data[1]),
            "--output_dir": str(tmp_path / "run")}
    args.update({flag: value.format(tmp=tmp_path) for flag, value in zip(flags[::2], flags[1::2])})
    with pytest.raises(SystemExit) as done:
        main([item for pair in args.items() for item in pair])
    assert str(done.value.code) == message.format(tmp=tmp_path)
    assert not (tmp_path / "run").exists() and (tmp_path / "a-file").read_text() == "kept"


def test_evaluation_file_skips_are_its_own(tiny_dir, shapes_data, tmp_path, capsys):
    from mmft.data import DataError

    records = json.loads(Path(shapes_data[0]).read_text())
    bad = [{**r, "image": "gone.png"} for r in records[:3]]
    (tmp_path / "eval-bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError) as err:  # the eval file's own count, not the training file's
        finetune(*_args(tiny_dir, shapes_data, tmp_path / "a", steps=2, eval_json=str(tmp_path / "eval-bad.json")))
    assert str(err.value) == f"{tmp_path / 'eval-bad.json'}: no usable evaluation records (read 0 conversations, " \
                             "skipped 3 (3 missing image))"
    (tmp_path / "eval.json").write_text(json.dumps(bad[:2] + records[3:7]))
    folder, info = finetune(*_args(tiny_dir, shapes_data, tmp_path / "b", steps=2,
                                   eval_json=str(tmp_path / "eval.json")))
    assert info["data"]["skipped"] == {} and info["data"]["eval_skipped"] == {"missing image": 2}
    assert f"evaluation: read 4 conversations, skipped 2 (2 missing image)" in capsys.readouterr().out
