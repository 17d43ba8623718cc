"""Exporting a round as a plain transformers Llava model: same model, same prompt, same answers.

Everything numeric runs in float32 on CPU (`pick_dtype` would pick bf16 on CPUs that have it).
Tolerance for logits, 1e-4: the export computes the same functions in the same order except for
the LoRA merge (W + s*B@A applied once, instead of W@x + s*B@(A@x)), which only re-associates
float32 sums: differences of a few ulps of the ~1-10 sized activations (~1e-6), through 2 tiny
layers. 1e-4 leaves room for BLAS kernels that block sums differently on other CPUs and still
catches any real difference (a wrong weight, a missing CLS token or a shifted image slot moves
logits by >1e-2).
"""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

from mmft.config import load_config, MMFTConfig
from mmft.export import IMAGE_TOKEN, ExportError, export_llava, feature_choice
from mmft.loading import build_model, load_round
from mmft.pipeline import Pipeline
from mmft.prompt import encode_chat
from mmft.shapes import draw
from mmft.text import tidy

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What colour is the shape?"
LOGIT_TOL = 1e-4  # see the module docstring


def _photo(seed: int = 0, size=(80, 64)) -> Image.Image:
    """A non-square noise picture: resize and centre crop both matter."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _make_round(lm_dir: Path, clip_dir: Path, out: Path, mode: str = "patch") -> Path:
    cfg = MMFTConfig(lm_model_id=str(lm_dir), vit_model_id=str(clip_dir), vit_feature_mode=mode, lora_r=8,
                     lora_alpha=16, lora_dropout=0.0, gen_max_new_tokens=12)
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu", dtype=torch.float32, trainable=True)
    with torch.no_grad():  # LoRA B starts at zero (an identity adapter): make the merge matter
        for name, param in model.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.save_pretrained(out, {"round": 3})


@pytest.fixture(scope="module")
def kit_round(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    round_dir = _make_round(tiny_dir / "lm", tiny_dir / "clip", root / "round")
    return round_dir, export_llava(round_dir, root / "llava", dtype="float32")


def _mmft_side(round_dir, image, question=QUESTION):
    model, _ = load_round(round_dir, device="cpu", dtype=torch.float32, quantize="none")
    enc = encode_chat(model.tokenizer, model.cfg, [("user", question)], num_image_tokens=model.vision.num_tokens)
    pixels = model.vision.preprocess([image])
    ids = torch.tensor([enc.input_ids])
    mask = torch.tensor([enc.image_mask])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), image_mask=mask,
                       pixel_values=pixels).logits
        new = model.generate(ids, torch.ones_like(ids), mask, pixel_values=pixels)
    draft = model.tokenizer.decode(new[0], skip_special_tokens=True)
    return dict(model=model, ids=ids, mask=mask, pixels=pixels, logits=logits, new=new[0].tolist(), draft=draft)


def _llava_side(folder, image, question=QUESTION):
    processor = AutoProcessor.from_pretrained(folder)
    llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = llava(**inputs).logits
        out = llava.generate(**inputs, do_sample=False)
    return dict(processor=processor, llava=llava, inputs=inputs, logits=logits,
                new=out[0, inputs["input_ids"].shape[1]:].tolist())


def _assert_same_model(round_dir, folder, image):
    ours, theirs = _mmft_side(round_dir, image), _llava_side(folder, image)
    image_id = theirs["llava"].config.image_token_id
    ids = theirs["inputs"]["input_ids"]
    # Same prompt: the processor's ids are mmft's encode_chat ids, image token where mmft has slots.
    assert ids.shape == ours["ids"].shape
    assert torch.equal(ids == image_id, ours["mask"])
    assert torch.equal(ids[~ours["mask"]], ours["ids"][~ours["mask"]])
    assert torch.equal(theirs["inputs"]["pixel_values"], ours["pixels"])  # the same CLIP processor
    vocab = ours["logits"].shape[-1]
    diff = (theirs["logits"][..., :vocab] - ours["logits"]).abs().max().item()
    assert diff <= LOGIT_TOL, diff
    print(f"max abs logit diff {diff:.2e}")
    assert theirs["new"] == ours["new"]  # greedy: token for token
    return ours, theirs


def test_kit_round_exports_as_the_same_llava_model(kit_round, tiny_dir):
    round_dir, folder = kit_round
    _assert_same_model(round_dir, folder, _photo())
    config = LlavaForConditionalGeneration.from_pretrained(folder).config
    from mmft.config import load_config

    layer, strategy = feature_choice(load_config(round_dir)[0])  # (-1, "full") for rounds without the keys
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (layer, strategy)
    assert config.image_seq_length == (50 if strategy == "full" else 49) and config.vision_config.patch_size == 8
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.image_token == IMAGE_TOKEN and processor.num_additional_image_tokens == 1


def test_image_token_grows_the_vocab_only_when_needed(kit_round, tiny_dir, tmp_path):
    """A tokenizer filling the LM's vocab gets one new row; one with spare rows (Phi-3: 32,064 rows for
    fewer ids) gets none. Both export the same model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "lm")
    n_ids = len(tokenizer)
    for name, rows in (("tight", n_ids), ("roomy", n_ids + 8)):
        lm = AutoModelForCausalLM.from_pretrained(tiny_dir / "lm", dtype=torch.float32)
        lm.resize_token_embeddings(rows, mean_resizing=False)
        lm.save_pretrained(tmp_path / name / "lm")
        tokenizer.save_pretrained(tmp_path / name / "lm")
        round_dir = _make_round(tmp_path / name / "lm", tiny_dir / "clip", tmp_path / name / "round")
        folder = export_llava(round_dir, tmp_path / name / "llava", dtype="float32")
        config = LlavaForConditionalGeneration.from_pretrained(folder).config
        assert config.image_token_id == n_ids
        assert config.text_config.vocab_size == (n_ids + 1 if name == "tight" else rows), name
        _assert_same_model(round_dir, folder, _photo(1))


def test_pipeline_gives_the_draft_stages_greedy_answer(kit_round):
    round_dir, folder = kit_round
    image = _photo(2)
    ours = _mmft_side(round_dir, image)
    pipe = pipeline("image-text-to-text", model=str(folder), dtype=torch.float32)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    out = pipe(text=messages, return_full_text=False, generate_kwargs={"do_sample": False})
    assert out[0]["generated_text"] == ours["draft"]
    assert tidy(out[0]["generated_text"], QUESTION, capitalize=False) == \
        Pipeline(ours["model"]).draft([image], [QUESTION])[0]


def test_demo_round_exports_and_answers_like_mmft(tmp_path):
    """Whatever demo/round is in the tree: a trained round, so answers are real words."""
    round_dir = ROOT / "demo" / "round"
    folder = export_llava(round_dir, tmp_path / "llava", dtype="float32")
    image = draw("red", "circle", random.Random(0))
    ours, theirs = _assert_same_model(round_dir, folder, image)
    processor = theirs["processor"]
    answer = processor.decode(theirs["new"], skip_special_tokens=True)
    assert answer == ours["draft"] and answer.strip()
    config = (folder / "config.json").read_text()  # the round names its base "../base/lm": no absolute path out
    assert str(ROOT) not in config and str(tmp_path) not in config and "_name_or_path" not in config
    layer, strategy = feature_choice(ours["model"].cfg)
    assert (theirs["llava"].config.vision_feature_layer, theirs["llava"].config.vision_feature_select_strategy) == \
        (layer, strategy)


def test_base_model_on_disk_is_not_changed(kit_round, tiny_dir, tmp_path):
    round_dir, _ = kit_round
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tiny_dir / "lm").iterdir()}
    export_llava(round_dir, tmp_path / "again", dtype="float32")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tiny_dir / "lm").iterdir()} == before


def test_pooled_round_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ExportError, match="pooled.*projected embedding.*--vit_feature_mode patch"):
        export_llava(ROOT / "demo" / "round-pooled", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_existing_folder_and_reruns_after_an_interruption(kit_round, tmp_path, capsys):
    from mmft.export import main

    round_dir, _ = kit_round
    out = tmp_path / "out"
    (tmp_path / "out.partial").mkdir()  # what an interrupted export leaves
    (tmp_path / "out.partial" / "junk").write_text("x")
    argv = [str(round_dir), str(out), "--dtype", "float32"]
    assert main(argv) == 0
    assert not (tmp_path / "out.partial").exists() and not (out / "junk").exists()
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists and is not empty" in err and "Traceback" not in err
    # The real entry point; a pooled round is refused before torch is imported, in one line.
    pooled = subprocess.run([sys.executable, "-m", "mmft.export", str(ROOT / "demo" / "round-pooled"),
                             str(tmp_path / "p")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert pooled.returncode == 1 and "Traceback" not in pooled.stderr
    assert pooled.stderr.strip().splitlines() == [pooled.stderr.strip()]
    assert pooled.stderr.startswith("error: this round uses vit_feature_mode='pooled'")
    # A round whose adapter was cut short (an interrupted copy): one line too, not safetensors' traceback
    cut = tmp_path / "cut-round"
    shutil.copytree(round_dir, cut)
    adapter = cut / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:200])
    capsys.readouterr()
    assert main([str(cut), str(tmp_path / "cut-out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_force_never_replaces_the_round_a_base_model_or_the_other_output(kit_round, tiny_dir, tmp_path, capsys):
    """`mmft.export R R --force` replaced the round with its export (adapter and projector gone); an output
    above the round, or a local base, went the same way."""
    from mmft.export import main

    round_dir, _ = kit_round
    before = sorted(p.relative_to(round_dir) for p in round_dir.rglob("*"))
    for out, extra, message in ((round_dir, [], "is or holds the round being exported"),
                                (round_dir.parent, [], "is or holds the round being exported"),
                                (tiny_dir / "lm", [], "is or holds the base model"),
                                (tmp_path / "x", ["--text-model", str(tmp_path / "x" / "text")], "overlap"),
                                (tmp_path / "y", ["--text-model", str(tmp_path / "y.partial")], "overlap")):
        capsys.readouterr()
        assert main([str(round_dir), str(out), "--force", *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.relative_to(round_dir) for p in round_dir.rglob("*")) == before
    assert (tiny_dir / "lm" / "config.json").is_file() and not (tmp_path / "x").exists()
    # OUT.partial, the folder an export writes first and clears, is checked too
    shutil.copytree(round_dir, tmp_path / "r.partial")
    assert main([str(tmp_path / "r.partial"), str(tmp_path / "r")]) == 1
    assert "r.partial is or holds the round being exported" in capsys.readouterr().err
    assert (tmp_path / "r.partial" / "projector.safetensors").is_file()


def test_a_refused_export_clears_no_partial_folder(kit_round, tmp_path, capsys):
    """Killed between its two final moves, an export has TEXT in place and OUT.partial whole; the re-run refused
    TEXT only after it had emptied OUT.partial. Every refusal now comes first; --force then completes it."""
    from mmft.export import main

    round_dir, _ = kit_round
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text("{}")
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "model.safetensors").write_text("the work of the interrupted export")
    argv = [str(round_dir), str(tmp_path / "out"), "--text-model", str(tmp_path / "text"), "--dtype", "float32"]
    assert main(argv) == 1
    assert "text already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out.partial" / "model.safetensors").read_text() == "the work of the interrupted export"
    assert main(argv + ["--force"]) == 0
    assert (tmp_path / "out" / "processor_config.json").is_file() and (tmp_path / "text" / "model.safetensors").is_file()


def test_odd_output_paths_are_exported_into_or_refused_up_front(kit_round, tmp_path, capsys, monkeypatch):
    from mmft.export import main

    round_dir, _ = kit_round
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main([str(round_dir), ".", "--dtype", "float32"]) == 0  # was: "PosixPath('.') has an empty name"
    assert (tmp_path / "here" / "processor_config.json").is_file() and not (tmp_path / "here.partial").exists()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert main([str(round_dir), str(tmp_path / "link"), "--force", "--dtype", "float32"]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'link'} is a symbolic link: give the folder it points to, "
                                       "or another folder\n")  # was: an rmtree error after the whole export
    assert not (tmp_path / "link.partial").exists()


def test_a_round_that_does_not_load_leaves_no_partial_folder(kit_round, tmp_path, capsys):
    from mmft.export import main

    round_dir, _ = kit_round
    broken = tmp_path / "round"
    shutil.copytree(round_dir, broken)
    (broken / "projector.safetensors").write_bytes(b"\0" * 100)
    assert main([str(broken), str(tmp_path / "out"), "--dtype", "float32"]) == 1
    assert "projector.safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round"]  # no empty out.partial
    missing = tmp_path / "no-base"
    shutil.copytree(round_dir, missing)
    config = json.loads((missing / "config.json").read_text())
    config["mmft"]["lm_model_id"] = str(tmp_path / "gone" / "lm")
    (missing / "config.json").write_text(json.dumps(config))
    assert main([str(missing), str(tmp_path / "out")]) == 1  # the stored dtype is read from the base: named first
    assert capsys.readouterr().err == (f"error: {missing / 'config.json'} names lm_model_id '{tmp_path / 'gone' / 'lm'}'"
                                       " is neither a model folder on disk nor a Hub repo id (OWNER/NAME)\n")


def test_an_export_killed_between_its_two_moves_completes_when_run_again(kit_round, tmp_path, monkeypatch):
    """Killed after TEXT was moved into place and before OUT was, the re-run refused TEXT ("already exists")
    and needed --force; it now completes with the same command. A TEXT that was there before still needs it."""
    import mmft.export as export

    round_dir, _ = kit_round
    out, text = tmp_path / "out", tmp_path / "text"
    argv = [str(round_dir), str(out), "--text-model", str(text), "--dtype", "float32"]
    real, moves = export._publish_folder, []

    def killed_before_the_second(tmp, dest):
        moves.append(dest)
        if len(moves) == 2:
            raise KeyboardInterrupt  # as SIGINT or a kill would stop it: no cleanup runs
        return real(tmp, dest)

    monkeypatch.setattr(export, "_publish_folder", killed_before_the_second)
    with pytest.raises(KeyboardInterrupt):
        export.main(argv)
    assert (text / "model.safetensors").is_file() and not out.exists() and (tmp_path / "out.partial").is_dir()
    monkeypatch.setattr(export, "_publish_folder", real)
    assert export.main(argv) == 0  # no --force: this export was allowed to write TEXT
    assert (out / "processor_config.json").is_file() and (text / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "text"]  # no partial folder, no record left
    assert export.main(argv) == 1  # finished: an existing OUT is refused again, as TEXT is
    # killed again between the moves, then a folder of the user's at OUT: the record names TEXT only
    monkeypatch.setattr(export, "_publish_folder", killed_before_the_second)
    moves.clear()
    with pytest.raises(KeyboardInterrupt):
        export.main(argv + ["--force"])
    monkeypatch.setattr(export, "_publish_folder", real)
    shutil.rmtree(out)
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    assert export.main(argv) == 1 and (out / "precious.txt").read_text() == "mine"
    # the record's own name is no output folder
    assert export.main([str(round_dir), str(tmp_path / "o"), "--text-model", str(tmp_path / "o.partial.json")]) == 1


# -- publishing (local Hub server, real huggingface_hub client) ---------------------------------
def _push(hub, *args):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret_test_token", "HF_HUB_OFFLINE": "0"}
    return subprocess.run([sys.executable, str(ROOT / "push_to_hub.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_push_with_export_publishes_a_loadable_llava_repo(hub_online, kit_round, tiny_dir, tmp_path):
    from huggingface_hub import ModelCard, snapshot_download

    round_dir, folder = kit_round
    done = _push(hub_online, round_dir, "--repo-id", "user/shapes", "--export", "llava")
    assert done.returncode == 0, done.stderr
    assert "hf_secret_test_token" not in done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-3] == "revision: round-3"  # the round's own lines stay last
    assert set(hub_online.refs("user/shapes")["tags"]) == {"round-3"}
    refs = hub_online.refs("user/shapes-llava")
    assert set(refs["tags"]) == {"round-3"} and refs["tags"]["round-3"] == refs["branches"]["main"]
    assert "config.json" in hub_online.files("user/shapes") and "adapter/adapter_config.json" not in \
        hub_online.files("user/shapes-llava")

    pulled = Path(snapshot_download("user/shapes-llava", revision="round-3"))
    local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.name != "README.md"}
    remote = {p.relative_to(pulled).as_posix(): p.read_bytes() for p in pulled.rglob("*")
              if p.is_file() and p.name not in ("README.md", ".gitattributes")}
    assert remote == local  # byte for byte the local export
    _assert_same_model(round_dir, pulled, _photo(3))
    card = ModelCard.load("user/shapes-llava")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert 'LlavaForConditionalGeneration.from_pretrained("user/shapes-llava", revision="round-3")' in card.text
    kept = load_config(round_dir)[0].vit_feature_select_strategy == "full"
    assert "is not** mmft's staged pipeline" in card.text
    assert str(tiny_dir) not in card.text and "/tmp/" not in card.text  # the base's name, not this machine's path
    assert "within mmft's budget of\n  256 tokens" in card.text  # where the export and mmft can differ
    assert ("CLS token kept" if kept else "CLS token dropped") in card.text
    assert "ImageOps.exif_transpose(Image.open(" in card.text  # a phone photo upright, as mmft reads it
    assert "repetition penalty" not in card.text  # the round has none
    code = [line.strip() for line in card.text.splitlines()]
    assert not [line for line in code if line.startswith(("import mmft", "from mmft"))]  # no mmft needed


def test_an_export_that_fails_after_the_round_is_up_says_where_the_round_is(hub_online, kit_round):
    """The round published, its export refused (the export repo's tag holds another model): the round's
    revision, commit and url are still printed, last on stdout, and the error says which half failed."""
    from mmft.hub import plan_upload, publish

    round_dir, _ = kit_round
    number = load_config(round_dir)[1]["round"]
    publish(plan_upload(ROOT / "demo" / "round", "user/taken-llava", number=number))  # another model at the tag
    done = _push(hub_online, round_dir, "--repo-id", "user/taken", "--export", "llava")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stdout.strip().splitlines()[-3] == f"revision: round-{number}"
    assert f"round-{number}" in hub_online.refs("user/taken")["tags"]
    assert "error: the round is published, its export is not:" in done.stderr and "run the same command" in done.stderr


def test_the_export_of_a_private_round_is_private(hub_online, kit_round):
    """A round pushed with --private, then again with --export but without --private (the flag only acts on
    a repo not yet there): the export, the round's weights merged, must not come out public."""
    from huggingface_hub import HfApi

    from mmft.export_hub import publish_export
    from mmft.hub import plan_upload, publish

    round_dir, _ = kit_round
    number = load_config(round_dir)[1]["round"]
    publish(plan_upload(round_dir, "user/secret", number=number), private=True)
    publish_export(round_dir, "user/secret", number)
    assert HfApi().model_info("user/secret-llava").private is True
    publish(plan_upload(round_dir, "user/open", number=number))
    publish_export(round_dir, "user/open", number)
    assert HfApi().model_info("user/open-llava").private is False
    # an export repo made public before (by hand, or by an older mmft) is refused, nothing sent
    HfApi().create_repo("user/hidden-llava")
    publish(plan_upload(round_dir, "user/hidden", number=number), private=True)
    hub_online.requests.clear()
    with pytest.raises(ValueError, match="user/hidden-llava is public and user/hidden is private"):
        publish_export(round_dir, "user/hidden", number)
    assert not [r for r in hub_online.requests if r[0] == "POST"] and not hub_online.refs("user/hidden-llava")["tags"]
    # the CLI refuses before the round goes up: nothing is sent, and the reason is the one that holds
    HfApi().create_repo("user/cli-llava")
    hub_online.requests.clear()
    done = _push(hub_online, round_dir, "--repo-id", "user/cli", "--private", "--export", "llava")
    assert done.returncode == 1 and not [r for r in hub_online.requests if r[0] == "POST"], done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: user/cli-llava is public and --private was given: the export would publish the round's weights")


def test_export_card_names_the_round_number_it_is_published_under(kit_round, tmp_path):
    """`--round 5` tags round-5 on both repos; the export's card said the folder's own number."""
    from mmft.export_hub import plan_export_upload

    round_dir, _ = kit_round
    upload = plan_export_upload(round_dir, "user/shapes", 5, tmp_path)
    assert upload.round == 5 and "Exported from mmft round 5." in str(upload.card)
    assert load_config(round_dir)[1]["round"] != 5


def test_export_card_states_the_license_the_round_card_states():
    from huggingface_hub import ModelCard

    from mmft.card import render_card
    from mmft.config import MMFTConfig
    from mmft.export_hub import render_export_card

    cfg = MMFTConfig()  # Phi-3.5-mini-instruct: MIT
    export = ModelCard(str(render_export_card(cfg, {"round": 2}, "me/x-llava", 49, revision="round-2")))
    assert export.data.license == ModelCard(str(render_card(cfg, {"round": 2}, "me/x", 2, False))).data.license == "mit"


def test_push_with_export_refuses_a_pooled_round_before_sending(hub_online):
    done = _push(hub_online, ROOT / "demo" / "round-pooled", "--repo-id", "user/pooled", "--export", "llava")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: this round uses vit_feature_mode='pooled'")
    assert not [r for r in hub_online.requests if r[0] == "POST"]  # nothing created, nothing committed


def test_gpu_check_finetune_and_export_path_runs_tiny_on_cpu(capsys):
    """bench.gpu_check's prepared GPU script, in its tiny CPU mode: QLoRA through train.finetune, then
    the export it serves with vLLM (vLLM itself is only tried where it imports)."""
    import json

    from bench import gpu_check

    gpu_check.main(["--tiny", "--checks", "finetune,vllm", "--finetune-steps", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["finetune"]["ok"] is True and result["finetune"]["steps"] == 1
    assert result["finetune"]["quantize"] == "nf4" and result["finetune"]["activation_checkpointing"] is True
    assert "transformers" in result["vllm"] and "transformers_error" not in result["vllm"]
    assert "vllm" in result["vllm"] or "vllm_error" in result["vllm"]


def test_generation_settings_travel_with_the_export(kit_round, tmp_path):
    """The round's repetition penalty (and sampling settings) are the export's: without them its greedy
    answer differs from mmft's for a round that sets one."""
    from mmft.config import save_config

    round_dir = tmp_path / "round"
    shutil.copytree(kit_round[0], round_dir)
    cfg, info = load_config(round_dir)
    cfg.gen_repetition_penalty, cfg.gen_max_new_tokens = 3.0, 24
    save_config(round_dir, cfg, info)
    folder = export_llava(round_dir, tmp_path / "llava", dtype="float32")
    generation = LlavaForConditionalGeneration.from_pretrained(folder).generation_config
    assert generation.repetition_penalty == 3.0 and not generation.do_sample
    assert _llava_side(folder, _photo())["new"] == _mmft_side(round_dir, _photo())["new"]
    from mmft.export_hub import render_export_card

    card = render_export_card(cfg, info, "user/x-llava", 50).text  # says where the two can still differ
    assert "repetition penalty (3.0)" in card and "to the answer's only" in card
    cfg.gen_do_sample, cfg.gen_temperature, cfg.gen_top_p, cfg.gen_repetition_penalty = True, 0.3, 0.8, 1.0
    save_config(round_dir, cfg, info)
    generation = LlavaForConditionalGeneration.from_pretrained(
        export_llava(round_dir, tmp_path / "llava-sampled", dtype="float32")).generation_config
    assert (generation.do_sample, generation.temperature, generation.top_p) == (True, 0.3, 0.8)


@pytest.mark.parametrize("content", [f"<image>\n{QUESTION}", f"{QUESTION}\n<image>", f"  <image>{QUESTION}  "])
def test_llava_style_string_content_gets_the_trained_prompt(kit_round, tmp_path, content):
    """LLaVA-Instruct writes "<image>\nQ" (or "Q\n<image>") as one string; mmft.data reads it as the image,
    then the stripped question, and so must the exported chat template."""
    round_dir, folder = kit_round
    model, _ = load_round(round_dir, device="cpu", dtype=torch.float32, quantize="none")
    enc = encode_chat(model.tokenizer, model.cfg, [("user", QUESTION)], num_image_tokens=model.vision.num_tokens)
    processor = AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ids = processor(images=_photo(), text=prompt, return_tensors="pt")["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids.tolist() == [image_id if m else t for t, m in zip(enc.input_ids, enc.image_mask)], repr(prompt)


@pytest.mark.parametrize("question", ["What is <image> in html?", "<image><image>", "Compare <image> and <img>."])
def test_image_placeholder_text_in_a_question_is_dropped_alike(kit_round, question):
    """`<image>` typed in a question is no text anywhere: mmft.data drops it from training records, and the
    export's processor would read it as a second image ("2 <image> tokens and 1 images"); mmft drops it too."""
    round_dir, folder = kit_round
    model, _ = load_round(round_dir, device="cpu", dtype=torch.float32, quantize="none")
    enc = encode_chat(model.tokenizer, model.cfg, [("user", question)], num_image_tokens=model.vision.num_tokens)
    plain = encode_chat(model.tokenizer, model.cfg, [("user", question.replace("<image>", ""))],
                        num_image_tokens=model.vision.num_tokens)
    assert enc.input_ids == plain.input_ids
    processor = AutoProcessor.from_pretrained(folder)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    content = [{"type": "image"}, {"type": "text", "text": question}]  # a LLaVA-style string marks images so
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    ids = processor(images=_photo(), text=prompt, return_tensors="pt")["input_ids"][0]
    assert ids.tolist() == [image_id if m else t for t, m in zip(enc.input_ids, enc.image_mask)], repr(prompt)


def test_a_system_prompt_beyond_the_bmp_renders_unchanged():
    """json.dumps escapes an emoji as a surrogate pair, which Jinja decodes to two lone surrogates that
    the tokenizer refuses: every call of the exported processor failed."""
    from mmft.export import chat_template
    from mmft.testing import make_tokenizer

    tokenizer = make_tokenizer()
    system = "Answer briefly 🙂 \"quoted\" {{ braces }} and 'single'"
    template = chat_template(tokenizer.chat_template, system)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert system in text
    assert tokenizer(text, add_special_tokens=False)["input_ids"]  # encodes
