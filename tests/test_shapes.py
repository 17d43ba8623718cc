"""The shapes world: phrasings and their held-out split, images, scoring, and the committed demo round."""

import json
import random
import re
from pathlib import Path

import pytest
import torch

from mmft import questions, shapes
from mmft.config import MMFTConfig
from mmft.data import read_llava

DEMO = Path(__file__).resolve().parents[1] / "demo"
DEMO_ROUND = DEMO / "round"
needs_demo = pytest.mark.skipif(not DEMO_ROUND.exists(), reason="demo/round not built (python -m train.build_demo)")


def _norm(question: str) -> str:
    """A canonical question with its values blanked, so phrasings compare whatever the values."""
    q = re.sub(r"\b(an? )?(circle|square|triangle)\b", "<S>", question.lower())
    return re.sub(r"\b(red|green|blue|yellow|purple|orange)\b", "<C>", q)


def test_heldout_families_are_disjoint_from_training():
    for kind in questions.KINDS:
        assert not set(questions.FRAMES[kind]["train"]) & set(questions.FRAMES[kind]["heldout"])
    assert not set(questions.COLOR_WORDS["train"]) & set(questions.COLOR_WORDS["heldout"])
    assert not set(questions.OBJECT_WORDS["train"]) & set(questions.OBJECT_WORDS["heldout"])
    assert not set(questions.PREFIXES["train"]) & set(questions.PREFIXES["heldout"])


@pytest.mark.parametrize("kind", questions.KINDS)
def test_no_heldout_question_is_a_training_question(kind):
    training = {_norm(q) for q in questions.training_phrasings(kind)}
    heldout_words = set(questions.COLOR_WORDS["heldout"]) | set(questions.OBJECT_WORDS["heldout"])
    rng = random.Random(7)
    drawn = {split: [questions.ask(kind, *shapes.sample(rng), rng, split)[1]["canonical"] for _ in range(1500)]
             for split in questions.SPLITS}
    # the enumeration covers what training draws (else the next assertion could not fail)...
    assert all(_norm(q) in training for q in drawn["train"])
    assert not any(heldout_words & set(re.findall(r"[a-z]+", q)) for q in drawn["train"])
    # ...and no held-out question is among them
    assert not [q for q in drawn["heldout"] if _norm(q) in training]
    assert len({_norm(q) for q in drawn["heldout"]}) > 30  # many phrasings, not a handful


def test_questions_read_as_intended():
    rng = random.Random(3)
    for _ in range(200):
        question, facts = questions.ask("yesno", "orange", "square", rng, "heldout")
        asked = (set(questions.COLORS) | set(questions.SHAPES)) & set(re.findall(r"[a-z]+", question.lower()))
        assert len(asked) == 1 and (facts["polarity"] == "yes") == (asked == {facts["truth"]}), question
        question, facts = questions.ask("choice", "orange", "square", rng)
        assert facts["truth"] in facts["options"] and all(o in question.lower() for o in facts["options"])


@pytest.mark.parametrize("facts, full, draft", [
    ({"kind": "yesno", "attr": "color", "truth": "blue", "polarity": "no"}, "It is blue, so no.", "blue no"),
    ({"kind": "yesno", "attr": "shape", "truth": "circle", "polarity": "yes"}, "It is a circle, so yes.", "circle yes"),
    ({"kind": "describe", "attr": "describe", "truth": None, "color": "orange", "shape": "square"},
     "It is an orange square.", "orange square"),
    ({"kind": "choice", "attr": "shape", "truth": "triangle"}, "It is a triangle.", "triangle"),
])
def test_answers_and_their_cleaned_drafts(facts, full, draft):
    from mmft.text import clean_answer

    assert questions.answer(facts) == full and clean_answer(full) == draft


@pytest.mark.parametrize("content, sentence", [
    (("no", "blue", None), "No, it is blue."),
    (("yes", None, "circle"), "Yes, it is a circle."),
    ((None, "orange", "square"), "It is an orange square."),
    ((None, None, "triangle"), "It is a triangle."),
    (("not", "red", None), "It is not red."),
])
def test_render(content, sentence):
    assert questions.render(*content) == sentence


def test_dataset_is_llava_instruct_format_with_cleaned_answers_that_keep_no(tmp_path):
    from mmft.prompt import encode_chat
    from mmft.testing import make_tokenizer
    from mmft.text import clean_answer

    path = shapes.write_dataset(tmp_path, 40, seed=1)
    raw = json.loads(path.read_text())
    assert raw[0]["conversations"][0]["value"].startswith("<image>\n")
    records, report = read_llava(path, tmp_path / "images")
    assert report.kept == 40 and not report.skipped
    no_answers = [r for r in records if r.turns[1][1].endswith(", so no.")]
    assert no_answers, "the yes/no kind should appear in 40 conversations"
    # clean -> train: the label tokens of "It is blue, so no." are the draft "blue no" and the end of turn
    tokenizer, cfg = make_tokenizer(), MMFTConfig()
    encoded = encode_chat(tokenizer, cfg, no_answers[0].turns[:2], num_image_tokens=4)
    labelled = tokenizer.decode([t for t, l in zip(encoded.input_ids, encoded.labels) if l != -100])
    draft = clean_answer(no_answers[0].turns[1][1])
    assert draft.endswith(" no") and labelled.strip() == f"{draft}<|end|>", (draft, labelled)


def test_images_vary_as_each_style_says():
    rng = random.Random(0)
    image = shapes.draw("blue", "square", rng, size=64)
    pixels = list(image.getdata())
    assert image.size == (64, 64) and min(sum(p) for p in pixels) < 400 and sum(pixels[0]) > 600
    sizes = [shapes.draw("red", "circle", rng, size=None, style=shapes.HELDOUT_STYLE).size for _ in range(200)]
    assert min(min(s) for s in sizes) < 64 and max(min(s) for s in sizes) > 512
    assert any(max(s) / min(s) > 1.5 for s in sizes)
    train = [shapes.draw("red", "circle", rng, size=None).size for _ in range(200)]
    assert 48 <= min(min(s) for s in train) and max(max(s) for s in train) <= 240


@pytest.mark.parametrize("text, facts, ok", [
    ("It is red.", {"kind": "color", "attr": "color", "truth": "red"}, True),
    ("It is a red or blue shape.", {"kind": "color", "attr": "color", "truth": "red"}, False),
    ("No, it is blue.", {"kind": "yesno", "attr": "color", "truth": "blue", "polarity": "no"}, True),
    ("blue no", {"kind": "yesno", "attr": "color", "truth": "blue", "polarity": "no"}, True),
    ("No, it is red.", {"kind": "yesno", "attr": "color", "truth": "blue", "polarity": "no"}, False),
    ("Yes, it is blue.", {"kind": "yesno", "attr": "color", "truth": "blue", "polarity": "no"}, False),
    ("It is a square.", {"kind": "choice", "attr": "shape", "truth": "square"}, True),
    ("It is a circle or a square.", {"kind": "choice", "attr": "shape", "truth": "square"}, False),
    ("It is a red circle.", {"kind": "describe", "attr": "describe", "truth": None, "color": "red",
                             "shape": "circle"}, True),
])
def test_judge(text, facts, ok):
    assert shapes.judge(text, facts) is ok


def test_refine_corpus_targets_keep_the_drafts_content():
    from mmft.demo import refine_corpus

    corpus = refine_corpus(MMFTConfig(), 400, seed=0)
    drafts = [(turns[0][1].split("Draft answer: ")[1].split("\n")[0], turns[1][1]) for turns in corpus
              if "Draft answer:" in turns[0][1]]
    assert len(drafts) > 250  # the rest: reading comprehension and plain Q&A
    values = set(questions.COLORS) | set(questions.SHAPES) | {"yes", "no", "not"}
    for draft, target in drafts:
        assert shapes.words_of(draft) & values == shapes.words_of(target) & values, (draft, target)
    assert any(d.lower().startswith("no ") for d, _ in drafts)  # a stopword-less "no red"


@pytest.fixture(scope="module")
def demo_pipeline():
    from mmft.loading import load_round
    from mmft.pipeline import Pipeline

    model, info = load_round(DEMO_ROUND, device="cpu", dtype=torch.float32)
    assert model.cfg.vit_feature_mode == "patch" and info["round"] == 1
    return Pipeline(model)


# Regression guards, not the targets: the committed patch round measured (300 held-out images) colour
# 0.61, shape 0.83, describe 0.72, yes/no 0.44, choice 0.98, refine damage 0.0; in-distribution
# colour 0.99, shape 0.96 (docs/training.md). With 40 answers per kind one standard deviation is
# <= 0.08, so each floor sits ~2.5 deviations under the measured figure.
HELDOUT_FLOORS = {"color": 0.5, "shape": 0.5, "describe": 0.45, "yesno": 0.2, "choice": 0.8}


@needs_demo
def test_committed_demo_round_on_fresh_images(demo_pipeline):
    heldout = shapes.evaluate(demo_pipeline, n=40, seed=424242, split="heldout")  # images the build never drew
    for kind, floor in HELDOUT_FLOORS.items():
        assert heldout["kinds"][kind]["accuracy"] >= floor, (kind, heldout)
    assert heldout["refine_damage"] <= 0.1, heldout
    indist = shapes.evaluate(demo_pipeline, n=40, seed=424243, split="train", kinds=("color", "shape"))
    assert indist["kinds"]["color"]["accuracy"] >= 0.9 and indist["kinds"]["shape"]["accuracy"] >= 0.85, indist


@needs_demo
def test_a_no_survives_draft_and_refine(demo_pipeline):
    """Survival, not accuracy (yes/no accuracy is guarded above and is poor: docs/training.md): the trained
    round does answer "no", and every draft that says "no" keeps it, and its colour, through the refine."""
    rng = random.Random(5)
    truths = [("blue", "square"), ("green", "circle"), ("orange", "triangle"), ("purple", "square")]
    images = [shapes.draw(color, shape, rng, size=96) for color, shape in truths]
    answers = demo_pipeline.answer_images(images, ["Is the shape red?"] * len(images))
    said_no = [(a, color) for a, (color, _) in zip(answers, truths) if "no" in shapes.words_of(a.draft)]
    assert said_no, answers
    for answer, _ in said_no:
        colour = shapes.words_of(answer.draft) & set(shapes.COLORS)
        assert answer.final.startswith("No") and colour <= shapes.words_of(answer.final), answer
    # the refine stage alone, from a stopword-less draft in the other order
    assert demo_pipeline.refine(["Is this a triangle?"], ["no square"]) == ["No, it is a square."]


def test_demo_artefacts_stay_small():
    if not DEMO.exists():
        pytest.skip("demo/ not built")
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024, f"demo/ is {total / 1e6:.1f} MB"
