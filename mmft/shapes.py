"""The shapes world: a synthetic data set that proves the model *learns*, and the offline demo.

Each image is one shape (circle, square, triangle) in one of six colours on a light background.
Two image styles: `TRAIN_STYLE` (what training draws) and `HELDOUT_STYLE` (what evaluation draws:
wider ranges of size, canvas, aspect, shade, background and rotation than training has). Questions
come from `mmft.questions` (training or held-out phrasing families); conversations are written in
the LLaVA-Instruct JSON format, so they go through the real data path. `evaluate` reports accuracy
per question kind for the draft and the final answer, and how often the refine stage spoils a
right draft.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mmft.questions import COLORS as COLOR_NAMES
from mmft.questions import KINDS, SHAPES, answer, ask

COLORS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 200, 20),
          "purple": (135, 55, 175), "orange": (245, 135, 25)}
assert tuple(COLORS) == COLOR_NAMES
# How PIL/CSS name these colours: what a person drawing `fill="orange"` gets.
NAMED = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
         "purple": (128, 0, 128), "orange": (255, 165, 0)}
PASTELS = ((255, 244, 220), (255, 228, 232), (226, 250, 232), (222, 238, 255), (240, 228, 255), (250, 250, 215))


@dataclass(frozen=True)
class Style:
    """How images vary. Sizes are px of the canvas's shorter edge; `side` is the shape's side as a
    fraction of that edge (shrunk if a rotation would cut it); the shape always lies in the central
    square, which is what CLIP's centre crop keeps."""

    canvas: tuple[int, int]
    max_aspect: float  # long edge / short edge
    non_square: float  # share of non-square canvases
    side: tuple[float, float]
    jitter: int  # +- per RGB channel of the shape's colour
    pastel: float  # share of tinted (pastel) backgrounds; the rest are near-white/grey
    rotation: float  # max degrees
    rotated: float  # share of rotated shapes
    named: float = 0.0  # share of shapes whose colour lies between ours and the PIL/CSS named colour


TRAIN_STYLE = Style(canvas=(48, 160), max_aspect=1.5, non_square=0.25, side=(0.2, 0.85), jitter=12, pastel=0.0,
                    rotation=6.0, rotated=0.25)
# The CLIP stand-in's contrastive pre-training (only) sees a broad style, as CLIP ViT-B/32 saw shapes of
# every size, tilt and rendering of "red" in 400M web images; projector + LoRA fine-tuning sees
# TRAIN_STYLE only.
CLIP_STYLE = Style(canvas=(40, 256), max_aspect=2.0, non_square=0.4, side=(0.15, 0.9), jitter=20, pastel=0.3,
                   rotation=15.0, rotated=0.5, named=0.5)
HELDOUT_STYLE = Style(canvas=(32, 1024), max_aspect=2.0, non_square=0.6, side=(0.15, 0.95), jitter=25, pastel=0.5,
                      rotation=15.0, rotated=1.0)


def _background(rng: random.Random, style: Style) -> tuple[int, int, int]:
    if rng.random() < style.pastel:
        return tuple(min(255, max(205, c + rng.randint(-10, 10))) for c in rng.choice(PASTELS))
    shade = rng.randint(225, 250)
    return (shade, shade, min(255, max(210, shade + rng.randint(-12, 8))))


def draw(color: str, shape: str, rng: random.Random, size: int | None = 64,
         style: Style = TRAIN_STYLE) -> Image.Image:
    """One `color` `shape`; `size` fixes a square canvas (the app's examples), `None` lets the style pick."""
    if size is None:
        short = int(math.exp(rng.uniform(math.log(style.canvas[0]), math.log(style.canvas[1]))))
        long = int(short * rng.uniform(1.0, style.max_aspect)) if rng.random() < style.non_square else short
        width, height = (long, short) if rng.random() < 0.5 else (short, long)
    else:
        width = height = short = size
    image = Image.new("RGB", (width, height), _background(rng, style))
    angle = math.radians(rng.uniform(-style.rotation, style.rotation)) if rng.random() < style.rotated else 0.0
    grow = 1.0 if shape == "circle" else abs(math.cos(angle)) + abs(math.sin(angle))
    side = min(short * rng.uniform(*style.side), short / grow)
    box = side * grow
    cx = (width - short) / 2 + rng.uniform(box / 2, short - box / 2)  # inside the central square
    cy = (height - short) / 2 + rng.uniform(box / 2, short - box / 2)
    base = COLORS[color]
    if rng.random() < style.named:
        t = rng.random()
        base = tuple(round(a + t * (b - a)) for a, b in zip(base, NAMED[color]))
    fill = tuple(min(255, max(0, c + rng.randint(-style.jitter, style.jitter))) for c in base)
    pen = ImageDraw.Draw(image)
    half = side / 2
    if shape == "circle":
        pen.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
        return image
    corners = ([(-half, -half), (half, -half), (half, half), (-half, half)] if shape == "square"
               else [(0, -half), (half, half), (-half, half)])
    cos, sin = math.cos(angle), math.sin(angle)
    pen.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners], fill=fill)
    return image


def sample(rng: random.Random) -> tuple[str, str]:
    return rng.choice(COLOR_NAMES), rng.choice(SHAPES)


KIND_WEIGHTS = {"color": 0.18, "shape": 0.18, "describe": 0.12, "yesno": 0.35, "choice": 0.17}


def conversation(color: str, shape: str, rng: random.Random) -> list[dict]:
    """One or two LLaVA turns about the image (training phrasings); the image marker goes first."""
    turns = []
    for i in range(rng.choice([1, 1, 2])):
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        question, facts = ask(kind, color, shape, rng, "train")
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer(facts)})
    return turns


def write_dataset(folder: str | Path, n: int, seed: int, name: str = "train") -> Path:
    """`folder/images/NAME-i.png` + `folder/NAME.json` in the LLaVA-Instruct format."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        color, shape = sample(rng)
        file = f"{name}-{i:05d}.png"
        draw(color, shape, rng, size=None).save(folder / "images" / file)
        records.append({"id": f"{name}-{i}", "image": file, "conversations": conversation(color, shape, rng)})
    path = folder / f"{name}.json"
    path.write_text(json.dumps(records))
    return path


def word_list(text: str) -> list[str]:
    return "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()


def words_of(text: str) -> set[str]:
    return set(word_list(text))


YES_WORDS, NO_WORDS = ("yes", "yeah", "yep", "yup"), ("no", "nope")
DENIERS = ("not", "no", "nope", "never", "neither", "nor", "cannot", "cant", "wont", "aint")
# an n't word typed without its apostrophe: "isnt", "couldnt", "doesnt"...
_AUXILIARIES = ("is", "are", "was", "were", "do", "does", "did", "has", "have", "had", "could", "should", "would",
                "must", "might", "need", "shall")
_CLAUSE_ENDS = (".", ",", ";", ":", "!", "?", "-", "\u2013", "\u2014", "\u2026", "(", ")", "[", "]", "but")
_ARTICLES = ("a", "an", "the")
_APOSTROPHES = str.maketrans({c: "'" for c in "\u2018\u2019\u00b4`\u02bc"})
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|[^\sa-z0-9']")  # words (with their n't, 's), punctuation marks


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().translate(_APOSTROPHES))


def _is_denier(word: str) -> bool:
    return word in DENIERS or word.endswith("n't") or (word.endswith("nt") and word[:-2] in _AUXILIARIES)


def _denials(tokens: list[str], values, answers=frozenset()) -> dict[int, bool]:
    """For each value of `values` in `tokens` (by position): is it denied? A value is denied when a denier
    ("not", an n't, "no", "never"...) stands earlier in its clause ("not red", "isn't a square", "no red", "not
    really blue", "can't be blue"), or when "or"/"nor" joins it to a denied value ("isn't red or blue"). The walk
    back stops at the clause's end (punctuation, "but"), at a yes/no word that answers (`answers`: "No, it is
    blue", the draft "Red No blue") and at another value of the same kind (the cleaned "not red blue" denies
    red only). A value asked back and answered no is denied too ("Blue? No."). Left to right, so a value's
    denial is known when a later one joins it."""
    out: dict[int, bool] = {}
    for i, word in enumerate(tokens):
        if word not in values:
            continue
        out[i] = tokens[i + 1 : i + 2] == ["?"] and i + 2 < len(tokens) and tokens[i + 2] in NO_WORDS
        if out[i]:
            continue
        j = i - 1
        while j >= 0 and tokens[j] not in _CLAUSE_ENDS and j not in answers:
            if tokens[j] in ("or", "nor"):
                k = j - 1
                while k >= 0 and tokens[k] in _ARTICLES:
                    k -= 1
                if k in out:  # "red or blue": blue shares red's fate
                    out[i] = out[k]
                    break
            if tokens[j] in values:
                break
            if _is_denier(tokens[j]):
                out[i] = True
                break
            j -= 1
    return out


def score(text: str, truth: str, vocabulary) -> bool:
    """Right when the answer affirms the true word, never denies it, and affirms no other word of the same
    kind: "It is red, not blue." is right for red; "It is not red." and "red or blue" are not."""
    tokens = _tokens(text)
    found = [(tokens[i], d) for i, d in _denials(tokens, set(vocabulary)).items()]
    return any(w == truth and not d for w, d in found) and all((w == truth) != d for w, d in found)


def _answer_words(tokens: list[str], values) -> list[int]:
    """Positions of the yes/no words that answer: every yes-word, and a no-word that opens the answer, follows
    only the echo of a value ("Red? No, ..."; the draft "Red No blue") or ends a clause ("..., no."). Any other
    "no" denies ("There is no blue.")."""
    found = []
    echo = next((i for i, t in enumerate(tokens) if t.isalnum() and t not in values and t not in _ARTICLES),
                len(tokens))  # tokens[:echo] are values, articles and marks only
    for i, word in enumerate(tokens):
        if word in YES_WORDS:
            found.append(i)
        elif word in NO_WORDS and (i <= echo or i + 1 == len(tokens) or tokens[i + 1] in _CLAUSE_ENDS):
            found.append(i)
    return found


def judge(text: str, facts: dict) -> bool:
    """Is `text` (a draft or a final answer) right for the question `facts` describe?"""
    if facts["kind"] == "describe":
        return score(text, facts["color"], COLORS) and score(text, facts["shape"], SHAPES)
    values = set(COLORS if facts["attr"] == "color" else SHAPES)
    if facts["kind"] != "yesno":
        return score(text, facts["truth"], values)
    # "No, it is blue.", "No.", "No, it is blue, not red.", "No, it is not red.", "It is not red." and the draft
    # "Red No blue" are right for a blue shape asked "Is it red?": yes/no words of one polarity, the right
    # one (or none, when the asked value is denied); the truth is never denied; before the first yes/no word
    # only the echo of the asked value (or the truth) is named, after it only the truth is affirmed.
    tokens, truth, asked = _tokens(text), facts["truth"], facts.get("asked")
    polar = _answer_words(tokens, values)
    denials = _denials(tokens, values, frozenset(polar))
    if any(tokens[i] == truth and d for i, d in denials.items()):
        return False
    affirmed = [(i, tokens[i]) for i, d in denials.items() if not d]
    if not polar:  # "It is not red.": a denial of the value asked about is a no
        return (facts["polarity"] == "no" and any(tokens[i] == asked and d for i, d in denials.items())
                and all(w == truth for _, w in affirmed))
    if {"yes" if tokens[i] in YES_WORDS else "no" for i in polar} != {facts["polarity"]}:
        return False
    return all(w in (asked, truth) if i < polar[0] else w == truth for i, w in affirmed)


def evaluate(pipeline, n: int = 300, seed: int = 10_000, split: str = "heldout", batch_size: int = 64,
             kinds=KINDS) -> dict:
    """`n` fresh images, one question of each kind per image, through the full staged pipeline.

    `split="heldout"` draws held-out images and phrasings; `"independent"` the same images (same
    `seed`) asked in an independent writer's wordings (`questions.independent`); `"train"` the training
    ones (fresh images, the distribution training saw). Refine damage: the share of calls whose draft was
    right and whose final answer is wrong. `by_frame`: accuracy per kind and frame, so a wording the
    model cannot place shows up by name, not only as a lower average."""
    rng = random.Random(seed)
    style = HELDOUT_STYLE if split in ("heldout", "independent") else TRAIN_STYLE
    truths = [sample(rng) for _ in range(n)]
    images = [draw(color, shape, rng, size=None, style=style) for color, shape in truths]
    out = {"split": split, "images": n, "kinds": {}, "examples": []}
    damaged = calls = 0
    families = {}  # what made a held-out question held-out -> [right or not]
    by_frame = {}  # kind -> frame -> [right or not]
    pixels = torch.cat([pipeline.model.vision.preprocess(images[i : i + batch_size])  # [n, 3, H, W]: each
                        for i in range(0, n, batch_size)])  # picture resized once, not once per kind
    for kind in kinds:
        asked = [ask(kind, color, shape, rng, split) for color, shape in truths]
        answers = pipeline.answer_images(pixels, [q for q, _ in asked], batch_size=batch_size)
        drafts_ok = [judge(a.draft, f) for a, (_, f) in zip(answers, asked)]
        finals_ok = [judge(a.final, f) for a, (_, f) in zip(answers, asked)]
        damage = sum(d and not f for d, f in zip(drafts_ok, finals_ok))
        for (_, facts), ok in zip(asked, finals_ok):
            families.setdefault(facts["heldout"], []).append(ok)
            by_frame.setdefault(kind, {}).setdefault(facts["frame"], []).append(ok)
        out["kinds"][kind] = {"accuracy": round(sum(finals_ok) / n, 4), "draft_accuracy": round(sum(drafts_ok) / n, 4),
                              "refine_damage": round(damage / n, 4)}
        damaged, calls = damaged + damage, calls + n
        wrong = [a for a, ok in zip(answers, finals_ok) if not ok]
        right = [a for a, ok in zip(answers, finals_ok) if ok]
        out["examples"] += [{"kind": kind, "question": a.question, "draft": a.draft, "answer": a.final, "right": ok}
                            for a, ok in [(a, True) for a in right[:1]] + [(a, False) for a in wrong[:2]]]
    out["refine_damage"] = round(damaged / calls, 4)
    out["by_frame"] = {kind: {frame: {"questions": len(v), "accuracy": round(sum(v) / len(v), 4)}
                              for frame, v in sorted(frames.items())} for kind, frames in by_frame.items()}
    if split == "heldout":  # "frame": no model saw the wording; "synonym": only the base LM knew the word
        out["by_family"] = {k: {"questions": len(v), "accuracy": round(sum(v) / len(v), 4)} for k, v in families.items()}
    return out


def summary(metrics: dict) -> dict:
    """The headline figures: accuracy per kind (final answers) and the refine damage rate."""
    return {**{k: v["accuracy"] for k, v in metrics["kinds"].items()}, "refine_damage": metrics["refine_damage"]}
