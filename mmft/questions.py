"""Questions about a shape as people ask them, and the answers the shapes world trains on.

A question is a *frame* ("what {c} is the {o}") filled with *synonyms* ({c}: colour/color/hue,
{o}: shape/object/figure/thing) and values, then given a polite prefix, a casing, punctuation and
now and then a typo. Frames, synonyms and prefixes come in disjoint families: `train` ones build the
fine-tuning data; `heldout` ones appear only in evaluation, so the held-out accuracy measures
phrasings the fine-tuned model never saw. Every held-out question uses at least one held-out frame,
synonym or prefix (`training_phrasings` enumerates what training can draw, for the tests).

Kinds: `color`, `shape`, `describe` (both), `yesno` ("Is the shape red?") and `choice` ("Is it a
circle or a square?"). Yes/no answers first echo the value asked about, then decide ("Red? No, it is
blue." -> draft `Red No blue`): each step is one a tiny model learns with its own supervision (copy the
asked value; compare the token just written with what it sees; name what it sees). Deciding yes/no
from the question alone, or after naming the colour, measured at chance (docs/training.md).
`render` is the one place that turns a draft's content words into a sentence; the refine stage
learns exactly that mapping.

A third family, `text`, is the tiny base LM's *language* (its text pre-training, `mmft.demo_text`): the
training frames and prefixes, a few frames of its own, and every synonym, the held-out ones
included, as Phi-3.5 knows "shade" from pre-training. Fine-tuning never sees a held-out synonym or a
`text` frame; no model sees a held-out frame or prefix (`facts["heldout"]` says which of the two made
a question held-out).

A fourth, `independent`, is evaluation only: questions as typed by a writer who was shown none of the
frames here, only the demo's world (`assets/independent_questions.json`), asked exactly as written.
"""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
KINDS = ("color", "shape", "describe", "yesno", "choice")
SPLITS = ("train", "heldout", "text", "independent")
# Questions written, as visitors type them, by someone shown none of the frames here (evaluation only).
INDEPENDENT = Path(__file__).resolve().parent / "assets" / "independent_questions.json"

# {c}: a word for colour, {o}: a word for the object, {v}/{w}: values ("red", "a circle");
# a frame marked "color:" or "shape:" is asked about that attribute only.
COLOR_WORDS = {"train": ("colour", "color", "hue"), "heldout": ("shade", "tint")}
OBJECT_WORDS = {"train": ("shape", "object", "figure", "thing"), "heldout": ("item", "form")}
PREFIXES = {"train": ("", "", "", "", "please, ", "hey, ", "so ", "could you tell me: ", "i'd like to know: "),
            "heldout": ("excuse me, ", "quick question: ", "one more thing: ")}
FRAMES = {
    "color": {
        "train": ("what {c} is the {o}", "what {c} is this {o}", "which {c} is the {o}", "what is the {c} of the {o}",
                  "tell me the {c} of the {o}", "what {c} does the {o} have", "{c}", "what {c} is it",
                  "can you name the {c} of the {o}", "what {c} do you see", "identify the {c} of the {o}",
                  "the {o} is what {c}", "name the {c}"),
        "heldout": ("tell me the {o}'s {c}", "which {c} does it have", "what's the {c} here",
                    "in what {c} is the {o} painted", "{c} of the {o}", "could you say which {c} this {o} is"),
        "text": ("what {c} has the {o}", "say the {c}", "i want to know the {c}", "give me the {c} of the {o}",
                 "what is its {c}", "what {c} would you call it"),
    },
    "shape": {
        "train": ("what shape is the {o}", "which shape is this", "what kind of {o} is this", "what is the {o}",
                  "name the {o}", "what shape do you see", "tell me the shape of the {o}", "shape",
                  "what type of {o} is it", "what geometric shape is shown", "which shape is in the image",
                  "can you name the shape"),
        "heldout": ("what's the {o}'s outline", "what sort of {o} is in the picture", "which form does the {o} have",
                    "could you tell me what {o} this is", "identify the {o} for me", "the {o} looks like what"),
        "text": ("what is it", "name this {o}", "what {o} is drawn", "which {o} is it", "what kind of shape is it",
                 "what shape has the {o}"),
    },
    "describe": {
        "train": ("describe the image", "what do you see", "what is in the picture", "describe the {o}",
                  "what is shown", "tell me about the picture", "what is this", "what is in the image"),
        "heldout": ("describe what is in this picture", "what can you see here", "give me a description of the {o}",
                    "what does the image show"),
        "text": ("describe it", "tell me what you see", "what does it look like", "explain the picture",
                 "what is drawn here"),
    },
    "yesno": {
        "train": ("is the {o} {v}", "is it {v}", "is this {o} {v}", "color:does the {o} look {v}",
                  "would you say it is {v}", "shape:is this {v}", "shape:is that {v}", "color:is the {c} {v}"),
        "heldout": ("is the {o} {v} or not", "am i right that the {o} is {v}", "{v}, right", "shape:do i see {v} here",
                    "can i call the {o} {v}", "color:is its {c} {v}"),
        "text": ("{v}", "it is {v}, isn't it", "tell me if it is {v}", "do you think it is {v}",
                 "is the {o} really {v}", "color:is the {o} colored {v}"),
    },
    "choice": {
        "train": ("is it {v} or {w}", "is the {o} {v} or {w}", "shape:is this {v} or {w}", "{x} or {y}",
                  "which is it, {v} or {w}", "color:is the {c} {v} or {w}"),
        "heldout": ("would you call it {v} or rather {w}", "either {x} or {y}: which one", "{x} or {y}, which",
                    "which fits the {o} better, {x} or {y}"),
        "text": ("is it {v} or is it {w}", "which one: {x} or {y}", "pick one, {x} or {y}", "tell me, {v} or {w}"),
    },
}
ENDINGS = ("?", "?", "?", "", ".", "??", " ?", "!")


def article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _value(attr: str, value: str) -> str:
    return article(value) if attr == "shape" else value


def frames(kind: str, attr: str, split: str) -> list[str]:
    """The frames of one family that can ask about `attr`, without their attribute marks."""
    out = []
    for frame in FRAMES[kind][split]:
        mark, _, rest = frame.rpartition(":") if frame.split(":")[0] in ("color", "shape") else ("", "", frame)
        if mark in ("", attr):
            out.append(rest)
    return out


def _typo(text: str, rng: random.Random, protect: set[str]) -> str:
    """One slip of the finger in one word of 4+ letters (never in a value the answer depends on)."""
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha() and w.lower() not in protect]
    if not spots:
        return text
    i = rng.choice(spots)
    w, j = words[i], rng.randrange(len(words[i]) - 1)
    words[i] = rng.choice([w[:j] + w[j + 1] + w[j] + w[j + 2:], w[:j] + w[j + 1:], w[:j] + w[j] + w[j:]])
    return " ".join(words)


def _surface(text: str, rng: random.Random, typo_rate: float) -> str:
    """Casing, punctuation and now and then a typo: the noise of real typing, in both splits."""
    if rng.random() < typo_rate:
        text = _typo(text, rng, set(COLORS) | set(SHAPES))
    casing = rng.random()
    if casing < 0.55:
        text = text[:1].upper() + text[1:]
    elif casing < 0.6:
        text = text.upper()
    elif casing < 0.65:
        text = text.title()
    return text + rng.choice(ENDINGS)


def _fill(frame: str, attr: str, x: str, y: str, c: str, o: str) -> str:
    return frame.format(c=c, o=o, x=x, y=y, v=_value(attr, x), w=_value(attr, y))


def _family(kind: str, attr: str, split: str) -> tuple[list[str], tuple[str, ...], tuple[str, ...]]:
    """What a training family draws from: frames, colour words, object words. `train`: the training
    ones; `text`: those, the text frames and every synonym (the held-out ones included)."""
    text = split == "text"
    return (frames(kind, attr, "train") + (frames(kind, attr, "text") if text else []),
            COLOR_WORDS["train"] + (COLOR_WORDS["heldout"] if text else ()),
            OBJECT_WORDS["train"] + (OBJECT_WORDS["heldout"] if text else ()))


def _canonical(kind: str, attr: str, x: str, y: str, rng: random.Random, split: str) -> tuple[str, str | None, str]:
    """A question before surface noise, what makes it held-out: None; "frame" (wording no model
    saw: a held-out frame or prefix); "synonym" (else: a held-out synonym, known only to the base LM);
    and its frame (the evaluation's per-frame figures).
    Held-out: a held-out frame (any synonyms, any prefix), or a training frame with a held-out
    synonym in one of its slots (or, slot-less, a held-out prefix). `text`: a training or text frame,
    a training prefix, any synonym."""
    pick = rng.choice
    if split in ("train", "text"):
        family, colors, objects = _family(kind, attr, split)
        prefix, frame = pick(PREFIXES["train"]), pick(family)
        return prefix + _fill(frame, attr, x, y, pick(colors), pick(objects)), None, frame
    c, o = pick(COLOR_WORDS["train"] + COLOR_WORDS["heldout"]), pick(OBJECT_WORDS["train"] + OBJECT_WORDS["heldout"])
    prefix = pick(PREFIXES["train"] + PREFIXES["heldout"])
    if rng.random() < 0.6:
        frame = pick(frames(kind, attr, "heldout"))
        return prefix + _fill(frame, attr, x, y, c, o), "frame", frame
    frame = pick(frames(kind, attr, "train"))
    slots = [s for s in "co" if "{" + s + "}" in frame]
    why = "frame" if prefix in PREFIXES["heldout"] else "synonym"  # a held-out prefix: no model saw it
    if not slots:
        prefix, why = pick(PREFIXES["heldout"]), "frame"
    elif pick(slots) == "c":
        c = pick(COLOR_WORDS["heldout"])
    else:
        o = pick(OBJECT_WORDS["heldout"])
    return prefix + _fill(frame, attr, x, y, c, o), why, frame


@cache
def independent(kind: str, attr: str) -> tuple[str, ...]:
    """The independent writer's questions of one kind (about `attr` for yes/no and choice), as typed;
    read once per process, as evaluation asks hundreds."""
    items = json.loads(INDEPENDENT.read_text(encoding="utf-8"))["questions"]
    return tuple(q["text"] for q in items
                 if q["kind"] == kind and (kind not in ("yesno", "choice") or q["attr"] == attr))


def _as_written(text: str, attr: str, x: str, y: str) -> str:
    """An independent question with its values in; every other character as typed (no `str.format`: a
    brace a visitor types stays a brace)."""
    return text.replace("{v}", _value(attr, x)).replace("{w}", _value(attr, y))


def ask(kind: str, color: str, shape: str, rng: random.Random, split: str = "train",
        typo_rate: float = 0.08) -> tuple[str, dict]:
    """(question, facts) about a `color` `shape`; facts say what a right answer holds, and carry
    the question before surface noise (`canonical`) and its `frame`. `answer(facts)` is the
    training answer."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    attr = rng.choice(("color", "shape")) if kind in ("yesno", "choice") else kind
    values = COLORS if attr == "color" else SHAPES
    truth = color if attr == "color" else shape
    other = rng.choice([v for v in values if v != truth])
    x = y = truth
    facts = {"kind": kind, "attr": attr, "truth": truth, "color": color, "shape": shape}
    if kind == "yesno":
        x = truth if rng.random() < 0.5 else other
        facts["polarity"] = "yes" if x == truth else "no"
        facts["asked"] = x
    elif kind == "choice":
        x, y = (truth, other) if rng.random() < 0.5 else (other, truth)
        facts["options"] = (x, y)
    if split == "independent":  # as written: its own casing, punctuation and slips
        frame = rng.choice(independent(kind, attr))
        facts["canonical"], facts["heldout"], facts["frame"] = _as_written(frame, attr, x, y), "independent", frame
        return facts["canonical"], facts
    facts["canonical"], facts["heldout"], facts["frame"] = _canonical(kind, attr, x, y, rng, split)
    return _surface(facts["canonical"], rng, typo_rate), facts


def answer(facts: dict) -> str:
    """The full-sentence training answer (the LoRA model trains on its cleaned form)."""
    kind, truth = facts["kind"], facts["truth"]
    value = _value(facts["attr"], truth)
    if kind == "describe":
        return f"It is {article(facts['color'] + ' ' + facts['shape'])}."
    if kind == "yesno":
        asked = _value(facts["attr"], facts["asked"])
        return f"{asked[:1].upper() + asked[1:]}? {facts['polarity'].capitalize()}, it is {value}."
    return f"It is {value}."


def render(polarity: str | None, color: str | None, shape: str | None) -> str:
    """Content words -> the sentence the refine stage writes: ('no', 'orange', 'square') ->
    'No, it is an orange square.'"""
    if color and shape:
        thing = article(f"{color} {shape}")
    else:
        thing = color or (article(shape) if shape else None)
    if thing is None:
        return {"yes": "Yes.", "no": "No."}.get(polarity, "I cannot tell from the picture.")
    if polarity == "not":
        return f"It is not {thing}."
    if polarity in ("yes", "no"):
        return f"{polarity.capitalize()}, it is {thing}."
    return f"It is {thing}."


def training_phrasings(kind: str, split: str = "train") -> set[str]:
    """Every question of `kind` a training family (`train`, or the base LM's `text`) can draw, before
    surface noise, for the values red/blue, circle/square."""
    out = set()
    for attr, (x, y) in (("color", ("red", "blue")), ("shape", ("circle", "square"))):
        family, colors, objects = _family(kind, attr, split)
        for frame in family:
            for c in colors:
                for o in objects:
                    for prefix in PREFIXES["train"]:
                        out.add(prefix + _fill(frame, attr, x, y, c, o))
    return out
