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
from mmft.quantize import activation_bits

DEMO = Path(__file__).resolve().parents[1] / "demo"
DEMO_ROUND = DEMO / "round"
needs_demo = pytest.mark.skipif(not DEMO_ROUND.exists(), reason="demo/round not built (python -m train.build_demo)")


def _norm(question: str) -> str:
    """A canonical question with its values blanked and its punctuation dropped, so phrasings compare
    whatever the values ("whats the <C> here" is "what's the <C> here?")."""
    q = " ".join(re.sub(r"[^a-z0-9 ]", " ", question.lower().replace("'", "")).split())
    q = re.sub(r"\b(an? )?(circle|square|triangle)\b", "<S>", q)
    return re.sub(r"\b(red|green|blue|yellow|purple|orange)\b", "<C>", q)


def _all_kinds(split: str) -> set[str]:
    return {_norm(q) for kind in questions.KINDS for q in questions.training_phrasings(kind, split)}


def _yn(truth: str, asked: str, attr: str = "color") -> dict:
    """The facts of a yes/no question: "Is it {asked}?" about a {truth} shape."""
    return {"kind": "yesno", "attr": attr, "truth": truth, "asked": asked, "polarity": "yes" if truth == asked else "no"}


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
    # ...and no held-out question is among them; a held-out frame is not in the base LM's text either
    assert not [q for q in drawn["heldout"] if _norm(q) in training]
    text = {_norm(q) for q in questions.training_phrasings(kind, "text")}
    # a held-out frame is no kind's training or text wording either (punctuation aside)
    frames = [f["canonical"] for f in (questions.ask(kind, *shapes.sample(rng), rng, "heldout")[1] for _ in range(1500))
              if f["heldout"] == "frame"]
    every_kind = _all_kinds("train") | _all_kinds("text")
    assert frames and not [q for q in frames if _norm(q) in every_kind]
    rng = random.Random(8)
    asked = [questions.ask(kind, *shapes.sample(rng), rng, "heldout")[1] for _ in range(1500)]
    assert all(_norm(f["canonical"]) in text for f in asked if f["heldout"] == "synonym")
    assert not [f["canonical"] for f in asked if f["heldout"] == "frame" and _norm(f["canonical"]) in text]
    assert all(_norm(f["canonical"]) in text for f in
               [questions.ask(kind, *shapes.sample(rng), rng, "text")[1] for _ in range(500)])
    assert len({_norm(q) for q in drawn["heldout"]}) > 30  # many phrasings, not a handful


@pytest.mark.parametrize("kind", questions.KINDS)
def test_each_question_names_its_frame(kind):
    """`facts["frame"]` (the evaluation's per-frame figures) is the frame the question was built on:
    one of its family's, a held-out one exactly when the wording is held-out ("frame")."""
    for split in questions.SPLITS:
        rng = random.Random(11)
        for _ in range(300):
            _, facts = questions.ask(kind, *shapes.sample(rng), rng, split)
            attr, frame = facts["attr"], facts["frame"]
            if split == "independent":  # the writer's question as typed, its values filled in
                assert frame in questions.independent(kind, attr) and facts["heldout"] == "independent"
                values = [questions._value(attr, v) for v in facts.get("options") or [facts.get("asked", "")] * 2]
                assert facts["canonical"] == frame.replace("{v}", values[0]).replace("{w}", values[1]), facts
                assert "{" not in facts["canonical"] and (kind in ("yesno", "choice")) == (facts["canonical"] != frame)
                continue
            if split == "heldout" and facts["heldout"] == "frame" and frame in questions.frames(kind, attr, "heldout"):
                continue
            assert frame in questions._family(kind, attr, split)[0], (split, facts)  # held-out: a training frame
            fills = {questions._fill(frame, attr, *(facts.get("options") or (facts.get("asked", facts["truth"]),) * 2), c, o)
                     for c in questions.COLOR_WORDS["train"] + questions.COLOR_WORDS["heldout"]
                     for o in questions.OBJECT_WORDS["train"] + questions.OBJECT_WORDS["heldout"]}
            assert any(facts["canonical"].endswith(f) for f in fills), facts


def test_independent_questions_are_well_formed_and_asked_as_written():
    """The independent writer's evaluation questions: every kind has many, each asks what its kind says
    (yes/no: one value; choice: two; the others: none), and `ask` returns them exactly as written."""
    items = json.loads(questions.INDEPENDENT.read_text(encoding="utf-8"))["questions"]
    assert {q["kind"] for q in items} == set(questions.KINDS)
    for q in items:
        slots = set(re.findall(r"{(\w*)}", q["text"]))
        assert slots == {"yesno": {"v"}, "choice": {"v", "w"}}.get(q["kind"], set()), q
        assert q["attr"] in (("color", "shape") if q["kind"] in ("yesno", "choice") else (q["kind"], "both")), q
    for kind in questions.KINDS:
        assert len(questions.independent(kind, "color")) >= 15 and len(questions.independent(kind, "shape")) >= 15
    rng = random.Random(4)
    for _ in range(200):
        question, facts = questions.ask("choice", "purple", "circle", rng, "independent")
        v, w = (questions._value(facts["attr"], o) for o in facts["options"])
        assert question in {f.replace("{v}", v).replace("{w}", w)
                            for f in questions.independent("choice", facts["attr"])}, question
        question, facts = questions.ask("yesno", "purple", "circle", rng, "independent")
        assert "{" not in question and questions._value(facts["attr"], facts["asked"]) in question, question


def test_independent_questions_keep_every_character_as_typed(monkeypatch):
    """Braces a visitor types are not format fields: asked verbatim, only {v} and {w} filled."""
    typed = ("what colour is it :}", "is it {v}? {yes/no}", "is it {{v}}?")
    monkeypatch.setattr(questions, "independent", lambda kind, attr: typed)
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        question, facts = questions.ask("yesno", "red", "circle", rng, "independent")
        value = questions._value(facts["attr"], facts["asked"])
        assert question == facts["frame"].replace("{v}", value), (question, facts)
        seen.add(question.replace(value, "<v>"))
    assert seen == {"what colour is it :}", "is it <v>? {yes/no}", "is it {<v>}?"}


def test_questions_read_as_intended():
    rng = random.Random(3)
    for _ in range(200):
        question, facts = questions.ask("yesno", "orange", "square", rng, "heldout")
        asked = (set(questions.COLORS) | set(questions.SHAPES)) & set(re.findall(r"[a-z]+", question.lower()))
        assert len(asked) == 1 and (facts["polarity"] == "yes") == (asked == {facts["truth"]}), question
        question, facts = questions.ask("choice", "orange", "square", rng)
        assert facts["truth"] in facts["options"] and all(o in question.lower() for o in facts["options"])


@pytest.mark.parametrize("facts, full, draft", [
    (_yn("blue", "red"), "Red? No, it is blue.",
     "Red No blue"),
    (_yn("circle", "circle", "shape"),
     "A circle? Yes, it is a circle.", "circle Yes circle"),
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
    no_answers = [r for r in records if "? No, it is " in r.turns[1][1]]
    assert no_answers, "the yes/no kind should appear in 40 conversations"
    # clean -> train: the label tokens of "Red? No, it is blue." are the draft "Red No blue" and the end of turn
    tokenizer, cfg = make_tokenizer(), MMFTConfig()
    encoded = encode_chat(tokenizer, cfg, no_answers[0].turns[:2], num_image_tokens=4)
    labelled = tokenizer.decode([t for t, l in zip(encoded.input_ids, encoded.labels) if l != -100])
    draft = clean_answer(no_answers[0].turns[1][1])
    assert " No " in draft and labelled.strip() == f"{draft}<|end|>", (draft, labelled)


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
    ("Red No blue", _yn("blue", "red"), True),
    ("No, it is blue, not red.", _yn("blue", "red"), True),
    ("No, it is red.", _yn("blue", "red"), False),
    ("Green No blue", _yn("blue", "red"), False),
    ("No, yes, it is blue.", {"kind": "yesno", "attr": "color", "truth": "blue", "polarity": "no"}, False),
    ("No, it is red.", {"kind": "yesno", "attr": "color", "truth": "blue", "polarity": "no"}, False),
    ("Yes, it is blue.", {"kind": "yesno", "attr": "color", "truth": "blue", "polarity": "no"}, False),
    # a value named only to deny it is not named: right, unless the truth is what is denied
    ("No, it is not red.", _yn("blue", "red"), True),
    ("No, it isn't red, it is blue.", _yn("blue", "red"), True),
    ("Yes, it is red, not blue.", _yn("red", "red"), True),
    ("No, it is not blue.", _yn("blue", "red"), False),
    ("No, it isn't a triangle.", _yn("triangle", "square", "shape"), False),
    # after its yes/no word an answer affirms the truth only: the asked value is allowed as the echo before it
    ("No, it is blue or red.", _yn("blue", "red"), False),
    ("No blue Red", _yn("blue", "red"), False),
    ("No, it is blue. It is red.", _yn("blue", "red"), False),
    # a denial reaches across "or" and past an article or a value of the other kind
    ("No, it isn't red or blue.", _yn("blue", "red"), False),
    ("No, it is not the red one, it is blue.", _yn("blue", "red"), True),
    ("No, it isn't a red square, it's a circle.", _yn("circle", "square", "shape"), True),
    # a later "no" before a value denies it; a denial of the asked value is a no; "nope" is one
    ("No, there is no red here.", _yn("blue", "red"), True),
    ("It is not a square.", _yn("triangle", "square", "shape"), True),
    ("It is a triangle.", _yn("triangle", "square", "shape"), False),
    ("It is not red.", _yn("red", "red"), False),
    ("Nope, it is blue.", _yn("blue", "red"), True),
    ("Yes and no.", _yn("red", "red"), False),
    # a denial holds to the end of its clause, stops at a value of the same kind (the cleaned "not red blue")
    ("It is not really blue.", {"kind": "color", "attr": "color", "truth": "blue"}, False),
    ("not red blue", {"kind": "color", "attr": "color", "truth": "blue"}, True),
    ("Red? No, blue.", {"kind": "color", "attr": "color", "truth": "red"}, False),
    ("No, not red, green.", _yn("blue", "red"), False),
    ("No, it can't be blue.", _yn("blue", "red"), False),
    ("No, it isnt blue", _yn("blue", "red"), False),
    # a "no" inside a clause denies; one that opens the answer, follows the echo or ends a clause answers
    ("There is no blue.", _yn("blue", "red"), False),
    ("Yes, it is red, no doubt.", _yn("red", "red"), True),
    ("No not red blue", _yn("blue", "red"), True),
    # n't typed without its apostrophe or with another one; a dash ends a clause; a value asked back, then no
    ("It couldnt be blue.", {"kind": "color", "attr": "color", "truth": "blue"}, False),
    ("It isn\u2018t blue.", {"kind": "color", "attr": "color", "truth": "blue"}, False),
    ("It isn`t blue.", {"kind": "color", "attr": "color", "truth": "blue"}, False),
    ("It's not a circle - it's blue", {"kind": "color", "attr": "color", "truth": "blue"}, True),
    ("Circle\u2014no\u2014a square.", {"kind": "shape", "attr": "shape", "truth": "circle"}, False),
    ("Blue? No.", {"kind": "color", "attr": "color", "truth": "blue"}, False),
    ("Red? No.", _yn("blue", "red"), True),
    # the other kinds: a denied truth is wrong, a denied other value is not named
    ("It is not red.", {"kind": "color", "attr": "color", "truth": "red"}, False),
    ("no red", {"kind": "color", "attr": "color", "truth": "red"}, False),
    ("It is red, not blue.", {"kind": "color", "attr": "color", "truth": "red"}, True),
    ("It's not red, it's blue.", {"kind": "color", "attr": "color", "truth": "blue"}, True),
    ("It is a circle, not a square.", {"kind": "choice", "attr": "shape", "truth": "circle"}, True),
    ("It is not a circle.", {"kind": "choice", "attr": "shape", "truth": "circle"}, False),
    ("It is not a red circle.", {"kind": "describe", "attr": "describe", "truth": None, "color": "red",
                                 "shape": "circle"}, False),
    ("It is a square.", {"kind": "choice", "attr": "shape", "truth": "square"}, True),
    ("It is a circle or a square.", {"kind": "choice", "attr": "shape", "truth": "square"}, False),
    ("It is a red circle.", {"kind": "describe", "attr": "describe", "truth": None, "color": "red",
                             "shape": "circle"}, True),
])
def test_judge(text, facts, ok):
    assert shapes.judge(text, facts) is ok


def test_judge_takes_long_answers_in_linear_time():
    """No recursion and no quadratic walk: a 4000-word answer is judged at once (it raised RecursionError)."""
    assert shapes.judge("not " + " or ".join(["blue"] * 3000), {"kind": "color", "attr": "color", "truth": "blue"}) \
        is False
    assert shapes.judge(" ".join(["red"] * 4000), {"kind": "color", "attr": "color", "truth": "red"}) is True
    assert shapes.judge("red " * 20000 + "no " * 20000, _yn("blue", "red")) is True  # echo, no: 39 s when each "no" rescanned


def test_refine_corpus_prompts_are_the_pipelines_own(tmp_path):
    """The base LM trains on refine prompts as `Pipeline._encode_refine` builds them: the training path cuts
    the whole user message to the question budget, the pipeline only the question, so no message may reach
    the budget (the demo's is 64 tokens; its longest message is 54)."""
    from mmft.demo import init_base
    from mmft.demo_text import refine_corpus
    from mmft.prompt import encode_chat, refine_prompt
    from mmft.testing import make_tokenizer

    tokenizer = make_tokenizer()
    cfg = init_base(tmp_path)  # the demo's config: its budgets and refine template
    for turns in refine_corpus(cfg, 2000, seed=0):
        message = turns[0][1]
        assert len(tokenizer(message, add_special_tokens=False)["input_ids"]) < cfg.prompt_max_question_tokens
        if message.startswith("Question: "):
            question, _, rest = message[len("Question: "):].partition("\nDraft answer: ")
            draft = rest.split("\n")[0]
            trained = encode_chat(tokenizer, cfg, [("user", message)])  # pretrain_text's encoding
            served = encode_chat(tokenizer, cfg, [("user", refine_prompt(cfg, question, draft, tokenizer))],
                                 budget_questions=False)
            assert trained.input_ids == served.input_ids


def test_refine_corpus_targets_keep_the_drafts_content():
    from mmft.demo_text import refine_corpus

    corpus = refine_corpus(MMFTConfig(), 400, seed=0)
    drafts = [(turns[0][1].split("Draft answer: ")[1].split("\n")[0], turns[1][1]) for turns in corpus
              if "Draft answer:" in turns[0][1]]
    assert len(drafts) > 250  # the rest: reading comprehension and plain Q&A
    values = set(questions.COLORS) | set(questions.SHAPES) | {"yes", "no", "not"}

    def content(text):  # what the answer says: the yes/no word and the values after it (before it: the echo)
        words = [w for w in shapes.word_list(text) if w in values]
        lead = next((i for i, w in enumerate(words) if w in ("yes", "no", "not")), 0)
        return set(words[lead:])

    for draft, target in drafts:
        assert content(draft) == content(target), (draft, target)
    assert any(d.lower().startswith("no ") for d, _ in drafts)  # a stopword-less "no red"
    # yes/no drafts as the LoRA model is trained to write them (the cleaned answer's casing): "Red No blue"
    assert any(re.match(r"(Red|Green|Blue|Yellow|Purple|Orange) No [a-z]+$", d) for d, _ in drafts)
    echoes = [(shapes.words_of(d) & values) - content(d) for d, _ in drafts]  # "Red No blue": {"red"}
    assert sum(map(bool, echoes)) > 20
    assert all(not (shapes.words_of(t) & echo) for (_, t), echo in zip(drafts, echoes))  # never in the answer


def test_share_word_forms_gives_unseen_forms_a_seen_forms_input_embedding(tmp_path):
    """The base LM's text has `▁color` mid-line; an image question's line-initial "Color?" is `Color`.
    After text pre-training each unseen form takes a seen form's *input* embedding; the output side
    (what the LM writes) is the pre-trained one, untied, and both survive a save and reload."""
    from collections import Counter

    from transformers import Phi3ForCausalLM

    from mmft.demo_text import share_word_forms
    from mmft.testing import make_lm, make_tokenizer

    tokenizer = make_tokenizer()
    lm = make_lm(tokenizer)
    lm.config.tie_word_embeddings = True
    lm.tie_weights()
    ids = tokenizer.convert_tokens_to_ids
    text = tokenizer("What color is the shape? Red or green, Sir", add_special_tokens=False)["input_ids"]
    seen = Counter(text)
    assert ids("\u2581color") in seen and ids("Color") not in seen and ids("\u2581Sir") in seen
    before = lm.get_input_embeddings().weight.detach().clone()  # [V, D], tied: the output's too
    shared = share_word_forms(lm, tokenizer, seen)
    lm.save_pretrained(tmp_path / "lm")
    lm = Phi3ForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.float32)
    table, out = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    assert not lm.config.tie_word_embeddings and torch.equal(out, before)  # writing unchanged
    for form, source in [("Color", "\u2581color"), ("COLOR", "\u2581color"), ("color", "\u2581color"),
                         ("Red", "\u2581Red"), ("red", "\u2581Red"), ("\u2581red", "\u2581Red"),
                         ("Sir", "\u2581Sir"), ("Shape", "\u2581shape")]:
        if ids(form) != tokenizer.unk_token_id:
            assert torch.equal(table[ids(form)], before[ids(source)]), (form, source)
    for i in seen:  # seen forms keep their own
        assert torch.equal(table[i], before[i])
    moved = [i for i in range(len(before)) if not torch.equal(table[i], before[i])]
    assert len(moved) == shared > 5
    assert ids("\u2581circle") not in moved  # a word the text never had in any form stays as it was


@pytest.fixture(scope="module")
def demo_pipeline():
    from mmft.loading import load_round
    from mmft.pipeline import Pipeline

    model, info = load_round(DEMO_ROUND, device="cpu", dtype=torch.float32)
    assert model.cfg.vit_feature_mode == "patch" and info["round"] == 1
    return Pipeline(model)


# Regression guards, not the targets: the committed patch round measured (300 held-out images) colour
# 0.967, shape 0.857, describe 0.807, yes/no 0.81, choice 0.983, refine damage 0.0 with 8-bit int8
# activations (7-bit, CPUs without AVX-512 VNNI: 0.97, 0.857, 0.80, 0.807, 0.98); in-distribution colour 0.99,
# shape 0.99 (docs/training.md). With 40 answers per kind one standard deviation is
# sqrt(p (1 - p) / 40): 0.027 for 0.97, 0.055 for 0.857, 0.063 for 0.80 and 0.81, 0.022 for 0.98,
# so each floor sits ~2.5 deviations under the measured figure (this draw: 0.95, 0.95, 0.775, 0.85,
# 0.975; the same at 7 bits).
HELDOUT_FLOORS = {"color": 0.9, "shape": 0.72, "describe": 0.64, "yesno": 0.64, "choice": 0.92}
# The same 300 pictures asked in the independent writer's wordings measured 0.94, 0.94, 0.803, 0.773, 0.973
# (7-bit: 0.94, 0.937, 0.803, 0.78, 0.973)
# (deviations at 40 answers: 0.038, 0.038, 0.063, 0.065, 0.026); floors again ~2.5 deviations under
# (this draw: 0.975, 0.925, 0.70, 0.825, 0.95; 7-bit: 0.975, 0.925, 0.725, 0.825, 0.95).
INDEPENDENT_FLOORS = {"color": 0.84, "shape": 0.84, "describe": 0.64, "yesno": 0.61, "choice": 0.9}


@needs_demo
def test_committed_demo_round_on_fresh_images(demo_pipeline):
    heldout = shapes.evaluate(demo_pipeline, n=40, seed=424242, split="heldout")  # images the build never drew
    for kind, floor in HELDOUT_FLOORS.items():
        assert heldout["kinds"][kind]["accuracy"] >= floor, (kind, heldout)
    assert heldout["refine_damage"] <= 0.05, heldout
    for kind, frames in heldout["by_frame"].items():  # per-frame figures add up to the kind's
        assert sum(v["questions"] for v in frames.values()) == 40
        right = sum(v["questions"] * v["accuracy"] for v in frames.values())
        assert right == pytest.approx(40 * heldout["kinds"][kind]["accuracy"], abs=0.01), (kind, frames)
    independent = shapes.evaluate(demo_pipeline, n=40, seed=424242, split="independent")  # the same pictures
    for kind, floor in INDEPENDENT_FLOORS.items():
        assert independent["kinds"][kind]["accuracy"] >= floor, (kind, independent)
    assert independent["refine_damage"] <= 0.05, independent
    indist = shapes.evaluate(demo_pipeline, n=40, seed=424243, split="train", kinds=("color", "shape"))
    assert indist["kinds"]["color"]["accuracy"] >= 0.9 and indist["kinds"]["shape"]["accuracy"] >= 0.85, indist


@needs_demo
def test_a_no_survives_draft_and_refine(demo_pipeline):
    """clean -> train -> refine: the round trained on cleaned "Red? No, it is blue." drafts `Red No blue`;
    asked about red, it says no for shapes of other colours, and the refine keeps the no and the colour
    seen (the one after the no), dropping the echo."""
    rng = random.Random(5)
    truths = [("blue", "square"), ("green", "circle"), ("orange", "triangle"), ("purple", "square")]
    images = [shapes.draw(color, shape, rng, size=96) for color, shape in truths]
    answers = demo_pipeline.answer_images(images, ["Is the shape red?"] * len(images))
    said_no = [a for a in answers if "no" in shapes.words_of(a.draft)]
    assert len(said_no) >= 3, answers  # measured: 3 of 4 (orange, next to red, got a yes)
    for answer in said_no:
        words = shapes.word_list(answer.draft)
        seen = [w for w in words[words.index("no"):] if w in shapes.COLORS]
        assert answer.final.startswith("No, it is ") and seen, answer  # the no survives, first
        assert shapes.words_of(answer.final) & set(shapes.COLORS) == {seen[0]}, answer  # the colour seen, no echo
    # the refine stage alone, from stopword-less drafts with and without an echo
    assert demo_pipeline.refine(["Is this a triangle?", "Is it red?", "is this a circle?", "Is it purple?"],
                                ["no square", "Red No blue", "circle No square", "Purple No yellow"]) == [
        "No, it is a square.", "No, it is blue.", "No, it is a square.", "No, it is yellow."]


def test_demo_artefacts_stay_small():
    if not DEMO.exists():
        pytest.skip("demo/ not built")
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024, f"demo/ is {total / 1e6:.1f} MB"


def test_demo_bundle_names_no_path_of_the_build_machine():
    """Round info, adapter configs, tokenizer files: relative paths only (`../base/lm`), nothing under
    /tmp, /home or the builder's checkout."""
    if not DEMO.exists():
        pytest.skip("demo/ not built")
    texts = [p for p in DEMO.rglob("*") if p.suffix in (".json", ".md", ".txt", ".jinja") and p.is_file()]
    assert any(p.name == "adapter_config.json" for p in texts)
    for path in texts:
        text = path.read_text()
        for where in ("/tmp/", "/home/", "/root/", "/work/", str(DEMO.parent)):
            assert where not in text, (path, where)
    config = json.loads((DEMO_ROUND / "config.json").read_text())
    adapter = json.loads((DEMO_ROUND / "adapter" / "adapter_config.json").read_text())
    assert config["mmft"]["lm_model_id"] == adapter["base_model_name_or_path"] == "../base/lm"


# Written by hand for this test, not by `mmft.questions` (none is a generator phrasing: checked below),
# fixed before the build they measure. Shapes are drawn with PIL's named colours (fill="orange"), on white.
HAND_WORDINGS = {
    "color": ["what colour has it got", "Which color is this thing?", "colour please", "Tell me its colour.",
              "what color?", "what colour is the drawing"],
    "shape": ["What shape is it", "what is this shape called?", "which geometric figure do you see", "what shape?",
              "name that shape", "What kind of figure is that?"],
    "describe": ["what's in the picture?", "Describe this image.", "what do you see in it",
                 "Can you describe the drawing?", "what is on the picture", "Tell me about this image"],
    "yesno": ["could it be {v}?", "Is this {v}?", "so this one is {v}?", "Is the picture showing {v}?"],
    "choice": ["Is that {v} or {w}?", "would you say {v} or {w}?", "Which one is it: {v} or {w}?"],
}
# The committed patch round measured colour, describe, yes/no and choice 18/18, shape 17/18
# (docs/training.md). 18 answers per kind: one wrong answer is 0.056, so each floor allows two more misses.
HAND_FLOORS = {"color": 0.85, "shape": 0.85, "describe": 0.8, "yesno": 0.8, "choice": 0.85}


def hand_cases():
    from PIL import Image, ImageDraw

    rng = random.Random(123)
    for i, (color, shape) in enumerate([(c, s) for c in questions.COLORS for s in questions.SHAPES]):
        w, h = rng.choice([(120, 120), (300, 200), (640, 480), (100, 300), (64, 64)])
        image = Image.new("RGB", (w, h), "white")
        side = int(min(w, h) * rng.uniform(0.35, 0.8))
        x, y = (w - side) // 2 + rng.randint(-side // 8, side // 8), (h - side) // 2 + rng.randint(-side // 8, side // 8)
        pen = ImageDraw.Draw(image)
        if shape == "circle":
            pen.ellipse([x, y, x + side, y + side], fill=color)
        elif shape == "square":
            pen.rectangle([x, y, x + side, y + side], fill=color)
        else:
            pen.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=color)
        yield i, image, color, shape


def hand_questions(i, color, shape):
    """One hand-written question per kind for case `i`, with the facts `shapes.judge` needs."""
    out = {}
    for kind in ("color", "shape", "describe"):
        out[kind] = (HAND_WORDINGS[kind][i % len(HAND_WORDINGS[kind])],
                     {"kind": kind, "attr": kind, "truth": {"color": color, "shape": shape}.get(kind),
                      "color": color, "shape": shape})
    attr = "color" if i % 2 == 0 else "shape"
    truth, values = (color, questions.COLORS) if attr == "color" else (shape, questions.SHAPES)
    other = values[(values.index(truth) + 1 + i // 2 % (len(values) - 1)) % len(values)]
    asked = truth if i % 4 < 2 else other
    say = (lambda v: v) if attr == "color" else questions.article
    frame = HAND_WORDINGS["yesno"][i % len(HAND_WORDINGS["yesno"])]
    out["yesno"] = (frame.format(v=say(asked)), {"kind": "yesno", "attr": attr, "truth": truth, "asked": asked,
                                                 "polarity": "yes" if asked == truth else "no"})
    x, y = (truth, other) if i % 3 else (other, truth)
    out["choice"] = (HAND_WORDINGS["choice"][i % 3].format(v=say(x), w=say(y)),
                     {"kind": "choice", "attr": attr, "truth": truth})
    return out


def test_hand_wordings_are_not_generator_phrasings():
    every = set()  # what fine-tuning and the base LM's text pre-training can draw
    for kind in questions.KINDS:
        every |= {_norm(q) for q in questions.training_phrasings(kind, "text")}
    for kind, wordings in HAND_WORDINGS.items():
        for wording in wordings:
            q = _norm(wording.format(v="red", w="blue")).rstrip("?.")
            assert q not in every, wording


@needs_demo
def test_hand_drawn_shapes_with_hand_written_questions(demo_pipeline):
    cases = list(hand_cases())
    right = {kind: 0 for kind in HAND_FLOORS}
    asked = [(image, hand_questions(i, color, shape)) for i, image, color, shape in cases]
    for kind in HAND_FLOORS:
        answers = demo_pipeline.answer_images([image for image, _ in asked], [q[kind][0] for _, q in asked])
        right[kind] = sum(shapes.judge(a.final, q[kind][1]) for a, (_, q) in zip(answers, asked))
    print({k: f"{v}/{len(cases)}" for k, v in right.items()})
    for kind, floor in HAND_FLOORS.items():
        assert right[kind] / len(cases) >= floor, (kind, right)


# -- the build's two processes ---------------------------------------------------------------------
def _threads_and_pid(x):
    import os

    return x * x, torch.get_num_threads(), os.getpid()


def test_worker_pool_runs_jobs_in_one_thread_processes_and_inline_without_one(monkeypatch):
    import os

    from mmft import demo

    (value, threads, pid), seconds = demo.submit(None, _threads_and_pid, 3).result()
    assert (value, pid) == (9, os.getpid()) and seconds >= 0  # no pool: here, now
    monkeypatch.setattr(demo, "_cores", lambda: 16)  # a bigger machine computes as the 2-core build does
    with demo.worker_pool(2) as pool:
        done = [demo.submit(pool, _threads_and_pid, x).result()[0] for x in (2, 5)]
    assert [d[0] for d in done] == [4, 25]
    assert {d[1] for d in done} == {1}  # one thread each
    assert os.getpid() not in {d[2] for d in done}
    with demo.worker_pool(1) as pool:
        assert pool is None


@pytest.mark.slow
def test_a_failed_build_leaves_the_demo_as_it_was(tmp_path, monkeypatch):
    """The build wrote the new base into demo/base first: failing later left old rounds on a new base."""
    from mmft import demo

    out = tmp_path / "demo"
    for part in ("base", "round"):
        (out / part).mkdir(parents=True)
        (out / part / "old.txt").write_text(part)

    def broken(*args, **kwargs):
        raise RuntimeError("the data step failed")

    monkeypatch.setattr(demo, "prepare_features", broken)
    with pytest.raises(RuntimeError, match="the data step failed"):
        demo.build_demo(out, samples=24, steps=2, lm_steps=2, clip_steps=0, eval_n=2, indist_n=2, workers=1)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["base", "base/old.txt", "round",
                                                                        "round/old.txt"]


def test_a_build_killed_while_moving_in_leaves_no_old_round_on_the_new_base(tmp_path, monkeypatch):
    from pathlib import Path

    from mmft import demo

    stage, out = tmp_path / "demo.partial", tmp_path / "demo"
    for root, tag in ((out, "old"), (stage, "new")):
        (root / "base").mkdir(parents=True)
        (root / "base" / "weights").write_text(tag)
        for name in ("round", "round-pooled"):
            (root / name).mkdir()
            (root / name / "config.json").write_text(json.dumps({"mmft": {"lm_model_id": "../base/lm"}, "tag": tag}))
    rename, moved = Path.rename, []

    def dies_on_the_second(self, target):
        if len(moved) == 1:
            raise KeyboardInterrupt("killed")
        moved.append(self.name)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        demo.move_in(stage, out)
    assert moved == ["base"] and (out / "base" / "weights").read_text() == "new"
    assert not any((out / name).exists() for name in ("round", "round-pooled"))  # missing, not old on new


def test_build_demo_side_by_side_writes_both_rounds_and_their_figures(tmp_path):
    """The whole two-process schedule at toy size: base, both rounds beside it, metrics, stage times."""
    from mmft import demo
    from mmft.loading import load_round

    stale, other = tmp_path / "demo" / "round-old", tmp_path / "demo" / "round-mine"  # an earlier build's round
    for folder, lm in ((stale, "../base/lm"), (other, "/somewhere/lm")):  # ... and one on another base
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"mmft": {"lm_model_id": lm}}))
    results = demo.build_demo(tmp_path / "demo", samples=24, steps=2, lm_steps=2, clip_steps=2, eval_n=2,
                              indist_n=2, workers=2, eval_seed=5)
    assert not stale.exists() and other.is_dir()  # it would have read the new base; the other one does not
    assert results["workers"] == 2
    assert set(results["seconds"]) == {"base", "base_lm", "base_clip", "data", "patch_train", "patch_eval",
                                       "pooled_train", "pooled_eval", "total"}
    for mode, folder in (("patch", "round"), ("pooled", "round-pooled")):
        heldout = results[mode]["heldout"]
        assert heldout["images"] == 2 and set(heldout["kinds"]) == set(heldout["by_frame"]) == set(questions.KINDS)
        cfg = json.loads((tmp_path / "demo" / folder / "config.json").read_text())
        assert cfg["mmft"]["lm_model_id"] == "../base/lm" and cfg["mmft"]["vit_feature_mode"] == mode
        assert "indist_color_accuracy" in cfg["round"]["metrics"], cfg["round"].keys()
        independent = results[mode]["independent"]  # the held-out pictures, in the independent wordings
        assert independent["split"] == "independent" and independent["images"] == 2
        assert {f"independent_{k}_accuracy" for k in questions.KINDS} <= set(cfg["round"]["metrics"])
        assert cfg["round"]["metrics"]["independent_color_accuracy"] == independent["kinds"]["color"]["accuracy"]
        record = json.loads((tmp_path / "demo" / folder / "metrics.json").read_text())
        assert record["evaluated_with"] == dict(device="cpu", dtype="float32", quantize="int8",
                                                int8_activation_bits=activation_bits())  # as the app serves it
    model, _ = load_round(tmp_path / "demo" / "round", device="cpu", dtype=torch.float32)
    assert model.cfg.vit_feature_mode == "patch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # demo.partial moved in and gone
