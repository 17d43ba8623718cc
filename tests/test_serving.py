"""Serving: rounds share one base (named adapters + own projector), the cache budget, thread safety."""

import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmft.config import MMFTConfig, load_config, save_config
from mmft.loading import build_model
from mmft.pipeline import Pipeline
from mmft.serving import RoundCache

QUESTION = "What colour is the shape?"
IMAGE = Image.new("RGB", (64, 64), "red")


def make_round(tiny_dir, folder, seed, **cfg_changes):
    """A round over the session's tiny models with its own LoRA B and projector (so rounds differ)."""
    kwargs = dict(lm_model_id=str(tiny_dir / "lm"), vit_model_id=str(tiny_dir / "clip"), vit_feature_mode="patch",
                  lora_r=8, lora_alpha=16, lora_dropout=0.0, gen_max_new_tokens=8,
                  prompt_max_question_tokens=64, prompt_max_answer_tokens=64)
    cfg = MMFTConfig(**{**kwargs, **cfg_changes})
    torch.manual_seed(seed)
    model = build_model(cfg, device="cpu", dtype=torch.float32, trainable=True)
    with torch.no_grad():
        for name, param in [*model.lm.named_parameters(), *model.projector.named_parameters(prefix="mp")]:
            if "lora_B" in name or name.startswith("mp."):
                param.normal_(0, 0.5)
    return model.save_pretrained(folder, {"round": seed})


@pytest.fixture(scope="module")
def three_rounds(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    folders = [make_round(tiny_dir, root / f"round-{n}", n) for n in (1, 2)]
    folders.append(make_round(tiny_dir, root / "round-3", 3, lora_target_modules=["qkv_proj"], lora_r=4))
    return folders


@pytest.fixture(scope="module")
def alone(three_rounds):
    """What each round answers when it is loaded on its own (the reference)."""
    answers = []
    for folder in three_rounds:
        pipe = Pipeline.from_round(folder, device="cpu", dtype=torch.float32)
        answers.append(vars(pipe.answer_image(IMAGE, QUESTION)))
    return answers


FP32 = dict(device="cpu", dtype=torch.float32)


def test_rounds_share_one_base_and_answer_exactly_as_alone(three_rounds, alone):
    cache = RoundCache(cache_size=3)
    pipes = [cache.load(f"r{i}", folder, **FP32) for i, folder in enumerate(three_rounds)]
    assert cache.bases() == 1
    assert all(p.model.lm is pipes[0].model.lm and p.model.vision is pipes[0].model.vision for p in pipes)
    assert len({id(p.model.projector) for p in pipes}) == 3  # each round its own projector
    assert len({a["draft"] for a in alone}) > 1  # the rounds really differ
    for _ in range(2):  # switching back and forth changes nothing
        for pipe, want in zip(pipes, alone):
            assert vars(pipe.answer_image(IMAGE, QUESTION)) == want
    assert cache.load("r0", three_rounds[0]) is pipes[0]  # cached: not loaded again


def test_cache_keeps_cache_size_rounds_and_deletes_dropped_adapters(three_rounds, alone):
    cache = RoundCache(cache_size=2)
    first = cache.load("a", three_rounds[0], **FP32)
    cache.load("b", three_rounds[1], **FP32)
    cache.get("a")  # used: "b" is now the least recently used
    cache.load("c", three_rounds[2], **FP32)
    assert cache.loaded() == ["a", "c"] and cache.bases() == 1
    lm = first.model.lm
    assert len(lm.peft_config) == 2  # b's adapter left the model
    assert vars(cache.get("c").answer_image(IMAGE, QUESTION)) == alone[2]
    assert vars(first.answer_image(IMAGE, QUESTION)) == alone[0]


def test_a_round_on_another_base_drops_the_old_base_first_or_loads_a_second(three_rounds, tiny_dir, tmp_path, alone):
    cfg, info = load_config(three_rounds[0])
    other = tmp_path / "other"
    import shutil

    shutil.copytree(three_rounds[0], other)
    cfg.vit_max_pixels = 1_000_000  # any vit_*/lm_* difference means another base
    save_config(other, cfg, info)

    one = RoundCache(cache_size=4, max_bases=1)
    first = one.load("a", three_rounds[0], **FP32)
    one.load("b", three_rounds[1], **FP32)
    second = one.load("other", other, **FP32)
    assert one.loaded() == ["other"] and one.bases() == 1 and second.model.lm is not first.model.lm
    assert vars(second.answer_image(IMAGE, QUESTION)) == alone[0]

    two = RoundCache(cache_size=4, max_bases=2)
    two.load("a", three_rounds[0], **FP32)
    two.load("other", other, **FP32)
    assert two.loaded() == ["a", "other"] and two.bases() == 2
    two.load("dtype", three_rounds[1], device="cpu", dtype=torch.bfloat16)  # another dtype: another base
    assert two.loaded() == ["other", "dtype"] and two.bases() == 2


def test_two_threads_on_different_rounds_get_the_single_threaded_answers(three_rounds, alone):
    cache = RoundCache(cache_size=3)
    pipes = [cache.load(f"r{i}", folder, **FP32) for i, folder in enumerate(three_rounds)]
    results, errors = {i: [] for i in range(3)}, []
    start = threading.Barrier(3)

    def ask(i):
        try:
            start.wait()
            for _ in range(3):
                if i == 2:  # streaming too: the draft and the refine in two generate calls
                    results[i].append(vars(list(pipes[i].stream_image(IMAGE, QUESTION))[-1]))
                else:
                    results[i].append(vars(pipes[i].answer_image(IMAGE, QUESTION)))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(3):
        assert results[i] == [alone[i]] * 3, i


def test_int8_base_takes_more_rounds(three_rounds):
    """load_adapter onto an int8 base, round 3 with other LoRA targets and rank too: each round answers
    as it does when loaded alone in int8."""
    cache = RoundCache(cache_size=3)
    shared = [cache.load(f"r{i}", f, device="cpu", dtype=torch.float32, quantize="int8")
              for i, f in enumerate(three_rounds)]
    assert shared[0].model.lm is shared[1].model.lm is shared[2].model.lm and cache.bases() == 1
    for folder, pipe in zip(three_rounds, shared):
        own = Pipeline.from_round(folder, device="cpu", dtype=torch.float32, quantize="int8")
        assert vars(pipe.answer_image(IMAGE, QUESTION)) == vars(own.answer_image(IMAGE, QUESTION))


def test_dropping_the_active_round_leaves_the_others_answering_as_alone(three_rounds, alone):
    """Rounds covering different modules: PEFT picks a successor adapter per layer when the active one is
    deleted (qkv_proj's can differ from o_proj's) and reports only the first layer's."""
    cache = RoundCache(cache_size=3)
    qkv_only = cache.load("a", three_rounds[2], **FP32)  # the base, its adapter on qkv_proj only
    first = cache.load("b", three_rounds[0], **FP32)
    cache.load("c", three_rounds[1], **FP32).answer_image(IMAGE, QUESTION)  # c's adapter is the active one
    cache.get("a"), cache.get("b")
    cache.load("d", three_rounds[2], **FP32)  # evicts c
    assert cache.loaded() == ["a", "b", "d"]
    assert vars(first.answer_image(IMAGE, QUESTION)) == alone[0]
    assert vars(qkv_only.answer_image(IMAGE, QUESTION)) == alone[2]


def test_a_dropped_round_frees_its_projector_even_when_it_loaded_the_base(three_rounds):
    import gc
    import weakref

    cache = RoundCache(cache_size=2)
    loader = cache.load("a", three_rounds[0], **FP32)  # the round that loads the base
    projector = weakref.ref(loader.model.projector)
    cache.load("b", three_rounds[1], **FP32)
    cache.load("c", three_rounds[2], **FP32)  # evicts a; b and c stay on the base
    del loader
    gc.collect()
    assert cache.loaded() == ["b", "c"] and projector() is None


def test_a_round_that_fails_to_load_leaves_the_base_as_it_was(three_rounds, alone, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(three_rounds[0], bad)
    tensors = load_file(str(bad / "adapter/adapter_model.safetensors"))
    last = sorted(k for k in tensors if "lora_B" in k)[-1]  # PEFT has added every layer before it reads this
    tensors[last] = torch.zeros(tensors[last].shape[0] + 1, tensors[last].shape[1])
    save_file(tensors, str(bad / "adapter/adapter_model.safetensors"))
    from peft.tuners.tuners_utils import BaseTunerLayer

    cache = RoundCache(cache_size=3)
    served = cache.load("a", three_rounds[2], **FP32)
    with pytest.raises(RuntimeError, match="size mismatch"):
        cache.load("bad", bad, **FP32)
    assert cache.loaded() == ["a"] and list(served.model.lm.peft_config) == ["default"]  # no half-loaded adapter
    # the wrappers PEFT added stay, empty (as after any delete_adapter); the switch lists them all
    assert served.model.switch.layers == [m for m in served.model.lm.modules() if isinstance(m, BaseTunerLayer)]
    assert vars(served.answer_image(IMAGE, QUESTION)) == alone[2]


def test_a_failed_round_on_another_base_puts_back_the_round_it_displaced(three_rounds, alone, tmp_path, monkeypatch):
    """max_bases 1: the served round's base made way, the new round failed after its base had loaded, and the
    served round was gone (the app then described a round it no longer held). Now it loads again, and only
    once the failed base is freed (its traceback's frames held it: two bases on a 16 GB Space)."""
    import gc

    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedModel

    from mmft import serving

    bad = tmp_path / "bad"
    shutil.copytree(three_rounds[0], bad)
    cfg, info = load_config(bad)
    cfg.vit_max_pixels = 1_000_000  # another base ...
    save_config(bad, cfg, info)
    tensors = load_file(str(bad / "adapter/adapter_model.safetensors"))
    last = sorted(k for k in tensors if "lora_B" in k)[-1]  # ... whose adapter fails after the base loaded
    tensors[last] = torch.zeros(tensors[last].shape[0] + 1, tensors[last].shape[1])
    save_file(tensors, str(bad / "adapter/adapter_model.safetensors"))

    live_at_load, real = [], serving.load_round

    def counting(*args, **kwargs):
        gc.collect()
        live_at_load.append(sum(isinstance(o, PreTrainedModel) and not isinstance(o, type) for o in gc.get_objects()))
        return real(*args, **kwargs)

    cache = RoundCache(cache_size=3, max_bases=1)
    cache.load("a", three_rounds[0], **FP32)
    monkeypatch.setattr(serving, "load_round", counting)
    with pytest.raises(RuntimeError, match="size mismatch"):
        cache.load("bad", bad, **FP32)
    assert cache.loaded() == ["a"] and cache.bases() == 1
    assert vars(cache.get("a").answer_image(IMAGE, QUESTION)) == alone[0]
    assert len(live_at_load) == 2 and live_at_load[1] <= live_at_load[0]  # the failed base was gone by then
    with pytest.raises(RuntimeError, match="size mismatch"):  # the same through replace (a moved tag)
        cache.replace("a", bad, **FP32)
    assert cache.loaded() == ["a"] and cache.folder("a") == three_rounds[0]


def test_a_dropped_round_says_so(three_rounds):
    cache = RoundCache(cache_size=1)
    old = cache.load("a", three_rounds[0], **FP32)
    cache.load("b", three_rounds[1], **FP32)
    with pytest.raises(RuntimeError, match="no longer loaded"):
        old.answer_text("Hello")


def test_a_round_loads_the_base_revisions_it_names(hub_online, tiny_dir, tmp_path):
    """config.json pins the base LM's and CLIP's commits: serving loads exactly those, not the newest."""
    from huggingface_hub import HfApi
    from safetensors.torch import load_file, save_file

    api = HfApi()
    pinned = {}
    for name in ("lm", "clip"):
        repo = f"user/tiny-{name}"
        api.create_repo(repo)
        pinned[name] = api.upload_folder(repo_id=repo, folder_path=str(tiny_dir / name)).oid
        newer = {k: v + 1.0 for k, v in load_file(str(tiny_dir / name / "model.safetensors")).items()}
        save_file(newer, str(tmp_path / f"{name}.safetensors"), metadata={"format": "pt"})
        api.upload_file(path_or_fileobj=str(tmp_path / f"{name}.safetensors"), path_in_repo="model.safetensors",
                        repo_id=repo)  # main moves on: other weights
    folder = make_round(tiny_dir, tmp_path / "round", 1)
    cfg, info = load_config(folder)
    cfg.lm_model_id, cfg.lm_revision = "user/tiny-lm", pinned["lm"]
    cfg.vit_model_id, cfg.vit_revision = "user/tiny-clip", pinned["clip"]
    save_config(folder, cfg, info)

    model = RoundCache().load("pinned", folder, **FP32).model
    want_lm = load_file(str(tiny_dir / "lm" / "model.safetensors"))
    want_clip = load_file(str(tiny_dir / "clip" / "model.safetensors"))
    lm_state = model.lm.get_base_model().state_dict()
    embed = next(k for k in want_lm if "embed_tokens" in k)
    assert torch.equal(lm_state[embed], want_lm[embed])  # the pinned commit, not main's +1
    clip_key = next(k for k in want_clip if k.endswith("patch_embedding.weight"))
    assert torch.equal(model.vision.state_dict()[next(k for k in model.vision.state_dict()
                                                       if k.endswith("patch_embedding.weight"))], want_clip[clip_key])

    cfg.lm_revision = None  # unpinned: main's newer weights (so the pin above is what made the difference)
    save_config(folder, cfg, info)
    unpinned = RoundCache().load("main", folder, **FP32).model
    assert torch.equal(unpinned.lm.get_base_model().state_dict()[embed], want_lm[embed] + 1.0)


def test_the_app_serves_the_demo_as_its_evaluation_loaded_it():
    """The demo's figures (model card, docs/training.md) come from `mmft.demo.evaluate_round`, which
    loads the round with float32 and the CPU default (int8): the app must load it the same way, or
    it answers a little differently from what its figures say (an earlier build, unquantized: 0.867
    held-out shape, not its recorded 0.870)."""
    from mmft import shapes
    from mmft.demo import DEMO_DIR
    from mmft.loading import load_round
    from mmft.quantize import int8_linears
    from mmft.serving import DEMO_KEY, Rounds, Settings

    served = Rounds(Settings(demo_round=DEMO_DIR / "round", device="cpu")).get(DEMO_KEY)
    evaluated, _ = load_round(DEMO_DIR / "round", device="cpu", dtype=torch.float32)
    assert len(int8_linears(served.model.lm)) == len(int8_linears(evaluated.lm)) > 0
    assert {p.dtype for p in served.model.parameters() if p.is_floating_point()} == {torch.float32}
    rng = random.Random(5)
    pictures = [shapes.draw(c, k, rng, size=None, style=shapes.HELDOUT_STYLE)
                for c, k in (("red", "circle"), ("orange", "square"), ("purple", "triangle"))]
    with torch.no_grad():
        for picture in pictures:
            for question in ("What colour is the shape?", "Is it a circle or a square?"):
                assert served.answer_image(picture, question) == Pipeline(evaluated).answer_image(picture, question)


def test_main_latest_follows_a_newly_published_round_when_picked(hub_online, three_rounds, alone, monkeypatch,
                                                                   tmp_path):
    """"main (latest)": a round published while the app runs is served once the picker asks for main
    again (it used to stay on the commit loaded first); on the same base, the base is not reloaded;
    with the Hub unreachable, the loaded round stays."""
    from huggingface_hub import constants

    from mmft.hub import plan_upload, publish
    from mmft.serving import MAIN_KEY, Rounds, Settings

    repo = "user/moving-main"
    publish(plan_upload(three_rounds[0], repo, number=1))
    rounds = Rounds(Settings(demo_round=three_rounds[0], repo=repo, device="cpu", dtype="float32", cache_size=2))
    rounds.get("round-1")  # another cached round, which a refresh of main must not evict
    first = rounds.get(MAIN_KEY)
    assert vars(first.answer_image(IMAGE, QUESTION)) == alone[0]
    base = rounds.cache._bases[rounds.cache._base_of[MAIN_KEY]]

    publish(plan_upload(three_rounds[1], repo, number=2))
    assert rounds.get(MAIN_KEY) is first  # a question on the loaded round does not ask the Hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert rounds.get(MAIN_KEY, refresh=True) is first  # unreachable: keep serving
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    second = rounds.get(MAIN_KEY, refresh=True)
    assert second is not first and vars(second.answer_image(IMAGE, QUESTION)) == alone[1]
    assert rounds.loaded() == ["round-1", MAIN_KEY] and rounds.cache.bases() == 1  # nothing else evicted
    assert rounds.cache._bases[rounds.cache._base_of[MAIN_KEY]].lm is base.lm  # one base, not reloaded
    assert rounds.get(MAIN_KEY, refresh=True) is second  # unchanged main: nothing reloaded
    # a tag moved by a forced re-publish: picked again, the picker's round-1 is the one now tagged
    tagged = publish(plan_upload(three_rounds[1], repo, number=1), force=True)
    assert vars(rounds.get("round-1").answer_image(IMAGE, QUESTION)) == alone[0]  # a question: no Hub call
    moved = rounds.get("round-1", refresh=True)
    assert vars(moved.answer_image(IMAGE, QUESTION)) == alone[1]
    assert rounds.cache.folder("round-1").name == tagged.commit_id  # served: the commit the label names

    # a new main that cannot load (its base is nowhere): the error says so, and main keeps serving
    broken = Path(shutil.copytree(three_rounds[2], tmp_path / "broken"))
    cfg, info = load_config(broken)
    cfg.lm_model_id = str(tmp_path / "nowhere" / "lm")
    save_config(broken, cfg, info)
    publish(plan_upload(broken, repo, number=3))
    with pytest.raises(OSError):
        rounds.get(MAIN_KEY, refresh=True)
    assert vars(rounds.get(MAIN_KEY).answer_image(IMAGE, QUESTION)) == alone[1]
