"""Publishing rounds to the (local) Hub and pulling any revision back, with the real huggingface_hub client."""

import json
import os
import shutil
import subprocess
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from PIL import Image
from safetensors.torch import load_file, save_file

from mmft.config import MMFTConfig
from mmft.hub import (
    ROUND_PATTERNS,
    RoundExists,
    RoundNotFound,
    list_rounds,
    plan_upload,
    publish,
    pull_round,
    render_card,
)
from mmft.loading import build_model
from mmft.round_check import check_round
from mmft.pipeline import Pipeline
from mmft.serving import load_pipeline
from tests.hub_server import DUMMY_TOKEN, HubError, free_port

ROOT = Path(__file__).resolve().parent.parent
REPO = "user/mmft-demo"
SECRET = "hf_secret_test_token"
QUESTION = "What colour is the shape?"


def round_info(n: int, **extra) -> dict:
    rows = [{"round": i, "created": f"2026-11-2{i}T10:00:00Z", "steps": 400, "samples": 3200,
             "train_loss": 2.0 / i, "eval_loss": 2.1 / i,
             "metrics": {"color_accuracy": 0.5 + i / 10, "shape_accuracy": 0.4 + i / 10}} for i in range(1, n + 1)]
    data = {"dataset": "synthetic shapes world (mmft.shapes)", "train_json": "data/train.json",
            "offset": 3200 * (n - 1), "limit": 3200, "seed": 1}
    parent = {"round": n - 1, "source": f"runs/round-{n - 1}"} if n > 1 else None
    return {**rows[-1], "data": data, "parent": parent, "history": rows, **extra}


def _png(path: Path, colour: str) -> None:
    Image.new("RGB", (8, 8), colour).save(path)


@pytest.fixture(scope="module")
def rounds(tiny_dir, tmp_path_factory):
    """Two real round folders with different weights; round 1 has files round 2 lacks (metrics.json)."""
    cfg = MMFTConfig(lm_model_id=str(tiny_dir / "lm"), vit_model_id=str(tiny_dir / "clip"),
                     vit_feature_mode="patch", lora_r=8, lora_alpha=16, lora_dropout=0.0, gen_max_new_tokens=8)
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu", dtype=torch.float32, trainable=True)
    root = tmp_path_factory.mktemp("rounds")
    folders = []
    for n in (1, 2):
        with torch.no_grad():  # new LoRA B (A alone would leave the adapter an identity) and projector
            for name, param in [*model.lm.named_parameters(), *model.projector.named_parameters(prefix="mp")]:
                if "lora_B" in name or name.startswith("mp."):
                    param.normal_(0, 0.5)
        folder = model.save_pretrained(root / f"round-{n}", round_info(n))
        _png(folder / "loss.png", "red" if n == 1 else "blue")
        if n == 1:
            (folder / "metrics.json").write_text(json.dumps({"eval_loss": 2.1}))
        folders.append(folder)
    return folders


def _edit_tensors(path: Path, change) -> None:
    save_file(change(load_file(str(path))), str(path))


def _open_hidden(folder: Path) -> None:
    """config.json without mp_hidden_dim: the check then has only the tensors to go by."""
    data = json.loads((folder / "config.json").read_text())
    data["mmft"]["mp_hidden_dim"] = None
    (folder / "config.json").write_text(json.dumps(data))


def round_files(folder) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and any(fnmatch(p.relative_to(folder).as_posix(), pat) for pat in ROUND_PATTERNS)}


def push_cli(hub, *args, token=SECRET):
    """push_to_hub.py in a subprocess pointed at the local hub, online, with a token in the environment."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0"}
    return subprocess.run([sys.executable, str(ROOT / "push_to_hub.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def commit_posts(hub) -> list:
    return [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]


def test_two_rounds_publish_as_tagged_single_commits_and_pull_back_bit_exact(hub_online, rounds):
    r1, r2 = rounds
    done = push_cli(hub_online, r1, "--repo-id", REPO, "--private")
    assert done.returncode == 0, done.stderr
    assert HfApi().model_info(REPO).private
    assert SECRET not in done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-3:]
    sha1 = hub_online.refs(REPO)["tags"]["round-1"]
    assert last == ["revision: round-1", f"commit:   {sha1}", f"url:      {hub_online.url}/{REPO}/tree/round-1"]
    assert len(commit_posts(hub_online)) == 1

    hub_online.requests.clear()
    published = publish(plan_upload(r2, REPO))
    assert len(commit_posts(hub_online)) == 1  # one commit: adds and deletions together
    refs = hub_online.refs(REPO)
    sha2 = published.commit_id
    assert refs == {"branches": {"main": sha2}, "tags": {"round-1": sha1, "round-2": sha2}}
    assert [c.title for c in HfApi().list_repo_commits(REPO)] == ["Round 2", "Round 1", "initial commit"]

    # main is exactly round 2: round 1's metrics.json is gone.
    on_main = hub_online.files(REPO)
    assert set(on_main) == {".gitattributes", "README.md", *round_files(r2)} and "metrics.json" not in on_main
    assert "metrics.json" in hub_online.files(REPO, "round-1")

    for revision, folder in (("round-1", r1), (sha1, r1), ("round-2", r2), (sha2, r2), (None, r2)):
        pulled = pull_round(REPO, revision)
        assert round_files(pulled) == round_files(folder), revision
        assert not (pulled / "README.md").exists()  # only the round's files are fetched
    assert list_rounds(REPO) == [("round-1", sha1), ("round-2", sha2)]


def test_card_lists_every_round_with_valid_metadata(hub_online, rounds):
    for folder in rounds:
        publish(plan_upload(folder, REPO))
    card = ModelCard.load(REPO)  # main = round 2
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-text-to-text"
    assert {"llava", "lora", "clip", "phi3", "mmft", "feature-mode-patch"} <= set(card.data.tags)
    assert "qlora" not in card.data.tags and "QLoRA" not in card.text  # the run recorded no 4-bit base
    assert card.data.base_model is None  # the tiny LM is a local path, which the Hub would reject here
    assert card.data.datasets is None and "synthetic shapes demo data" in card.text
    table = [line for line in card.text.splitlines() if line.startswith("| round-")]
    assert [line.split(" | ")[0] for line in table] == ["| round-1", "| round-2"]
    assert table[1] == "| round-2 | 2026-11-22 | 400 | 3200 | 1 | 1.05 |"
    # this round's evaluation: each figure under its split (unprefixed = held-out)
    assert "| Color accuracy | 0.7 | — |" in card.text and "| Shape accuracy | 0.6 | — |" in card.text
    assert "![Training and evaluation loss of round 2](loss.png)" in card.text
    assert f'load_pipeline("{REPO}", revision="round-2")' in card.text
    old = ModelCard.load(hf_hub_download(REPO, "README.md", revision="round-1"))
    assert f'revision="round-1"' in old.text and "| round-2" not in old.text


def test_card_metadata_for_the_real_models():
    llava = {"round": 3, "quantize": "nf4", "stage": "finetune",
             "data": {"dataset": "liuhaotian/LLaVA-Instruct-150K", "train_json": "/data/llava.json"}}
    card = ModelCard(str(render_card(MMFTConfig(vit_feature_mode="pooled"), llava, "me/phi3-llava", 3, False)))
    assert card.data.base_model == "microsoft/Phi-3.5-mini-instruct" and card.data.license == "mit"
    assert card.data.datasets == ["liuhaotian/LLaVA-Instruct-150K"] and "feature-mode-pooled" in card.data.tags
    assert "qlora" in card.data.tags and "LoRA adapter trained with QLoRA (on a 4-bit NF4 base)." in card.text
    assert "openai/clip-vit-base-patch32" in card.text and "pooled" in card.text
    assert "not pinned" not in card.text and card.text.count("no revision recorded") == 2  # MMFTConfig pins nothing
    pinned = MMFTConfig(lm_revision="a" * 40, vit_revision="main")
    text = str(render_card(pinned, llava, "me/phi3-llava", 3, False))
    assert ("[`microsoft/Phi-3.5-mini-instruct`](https://huggingface.co/microsoft/Phi-3.5-mini-instruct/tree/"
            f"{'a' * 40}) at commit `{'a' * 40}` + LoRA") in text  # the commit the round loads
    assert "[`openai/clip-vit-base-patch32`](https://huggingface.co/openai/clip-vit-base-patch32/tree/main) at `main` " \
           "(a branch or tag, not pinned to a commit), frozen" in text
    rows = [line for line in card.text.splitlines() if line.startswith("| round-")]
    assert rows == ["| round-3 | — | — | — | — | — |"]  # no history: this round alone
    assert "No loss plot was recorded" in card.text and "records no evaluation" in card.text


def test_card_image_features_and_evaluation_follow_the_round():
    """The feature line says the layer and the CLS choice the round used; held-out and in-distribution
    figures of one kind sit in one row; `--round N` renumbers this run's row instead of adding one."""
    from mmft.card import feature_text

    assert "hidden state -2, every patch without CLS (49" in feature_text(MMFTConfig(vit_feature_mode="patch"))
    assert "last hidden state, CLS and every patch (50" in feature_text(
        MMFTConfig(vit_feature_mode="patch", vit_feature_layer=-1, vit_feature_select_strategy="full"))
    info = {"round": 1, "history": [{"round": 1, "steps": 9}],
            "metrics": {"color_accuracy": 0.9533, "indist_color_accuracy": 0.98, "refine_damage": 0.0,
                        "heldout_frames_accuracy": 0.86, "indist_only": 0.5}}
    card = ModelCard(str(render_card(MMFTConfig(), info, "me/r", 3, False)))
    assert "| Color accuracy | 0.9533 | 0.98 |" in card.text and "| Refine damage | 0 | — |" in card.text
    assert "| Frames accuracy (held-out subgroup) | 0.86 | — |" in card.text and "| Only | — | 0.5 |" in card.text
    assert [line for line in card.text.splitlines() if line.startswith("| round-")] == ["| round-3 | — | 9 | — | — | — |"]
    assert "| what | held-out | in-distribution |" in card.text and "independent" not in card.text
    # the demo's rounds also record the held-out pictures asked in an independent writer's wordings
    info["metrics"].update(independent_color_accuracy=0.91, independent_refine_damage=0.01, independent_only=0.3)
    card = ModelCard(str(render_card(MMFTConfig(), info, "me/r", 3, False)))
    assert "| what | held-out | independent wordings | in-distribution |\n| --- | --- | --- | --- |" in card.text
    assert "| Color accuracy | 0.9533 | 0.91 | 0.98 |" in card.text
    assert "| Refine damage | 0 | 0.01 | — |" in card.text
    assert "| Only | — | 0.3 | — |" in card.text
    assert "| Frames accuracy (held-out subgroup) | 0.86 | — | — |" in card.text
    assert "| Only | — | — | 0.5 |" in card.text
    assert "**independent wordings**: the same held-out pictures" in card.text
    card = ModelCard(str(render_card(MMFTConfig(), {"round": 1, "metrics": {"color_accuracy": 0.9,
                                                                            "independent_color_accuracy": 0.8}},
                                     "me/r", 1, False)))  # the column the card's text explains is there
    assert "| what | held-out | independent wordings | in-distribution |" in card.text
    assert "| Color accuracy | 0.9 | 0.8 | — |" in card.text
    stage1 = ModelCard(str(render_card(MMFTConfig(), {"round": 1, "stage": "projector", "quantize": "nf4"}, "me/r", 1,
                                       False)))
    assert "qlora" not in stage1.data.tags and "QLoRA" not in stage1.text
    assert "a LoRA adapter at LoRA's zero start: this round trained the projector alone" in stage1.text
    other = ModelCard(str(render_card(MMFTConfig(lm_model_id="Qwen/Qwen2.5-0.5B-Instruct", mp_depth=3),
                                      {"round": 1}, "me/r", 1, False)))  # the card says what config.json says
    assert "phi3" not in other.data.tags and "projector (Linear → GELU → Linear → GELU → Linear)" in other.text
    assert "phi3" in stage1.data.tags and "projector (Linear → GELU → Linear) into" in stage1.text
    later = ModelCard(str(render_card(MMFTConfig(), {"round": 2, "stage": "projector", "parent": {"round": 1}},
                                      "me/r", 2, False)))  # a projector stage after a fine-tuned round
    assert "a LoRA adapter as round 1 left it: this round trained the projector alone" in later.text


@pytest.mark.parametrize("data, datasets, text", [
    # what the run declared, wherever its files were: a shapes run outside any "shapes" path ...
    ({"dataset": "synthetic shapes world (mmft.shapes)", "train_json": "/work/data/train.json"}, None,
     "synthetic shapes demo data"),
    ({"synthetic": True, "train_json": "llava_instruct_150k.json"}, None, "synthetic shapes demo data"),
    # ... a Hub data set (only a repo id becomes metadata), free text, or nothing at all
    ({"dataset": "me/my-vqa", "train_json": "shapes/train.json"}, ["me/my-vqa"], "Trained on [me/my-vqa]"),
    ({"dataset": "liuhaotian/LLaVA-Instruct-150K"}, ["liuhaotian/LLaVA-Instruct-150K"],
     "licence as CC BY 4.0, its use subject to OpenAI's terms of use"),  # not the base model's MIT
    ({"dataset": "my holiday photos"}, None, "Trained on my holiday photos (as the training run declared it"),
    ({"train_json": "llava_instruct_150k.json"}, None, "does not say what it was trained on"),
])
def test_card_names_the_data_the_run_declared(data, datasets, text):
    card = ModelCard(str(render_card(MMFTConfig(), {"round": 1, "data": data}, "me/x", 1, True)))
    assert card.data.datasets == datasets and text in card.text
    assert ("LLaVA-Instruct" in card.text) is (datasets == ["liuhaotian/LLaVA-Instruct-150K"])  # only when declared
    assert "![Training and evaluation loss of round 1](loss.png)" in card.text


@pytest.mark.parametrize("lm_id", ["./base/lm", "../base/lm", "/srv/base/lm", "microsoft/Phi-3.5-mini-instruct", "base/lm"])
def test_card_claims_a_base_model_only_for_a_hub_id(lm_id, tmp_path, monkeypatch):
    cfg = MMFTConfig(lm_model_id=lm_id)
    cards = []
    for cwd in (tmp_path, tmp_path / "base" / "lm" / "x"):  # where "base/lm" is and is not a folder
        cwd.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(cwd)
        cards.append(str(render_card(cfg, {"round": 1}, "me/x", 1, False)))
    assert cards[0] == cards[1]  # the same bytes wherever the push runs: a re-run stays identical
    hub_id = lm_id in ("microsoft/Phi-3.5-mini-instruct", "base/lm")
    assert ModelCard(cards[0]).data.base_model == (lm_id if hub_id else None)


def test_a_changed_round_under_an_existing_tag_is_refused_and_force_republishes(hub_online, rounds, tmp_path):
    first = publish(plan_upload(rounds[0], REPO))
    changed = tmp_path / "round-1-changed"
    shutil.copytree(rounds[0], changed)
    for name in ("projector.safetensors", "adapter/adapter_model.safetensors"):  # retrained: new weights
        shutil.copy(rounds[1] / name, changed / name)
    before_refs, before_files = hub_online.refs(REPO), hub_online.files(REPO)
    hub_online.requests.clear()
    done = push_cli(hub_online, changed, "--repo-id", REPO)
    assert done.returncode == 1 and "already has round-1" in done.stderr and "other files" in done.stderr
    assert "--force" in done.stderr and SECRET not in done.stdout + done.stderr
    assert hub_online.refs(REPO) == before_refs and hub_online.files(REPO) == before_files
    assert commit_posts(hub_online) == []
    with pytest.raises(RoundExists):
        publish(plan_upload(rounds[1], REPO, number=1))

    done = push_cli(hub_online, changed, "--repo-id", REPO, "--force")  # republish, move the tag
    assert done.returncode == 0, done.stderr
    refs = hub_online.refs(REPO)
    assert refs["tags"] == {"round-1": refs["branches"]["main"]} and refs["tags"]["round-1"] != first.commit_id
    assert round_files(pull_round(REPO, "round-1")) == round_files(changed)


def test_a_push_interrupted_after_its_commit_completes_when_run_again(hub_online, rounds, monkeypatch):
    def network_drops(*args, **kwargs):
        raise ConnectionError("the connection dropped")

    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "create_tag", network_drops)
        with pytest.raises(ConnectionError):
            publish(plan_upload(rounds[0], REPO))
    main = hub_online.refs(REPO)["branches"]["main"]
    assert hub_online.refs(REPO)["tags"] == {}  # main is the new round, with no tag
    hub_online.requests.clear()
    done = push_cli(hub_online, rounds[0], "--repo-id", REPO)
    assert done.returncode == 0, done.stderr
    assert hub_online.refs(REPO) == {"branches": {"main": main}, "tags": {"round-1": main}}
    assert commit_posts(hub_online) == []  # tagged the commit already there, no second one
    assert [c.title for c in HfApi().list_repo_commits(REPO)] == ["Round 1", "initial commit"]


def test_a_push_interrupted_after_its_tag_reports_already_published_when_run_again(hub_online, rounds):
    first = publish(plan_upload(rounds[0], REPO))  # everything happened; the reply was lost
    assert not first.already
    before = hub_online.refs(REPO)
    hub_online.requests.clear()
    done = push_cli(hub_online, rounds[0], "--repo-id", REPO)
    assert done.returncode == 0, done.stderr
    assert "already published, identical" in done.stdout and f"commit:   {first.commit_id}" in done.stdout
    assert hub_online.refs(REPO) == before and commit_posts(hub_online) == []
    assert [r for r in hub_online.requests if r[0] != "GET"] == [("POST", "/api/repos/create")]


def test_published_config_has_no_build_machine_paths(hub_online, rounds, tmp_path):
    folder = tmp_path / "round"
    shutil.copytree(rounds[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["round"]["data"].update(train_json="/tmp/tmpy9ihr99t/data/train.json",
                                   feature_cache="/tmp/tmpy9ihr99t/cache-patch/", image_dir="images",
                                   eval_json=r"C:\Users\alice\data\eval.json", mirror=r"\\buildbox\share\cache")
    config["round"]["parent"] = {"round": 0, "source": "/home/me/runs/round-0"}
    (folder / "config.json").write_text(json.dumps(config))
    done = push_cli(hub_online, folder, "--repo-id", REPO)
    assert done.returncode == 0, done.stderr
    assert "warning: lm_model_id is the local path" in done.stderr and "vit_model_id" in done.stderr
    published = json.loads(hub_online.files(REPO)["config.json"])
    assert "/tmp/" not in json.dumps(published["round"]) and "/home/" not in json.dumps(published["round"])
    data = published["round"]["data"]
    assert (data["train_json"], data["feature_cache"], data["image_dir"]) == ("train.json", "cache-patch", "images")
    assert (data["eval_json"], data["mirror"]) == ("eval.json", "cache")  # trained on Windows, published here
    assert published["round"]["parent"] == {"round": 0, "source": "round-0"}
    assert published["mmft"] == config["mmft"]  # the model config travels as it is (the tiny models' paths: warned)


def test_only_the_rounds_own_files_travel_and_local_bases_are_warned_about(rounds, tmp_path, monkeypatch):
    folder = tmp_path / "round"
    shutil.copytree(rounds[0], folder)
    for name in ("adapter/rng_state.pickle", "adapter/last.ckpt", "adapter/README.md", "notes.txt",
                 "adapter/optimizer_state.safetensors", "adapter/trainer_state.json"):  # the last two: valid types,
        (folder / name).write_bytes(b"not for the Hub")  # a checkpoint's leftovers (its paths), PEFT's stub card
    config = json.loads((folder / "config.json").read_text())
    config["mmft"].update(lm_model_id="../base/lm", vit_model_id="base/clip")
    (folder / "config.json").write_text(json.dumps(config))
    (tmp_path / "base" / "clip").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    upload = plan_upload(folder, REPO)
    assert set(upload.files) == {"config.json", "projector.safetensors", "adapter/adapter_config.json",
                                 "adapter/adapter_model.safetensors", "metrics.json", "loss.png"}
    lm, clip = upload.warnings
    assert lm.startswith("lm_model_id is the local path '../base/lm'")
    assert clip.startswith("vit_model_id 'base/clip' is a folder here but a Hub repo id anywhere else")
    # Hub ids: a branch (or nothing) is not the weights the round was trained on; a commit is
    config["mmft"].update(lm_model_id="microsoft/Phi-3.5-mini-instruct", lm_revision="main",
                          vit_model_id="openai/clip-vit-base-patch32", vit_revision="a" * 40)
    (folder / "config.json").write_text(json.dumps(config))
    (lm,) = plan_upload(folder, REPO).warnings
    assert lm.startswith("lm_model_id microsoft/Phi-3.5-mini-instruct is not pinned to a commit (lm_revision='main')")


def test_hub_errors_reach_the_console_as_one_line_saying_what_to_do(hub_online, rounds):
    done = push_cli(hub_online, rounds[0], "--repo-id", REPO, token="")  # no token at all
    assert done.returncode == 1 and done.stdout.startswith("Publishing ")
    lines = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]  # the tiny bases' paths
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "401" in lines[0] and "set HF_TOKEN" in lines[0]
    pasted = SECRET[:6] + "\u200b" + SECRET[6:]  # copied with a zero-width space: the header cannot carry it
    done = push_cli(hub_online, rounds[0], "--repo-id", REPO, token=pasted)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]
    assert done.returncode == 1 and lines == ["error: the Hub token (HF_TOKEN or the one `hf auth login` stored) "
                                              "holds a character that is not ASCII (U+200B): copy it again"], lines


def test_an_unreachable_hub_and_a_bad_round_number_are_named(rounds, tmp_path):
    from tests.hub_server import free_port

    class Unreachable:  # nothing listens on this port
        url = f"http://127.0.0.1:{free_port()}"

    done = push_cli(Unreachable, rounds[0], "--repo-id", REPO)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]
    assert done.returncode == 1 and lines == [lines[0]] and SECRET not in done.stderr
    assert lines[0].startswith(f"error: cannot reach the Hub at {Unreachable.url}: "), lines
    done = push_cli(Unreachable, rounds[0], "--repo-id", REPO, "--round", "0", "--dry-run")
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == "error: --round must be a positive integer, got 0"


def test_pulled_round_reproduces_the_local_round(hub_online, rounds):
    publish(plan_upload(rounds[0], REPO))
    local = Pipeline.from_round(rounds[0], device="cpu", dtype=torch.float32)
    pulled = load_pipeline(REPO, "round-1", device="cpu", dtype=torch.float32)
    image = Image.new("RGB", (60, 60), "red")
    logits = []
    for pipe in (local, pulled):
        batch = pipe._batch([pipe._encode(QUESTION, True)], pipe.model.vision.preprocess([image]))
        with torch.no_grad():
            logits.append(pipe.model(**batch).logits)
    assert torch.equal(*logits)
    assert vars(local.answer_image(image, QUESTION)) == vars(pulled.answer_image(image, QUESTION))


def test_offline_pull_uses_the_cache(hub_online, rounds, monkeypatch):
    for folder in rounds:
        publish(plan_upload(folder, REPO))
    sha1 = hub_online.refs(REPO)["tags"]["round-1"]
    online = pull_round(REPO, "round-1")
    assert pull_round(REPO, sha1) == online

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_online.requests.clear()
    assert pull_round(REPO, "round-1") == online and pull_round(REPO, sha1) == online
    assert list_rounds(REPO) == [("round-1", sha1)]  # offline: the rounds this cache has seen
    start = time.monotonic()
    with pytest.raises(RoundNotFound) as err:
        pull_round(REPO, "round-2")
    assert time.monotonic() - start < 5
    assert hub_online.requests == []
    message = str(err.value)
    assert REPO in message and "'round-2'" in message and "offline" in message and "Pull it once online" in message


def test_network_down_fails_fast_with_one_clear_error(tmp_path):
    """The Hub unreachable (a closed port) and nothing cached: one RoundNotFound, no retry storm."""
    code = ("import time; from mmft.hub import pull_round, RoundNotFound\n"
            "start = time.monotonic()\n"
            "try:\n    pull_round('user/mmft-demo', 'round-1')\n"
            "except RoundNotFound as err:\n    print(f'{time.monotonic() - start:.2f}'); print(err)\n")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_CACHE": str(tmp_path / "home/hub"), "HF_HUB_OFFLINE": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout, done.stderr
    seconds, message = done.stdout.split("\n", 1)
    assert float(seconds) < 5, done.stderr
    assert "user/mmft-demo" in message and "'round-1'" in message and "could not be reached" in message


def test_unknown_revision_or_repo_is_a_clear_error(hub_online, rounds):
    publish(plan_upload(rounds[0], REPO))
    with pytest.raises(RoundNotFound, match=rf"{REPO} has no revision 'round-9'.*list_rounds"):
        pull_round(REPO, "round-9")
    with pytest.raises(RoundNotFound, match="user/nothing-here not found"):
        pull_round("user/nothing-here", "round-1")
    with pytest.raises(RoundNotFound, match="neither a round folder on disk nor a Hub repo id"):
        pull_round("no-such-folder")
    HfApi().create_repo("user/empty")
    with pytest.raises(RoundNotFound, match="does not hold a complete round"):
        pull_round("user/empty")


REFUSED = ("the Hub refused the token (HTTP 401: invalid or expired): set a valid HF_TOKEN (on a Space, as a "
           "secret) or run `hf auth login`; a public repo needs no token")


def test_a_refused_or_mistyped_token_is_named_when_pulling_and_listing(hub_online, rounds, monkeypatch):
    publish(plan_upload(rounds[0], REPO))  # public
    hub_online.revoked.add(DUMMY_TOKEN)  # expired since: the Hub refuses it on every request, public repos too
    with pytest.raises(RoundNotFound) as pulled:
        pull_round(REPO, "round-1")
    assert str(pulled.value) == f"cannot pull {REPO} at revision 'round-1': {REFUSED}"  # not "could not be reached"
    with pytest.raises(RoundNotFound) as listed:
        list_rounds(REPO)
    assert str(listed.value) == f"cannot list the rounds of {REPO}: {REFUSED}"
    hub_online.revoked.clear()

    def forbidden(*args, **kwargs):  # a valid fine-grained token without read access to this repo
        raise HubError(403, "Forbidden")

    with monkeypatch.context() as patch:
        patch.setattr(hub_online, "_route", forbidden)
        for call in (lambda: pull_round(REPO, "round-1"), lambda: list_rounds(REPO)):  # the pull's 403 is wrapped
            with pytest.raises(RoundNotFound, match=r": the token may not read it \(HTTP 403\): give it read access"):
                call()
    monkeypatch.setenv("HF_TOKEN", "hf_caf\u00e9")  # pasted with an accent: no HTTP header can carry it
    for call in (lambda: pull_round(REPO, "round-1"), lambda: list_rounds(REPO)):
        with pytest.raises(RoundNotFound, match=r"holds a character that is not ASCII \(U\+00E9\): copy it again$"):
            call()
    monkeypatch.delenv("HF_TOKEN")  # no token: the public round pulls
    assert round_files(pull_round(REPO, "round-1")) == round_files(rounds[0])


@pytest.mark.parametrize("name, problem", [
    ("user/bad..name", "Cannot have -- or .. in repo_id"),
    ("user/bad--name", "Cannot have -- or .. in repo_id"),
    ("user/name-", "cannot start or end with '-' or '.'"),
    ("user/name.", "cannot start or end with '-' or '.'"),
    ("user/ok.git", "cannot end by '.git'"),
    ("user/" + "y" * 97, "the maximum length is 96"),
])
def test_names_the_hub_refuses_are_refused_before_anything_is_sent(hub_online, rounds, name, problem):
    done = push_cli(hub_online, rounds[0], "--repo-id", name, "--dry-run")
    assert done.returncode == 1 and hub_online.requests == []
    (line,) = [x for x in done.stderr.splitlines() if not x.startswith("warning: ")]
    assert line.startswith("error: --repo-id is not a name the Hub accepts: ") and problem in line, line


def test_an_export_name_the_hub_refuses_stops_the_push_before_the_round_goes_up(hub_online, rounds, capsys):
    from mmft.space import main as space_main

    name = "user/" + "y" * 93  # the round's name is fine; with "-llava" (99 characters) the export's is not
    for extra in (["--dry-run"], []):
        done = push_cli(hub_online, rounds[0], "--repo-id", name, "--export", "llava", *extra)
        assert done.returncode == 1 and hub_online.requests == [], done.stdout  # nothing published, either way
        (line,) = [x for x in done.stderr.splitlines() if not x.startswith("warning: ")]
        assert line.startswith("error: --repo-id with '-llava' added (the export's repo) is not a name the Hub "
                               "accepts: ") and "the maximum length is 96" in line
    assert space_main(["user/my--space", "--dry-run"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the Space id is not a name the Hub accepts: Cannot have -- or .. in repo_id: 'user/my--space'."]


def test_local_folder_is_returned_as_is(rounds):
    assert pull_round(rounds[0]) == rounds[0]
    with pytest.raises(ValueError, match="local folder"):
        pull_round(rounds[0], "round-1")


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "checkpoint-400").mkdir() or (f / "checkpoint-400/optimizer.pt").write_bytes(b"x"),
     "pickle files \\(checkpoint-400/optimizer.pt\\)"),
    (lambda f: (f / "projector.safetensors").unlink(), "missing projector.safetensors"),
    (lambda f: (f / "adapter/adapter_model.safetensors").write_bytes(b"\0" * 64), "not a readable safetensors"),
    (lambda f: (f / "config.json").write_text("{}"), "not a valid mmft config"),
    (lambda f: (f / "adapter/adapter_config.json").write_text("[1"), "not a PEFT adapter config"),
    (lambda f: (f / "config.json").write_text(json.dumps({"mmft": json.loads((f / "config.json").read_text())["mmft"],
                                                          "round": {}})), "pass --round N"),
    (lambda f: (f / "config.json").write_text(json.dumps({"mmft": {"lora_r": 4}})), "does not match config.json"),
    (lambda f: save_file({"linear_1.weight": torch.full((3, 3), float("nan"))}, f / "projector.safetensors"),
     "NaN or Inf values in linear_1.weight"),
    (lambda f: save_file({"linear_1.weight": torch.zeros(3, 3)}, f / "projector.safetensors"),
     r"holds tensors \['linear_1.weight'\], but a projector of mp_depth=2 holds"),
    (lambda f: _edit_tensors(f / "projector.safetensors", lambda t: {**t, "linear_2.bias": torch.zeros(5)}),
     r"linear_2.bias has shape \(5,\), but config.json .* says \(64,\)"),
    (lambda f: _edit_tensors(f / "adapter/adapter_model.safetensors",
                             lambda t: {k.replace("o_proj", "dense"): v for k, v in t.items()}),
     "unexpected tensor .*dense.lora_A.weight"),
    (lambda f: _edit_tensors(f / "adapter/adapter_model.safetensors",
                             lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.o_proj.lora_B" not in k}),
     "o_proj has lora_A but not its pair"),
    (lambda f: _edit_tensors(f / "adapter/adapter_model.safetensors",
                             lambda t: {k: v * float("inf") for k, v in t.items()}), "NaN or Inf"),
    (lambda f: _edit_tensors(f / "adapter/adapter_model.safetensors",  # one layer's B for another width
                             lambda t: {k: (v[:7] if "layers.1.self_attn.o_proj.lora_B" in k else v)
                                        for k, v in t.items()}),
     r"layers.1.self_attn.o_proj maps 64 -> 7, but .*layers.0.self_attn.o_proj maps 64 -> 64"),
    (lambda f: (f / "adapter/adapter_config.json").write_text(json.dumps(
        {**json.loads((f / "adapter/adapter_config.json").read_text()), "target_modules": 5})),
     "adapter_config.json: target_modules is 5, expected a module name or a list"),
    (lambda f: (f / "adapter/adapter_config.json").write_text(json.dumps(
        {**json.loads((f / "adapter/adapter_config.json").read_text()), "lora_alpha": 1600})),
     r"lora_alpha=1600, targets .* does not match config.json \(lora_r=8, lora_alpha=16,"),
    # names PEFT would not load (it only warns; the round would be the base model), missing targets and layers
    (lambda f: _edit_tensors(f / "adapter/adapter_model.safetensors",
                             lambda t: {k.replace("base_model.model.", "wrong.prefix."): v for k, v in t.items()}),
     r"unexpected tensor wrong\.prefix\..*named base_model\.model\.<module>"),
    (lambda f: _edit_tensors(f / "adapter/adapter_model.safetensors",
                             lambda t: {k: v for k, v in t.items() if "gate_up_proj" not in k}),
     "has no LoRA weights for gate_up_proj, which adapter_config.json targets"),
    (lambda f: _edit_tensors(f / "adapter/adapter_model.safetensors",
                             lambda t: {k: v for k, v in t.items() if "layers.1.mlp.down_proj" not in k}),
     r"targets sit on different layers \(down_proj: 1 layers, gate_up_proj: 2 layers"),
    # integer weights would load as floats, silently; a projector whose layers do not chain
    (lambda f: _edit_tensors(f / "projector.safetensors", lambda t: {k: v.to(torch.int8) for k, v in t.items()}),
     r"non-float tensors: linear_1.bias \(torch.int8\)"),
    (lambda f: _open_hidden(f) or _edit_tensors(f / "projector.safetensors", lambda t: {
        **t, "linear_1.weight": torch.zeros(48, t["linear_1.weight"].shape[1]), "linear_1.bias": torch.zeros(48),
        "linear_2.weight": torch.zeros(t["linear_2.weight"].shape[0], 40)}),
     r"linear_1.weight \(48, 32\), linear_1.bias \(48,\), linear_2.weight \(64, 40\) do not chain"),
])
def test_bad_folders_are_refused_before_any_request(hub_online, rounds, tmp_path, damage, message):
    folder = tmp_path / "round"
    shutil.copytree(rounds[0], folder)
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        plan_upload(folder, REPO)
    assert hub_online.requests == []


def test_a_round_with_lora_on_the_embeddings_saves_and_checks_its_lora_only(tiny_dir, tmp_path):
    """LoRA on embed_tokens (lora_target_modules allows it): PEFT saves its lora_embedding_A/B and, left to
    itself, the whole frozen embedding matrix too (the bulk of a real round), which the check refused."""
    cfg = MMFTConfig(lm_model_id=str(tiny_dir / "lm"), vit_model_id=str(tiny_dir / "clip"), lora_r=4,
                     lora_target_modules=["qkv_proj", "embed_tokens"])
    model = build_model(cfg, device="cpu", dtype=torch.float32, trainable=True)
    model.save_pretrained(tmp_path / "round", {"round": 1})
    names = set(load_file(str(tmp_path / "round/adapter/adapter_model.safetensors")))
    assert {n for n in names if "embed_tokens" in n} == {"base_model.model.model.embed_tokens.lora_embedding_A",
                                                         "base_model.model.model.embed_tokens.lora_embedding_B"}
    assert check_round(tmp_path / "round")[0].lora_target_modules == ["qkv_proj", "embed_tokens"]


def test_cli_refuses_a_pickle_and_dry_run_sends_nothing(hub_online, rounds, tmp_path):
    folder = tmp_path / "round"
    shutil.copytree(rounds[1], folder)
    (folder / "adapter/adapter_model.bin").write_bytes(b"pickle")
    done = push_cli(hub_online, folder, "--repo-id", REPO)
    assert done.returncode == 1 and "error:" in done.stderr and "adapter/adapter_model.bin" in done.stderr
    (folder / "adapter/adapter_model.bin").unlink()

    done = push_cli(hub_online, folder, "--repo-id", REPO, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert hub_online.requests == []
    sizes = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines() if line.startswith("  ")}
    assert {p for p in sizes if p != "README.md"} == set(round_files(folder))
    assert sizes["projector.safetensors"] == f"{(folder / 'projector.safetensors').stat().st_size:,}"
    assert "library_name: peft" in done.stdout and "| round-2 |" in done.stdout
    assert SECRET not in done.stdout + done.stderr


# -- deploying the app to a Space ----------------------------------------------------------------
def _lfs_patterns(gitattributes: bytes) -> list[str]:
    return [line.split()[0] for line in gitattributes.decode().splitlines()
            if line.strip() and not line.startswith("#") and "filter=lfs" in line]


def _is_binary(data: bytes) -> bool:
    """What a Space refuses outside LFS: NUL bytes or not UTF-8 text."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return b"\0" in data


@pytest.mark.parametrize("variables, message", [
    (["MMFT_THREADS=2", "MMFT_THREADS=4"], "error: --variable MMFT_THREADS is given twice"),
    (["MMFT_THREADS=2", "MMFT_QUANTIZE"], "error: --variable takes KEY=VALUE, got 'MMFT_QUANTIZE' without '='"),
    (["=none"], "error: --variable takes KEY=VALUE, got an empty KEY"),
    (["MMFT_REPO=a/b", "HF_TOKEN=hf_abc"], "error: --variable HF_TOKEN looks like a secret, and Space variables are "
                                           "public: set it as a Secret in the Space's settings instead"),
])
def test_space_variables_are_checked_one_by_one(variables, message, capsys):
    from mmft.space import main

    assert main(["user/space", "--dry-run", *[a for v in variables for a in ("--variable", v)]]) == 2
    assert capsys.readouterr().err.splitlines() == [message]


def test_space_variables_the_app_refuses_are_refused_before_anything_is_sent(hub_online, capsys):
    from mmft.space import deploy, main

    assert main(["user/space", "--dry-run", "--variable", "MMFT_QUANTIZE=int4"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the Space would not start with these variables: MMFT_QUANTIZE='int4': choose one of nf4, int8, none"]
    with pytest.raises(ValueError, match=r"would not start with these variables: --threads / MMFT_THREADS 9999: "
                                         r"use 1 to 1024"):
        deploy("user/space", variables={"MMFT_REPO": "user/rounds", "MMFT_THREADS": "9999"})
    assert hub_online.requests == []


@pytest.mark.slow
def test_space_deploy_uploads_what_the_app_needs_and_it_runs(hub_online, tmp_path):
    from huggingface_hub import snapshot_download

    from mmft.space import space_files

    space = "user/mmft-space"
    env = {**os.environ, "HF_ENDPOINT": hub_online.url, "HF_TOKEN": SECRET, "HF_HUB_OFFLINE": "0"}
    done = subprocess.run([sys.executable, "-m", "mmft.space", space, "--variable", "MMFT_QUANTIZE=none",
                           "--variable", "MMFT_THREADS=2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr and done.stdout.startswith("deployed ")
    again = subprocess.run([sys.executable, "-m", "mmft.space", space], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)  # nothing changed: said so, not a new deployment
    assert again.returncode == 0 and again.stdout.startswith("nothing to deploy: the Space already holds"), again
    files = hub_online.files(space, repo_type="space")
    assert set(files) == set(space_files(ROOT)) and "app.py" in files and "demo/round/projector.safetensors" in files
    assert not [p for p in files if p.startswith(("tests/", "train/", "bench/"))]
    assert {"docs/benchmarks.md", "docs/training.md", "docs/screenshot.png"} <= set(files)  # README's links work
    lfs = _lfs_patterns(files[".gitattributes"])  # every binary file is LFS on the Space
    binaries = [p for p, data in files.items() if _is_binary(data)]
    assert "demo/base/lm/model.safetensors" in binaries
    assert all(any(fnmatch(Path(p).name, pat) for pat in lfs) for p in binaries), binaries
    assert any(fnmatch("tokenizer.json", pat) for pat in lfs)
    assert hub_online.space(space) == {"sdk": "gradio", "variables": {"MMFT_QUANTIZE": "none", "MMFT_THREADS": "2"}}
    card = ModelCard(files["README.md"].decode())  # the front matter configures the Space
    assert (card.data.sdk, card.data.app_file) == ("gradio", "app.py")

    # the Space's files alone serve the demo (offline: nothing else to fetch)
    here = Path(snapshot_download(space, repo_type="space", local_dir=tmp_path / "space"))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMFT_THREADS": "1", "GRADIO_SERVER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=here, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        from gradio_client import Client

        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            assert proc.poll() is None, proc.stderr.read()
            try:
                client = Client(url, verbose=False, analytics_enabled=False)
                break
            except Exception:
                time.sleep(1)
        assert client.predict("Hello", api_name="/text")[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_space_files_take_no_nested_or_hidden_strays(tmp_path):
    """`*` stays within one path segment and dotfiles stay home unless named: a scratch module under
    mmft/ or a .env beside the demo's weights must never reach a public Space."""
    from mmft.space import space_files

    for path in ("app.py", "mmft/model.py", "mmft/scratch/secrets.py", "mmft/.hidden.py", "demo/base/lm/config.json",
                 "demo/base/lm/.env", "demo/base/lm/sub/x.bin", "docs/benchmarks.md", "docs/notes.md",
                 ".gitattributes", "mmft/__pycache__/model.cpython-311.pyc", "demo/round/adapter/adapter_[1].json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    assert space_files(tmp_path) == [".gitattributes", "app.py", "demo/base/lm/config.json",
                                     "demo/round/adapter/adapter_[1].json", "docs/benchmarks.md", "mmft/model.py"]


def _checkout(folder, paths, commit):
    for path in paths:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(f"{path} as committed\n")
    git = ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", *commit], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
    return git


def test_space_files_in_a_checkout_are_the_committed_ones(tmp_path):
    """An untracked or only staged module under mmft/ matches `mmft/*.py` but is not committed work: it
    stays home, and the command says so."""
    from mmft.space import space_files

    committed = ["app.py", "mmft/model.py", "demo/round/config.json"]
    git = _checkout(tmp_path, committed + ["mmft/scratch.py"], committed)
    skipped = []
    assert space_files(tmp_path, skipped) == ["app.py", "demo/round/config.json", "mmft/model.py"]
    assert skipped == ["mmft/scratch.py"]
    subprocess.run(git + ["add", "mmft/scratch.py"], check=True)  # staged is not committed
    assert "mmft/scratch.py" not in space_files(tmp_path)
    subprocess.run(git + ["commit", "-q", "-m", "y"], check=True)
    assert "mmft/scratch.py" in space_files(tmp_path)


def test_space_deploy_sends_committed_bytes_not_uncommitted_edits(hub_online, tmp_path):
    """A debug edit to a committed file (a hard-coded token, a print) must not go public: the Space gets
    the file as committed, and the command names it."""
    from mmft.space import deploy, edited

    committed = ["app.py", "mmft/model.py", "README.md"]
    _checkout(tmp_path, committed, committed)
    (tmp_path / "app.py").write_text("TOKEN = 'hf_debug'  # an uncommitted edit\n")
    assert edited(tmp_path, committed) == ["app.py"]
    deploy("user/edited", root=tmp_path)
    files = hub_online.files("user/edited", repo_type="space")
    assert files["app.py"] == b"app.py as committed\n" and files["mmft/model.py"] == b"mmft/model.py as committed\n"
    assert (tmp_path / "app.py").read_text().startswith("TOKEN")  # the working copy is left as it was


def test_space_deploy_sends_the_last_commit_from_a_subfolder_after_a_move(hub_online, tmp_path):
    """The project in a subfolder of its repository, a committed module moved away (not committed): the
    Space still gets the last commit's files, as committed; the new name stays home."""
    from mmft.space import deploy, space_files

    paths = ["proj/app.py", "proj/mmft/model.py", "proj/README.md", "other/secret.py"]
    git = _checkout(tmp_path, paths, paths)
    (tmp_path / "proj" / "app.py").write_text("print('debug')\n")
    subprocess.run(git + ["mv", "proj/mmft/model.py", "proj/mmft/model2.py"], check=True)
    project = tmp_path / "proj"
    skipped = []
    assert space_files(project, skipped) == ["README.md", "app.py", "mmft/model.py"] and skipped == ["mmft/model2.py"]
    deploy("user/moved", root=project)
    files = hub_online.files("user/moved", repo_type="space")
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == {
        "app.py": b"proj/app.py as committed\n", "mmft/model.py": b"proj/mmft/model.py as committed\n",
        "README.md": b"proj/README.md as committed\n"}


def test_space_bytes_come_from_git_whatever_the_working_copy_says(tmp_path, monkeypatch):
    """An edit git is told to ignore (`--skip-worktree`) stays home; a committed symlink is refused (its target
    is whatever is on disk now); a checkout where git cannot be run is refused, not deployed from the disk."""
    from mmft import space

    committed = ["app.py", "mmft/model.py"]
    git = _checkout(tmp_path, committed, committed)
    (tmp_path / "app.py").write_text("TOKEN = 'hf_hidden'\n")
    subprocess.run(git + ["update-index", "--skip-worktree", "app.py"], check=True)
    assert space.committed_bytes(tmp_path, committed)["app.py"] == b"app.py as committed\n"
    (tmp_path / "secret.txt").write_text("SECRET=1\n")
    (tmp_path / "mmft" / "cfg.py").symlink_to("../secret.txt")
    subprocess.run(git + ["add", "mmft/cfg.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "link"], check=True)
    with pytest.raises(RuntimeError, match="mmft/cfg.py is not a plain file in the last commit"):
        space.committed_bytes(tmp_path, space.space_files(tmp_path))
    monkeypatch.setattr(space.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # git is not found
    with pytest.raises(RuntimeError, match="is a git checkout but git cannot be run"):
        space.space_files(tmp_path)


def test_space_command_says_in_one_line_when_git_cannot_run(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no git on it (python is run by its full path)
    done = subprocess.run([sys.executable, "-m", "mmft.space", "user/x", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f"error: {ROOT} is a git checkout but git cannot be run: install git, so that only committed files go to "
        "the Space"], done.stderr


def test_space_deploy_refuses_a_checkout_with_nothing_committed(hub_online, tmp_path):
    """`git init` + `git add`, no commit: nothing of the Space is committed, so nothing is sent (an upload of
    no files with delete_patterns="*" would empty the live Space)."""
    from mmft.space import NothingCommitted, deploy

    for path in ("app.py", "mmft/model.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    subprocess.run(["git", "-C", str(tmp_path), "init", "-q"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "-A"], check=True)
    hub_online.requests.clear()
    with pytest.raises(NothingCommitted, match="no file of the Space is committed"):
        deploy("user/live", root=tmp_path)
    assert not hub_online.requests


def test_round_number_override_is_the_one_in_config_json_and_nested_files_stay(rounds, tmp_path):
    """`--round N`: tag, card and the published config.json say N; only the round's own files travel
    (`adapter/*.json` does not take a nested `adapter/old/...`, nor a stray dotfile)."""
    import shutil

    folder = Path(shutil.copytree(rounds[1], tmp_path / "r"))
    (folder / "adapter" / "old").mkdir()
    (folder / "adapter" / "old" / "adapter_config.json").write_text("{}")
    (folder / "adapter" / ".env.json").write_text("{}")
    upload = plan_upload(folder, REPO, number=5)
    published = json.loads(upload.files["config.json"])["round"]
    assert upload.tag == "round-5" and published["round"] == 5 and published["history"][-1]["round"] == 5
    assert not [p for p in upload.files if p.startswith("adapter/old") or "/." in p]
    assert json.loads(plan_upload(folder, REPO).files["config.json"])["round"]["round"] == 2


def test_an_undeclared_data_set_is_carded_as_undeclared():
    """No --dataset_name: the card claims no data set (it used to default to LLaVA-Instruct-150K)."""
    from mmft.config import RunArguments

    run = RunArguments(train_json="/data/receipts_vqa.json")
    assert run.dataset_name is None
    info = {"round": 1, "data": {"dataset": run.dataset_name, "train_json": run.train_json}}
    card = ModelCard(str(render_card(MMFTConfig(), info, "me/r", 1, False)))
    assert card.data.datasets is None and "LLaVA-Instruct" not in card.text
    assert "does not say what it was trained on" in card.text
