"""The shapes world: data in the LLaVA format, scoring, and the committed demo round's accuracy."""

import json
import random
from pathlib import Path

import pytest
import torch

from mmft import shapes
from mmft.data import read_llava

DEMO_ROUND = Path(__file__).resolve().parents[1] / "demo" / "round"


def test_dataset_is_llava_instruct_format(tmp_path):
    path = shapes.write_dataset(tmp_path, 12, seed=1)
    raw = json.loads(path.read_text())
    assert raw[0]["conversations"][0]["value"].startswith("<image>\n")
    records, report = read_llava(path, tmp_path / "images")
    assert report.kept == 12 and not report.skipped
    colours = set(shapes.COLORS)
    for record in records:
        assert record.turns[1][1].split()[-1].rstrip(".") in colours | set(shapes.SHAPES) | {"background"}


def test_images_are_one_shape_on_a_light_background():
    image = shapes.draw("blue", "square", random.Random(0))
    pixels = list(image.getdata())
    assert min(sum(p) for p in pixels if p != pixels[0]) < 400  # the shape is there
    assert sum(pixels[0]) > 600 or sum(pixels[-1]) > 600  # a corner is light


@pytest.mark.parametrize("text, truth, ok", [
    ("The shape is red.", "red", True),
    ("It is a red or blue shape.", "red", False),
    ("It is a purple triangle.", "red", False),
    ("Red", "red", True),
])
def test_score(text, truth, ok):
    assert shapes.score(text, truth, shapes.COLORS) is ok


def test_refine_corpus_teaches_drafts_to_sentences():
    from mmft.config import MMFTConfig

    corpus = shapes.text_corpus(MMFTConfig(), 50, seed=0)
    assert all(turns[0][0] == "user" and turns[1][0] == "assistant" for turns in corpus)
    assert any("Draft answer:" in turns[0][1] for turns in corpus)


@pytest.mark.skipif(not DEMO_ROUND.exists(), reason="demo/round not built (python -m train.build_demo)")
def test_committed_demo_round_reaches_the_targets_on_fresh_images():
    from mmft.loading import load_round
    from mmft.pipeline import Pipeline

    model, info = load_round(DEMO_ROUND, device="cpu", dtype=torch.float32)
    assert model.cfg.vit_feature_mode == "patch" and info["round"] == 1
    metrics = shapes.evaluate(Pipeline(model), n=60, seed=424242)  # images the build never drew
    assert metrics["color_accuracy"] >= 0.95, metrics
    assert metrics["shape_accuracy"] >= 0.95, metrics


def test_demo_artefacts_stay_small():
    root = DEMO_ROUND.parent
    if not root.exists():
        pytest.skip("demo/ not built")
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 10 * 1024 * 1024, f"demo/ is {total / 1e6:.1f} MB"
