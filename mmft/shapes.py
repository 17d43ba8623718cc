"""The shapes world: a synthetic data set that proves the model *learns*, and the offline demo.

Each image is one shape (circle, square, triangle) in one of six colours, of random size and
position on a plain light background. Conversations ask for the colour, the shape or both, in
several phrasings, in the LLaVA-Instruct JSON format, so they go through the real data path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from mmft.config import MMFTConfig
from mmft.prompt import refine_prompt
from mmft.text import clean_answer

COLORS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 200, 20),
          "purple": (135, 55, 175), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {
    "color": ["What colour is the shape?", "What color is the object in the picture?", "Which colour is it?",
              "Tell me the colour of the shape."],
    "shape": ["What shape is this?", "Which shape is shown?", "What kind of shape is in the image?",
              "Name the shape in the picture."],
    "both": ["Describe the image.", "What do you see?", "What is in the picture?"],
}
ANSWERS = {"color": "The shape is {color}.", "shape": "It is a {shape}.",
           "both": "A {color} {shape} on a light background."}
REFINED = {"color": "The shape is {color}.", "shape": "It is a {shape}.", "both": "It is a {color} {shape}."}
TEXT_QA = [
    ("What colours can a shape have?", "A shape can be red, green, blue, yellow, purple or orange."),
    ("Which shapes do you know?", "I know circles, squares and triangles."),
    ("Hello", "Hello! Show me a picture of a shape and ask about its colour or shape."),
    ("What can you do?", "I can tell the colour and the shape in a picture."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides."),
    ("Is a circle round?", "Yes, a circle is round."),
]


def draw(color: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One shape on a light background; size 35-80 % of the image, anywhere it fits."""
    shade = rng.randint(225, 250)
    image = Image.new("RGB", (size, size), (shade, shade, rng.randint(215, 250)))
    side = int(size * rng.uniform(0.35, 0.8))
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    pen = ImageDraw.Draw(image)
    fill = COLORS[color]
    if shape == "circle":
        pen.ellipse([x, y, x + side, y + side], fill=fill)
    elif shape == "square":
        pen.rectangle([x, y, x + side, y + side], fill=fill)
    else:
        pen.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return image


def sample(rng: random.Random) -> tuple[str, str]:
    return rng.choice(list(COLORS)), rng.choice(SHAPES)


def conversation(color: str, shape: str, rng: random.Random) -> list[dict]:
    """One or two LLaVA turns about the image; the image marker goes in the first human turn."""
    kinds = rng.sample(list(QUESTIONS), k=rng.choice([1, 1, 2]))
    turns = []
    for i, kind in enumerate(kinds):
        question = rng.choice(QUESTIONS[kind])
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        turns.append({"from": "gpt", "value": ANSWERS[kind].format(color=color, shape=shape)})
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
        draw(color, shape, rng).save(folder / "images" / file)
        records.append({"id": f"{name}-{i}", "image": file, "conversations": conversation(color, shape, rng)})
    path = folder / f"{name}.json"
    path.write_text(json.dumps(records))
    return path


def text_corpus(cfg: MMFTConfig, n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Conversations that teach the tiny base LM its language: refining drafts, and plain Q&A.

    Drafts look like what the LoRA model learns to say (cleaned answers), sometimes with a
    repeated or extra word, so the refine stage copes with imperfect drafts.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.15:
            question, answer = rng.choice(TEXT_QA)
            out.append([("user", question), ("assistant", answer)])
            continue
        color, shape = sample(rng)
        kind = rng.choice(list(QUESTIONS))
        draft = clean_answer(ANSWERS[kind].format(color=color, shape=shape))
        words = draft.split()
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(words))
        if rng.random() < 0.2:
            words[0] = words[0].capitalize()
        question = rng.choice(QUESTIONS[kind])
        out.append([("user", refine_prompt(cfg, question, " ".join(words))),
                    ("assistant", REFINED[kind].format(color=color, shape=shape))])
    return out


def corpus_sentences(cfg: MMFTConfig) -> list[str]:
    """Text for training the tiny tokenizer, so shapes words are whole tokens."""
    texts = [q for qs in QUESTIONS.values() for q in qs] + [t for qa in TEXT_QA for t in qa]
    for color in COLORS:
        for shape in SHAPES:
            answers = [a.format(color=color, shape=shape) for a in ANSWERS.values()]
            texts += answers + [a.format(color=color, shape=shape) for a in REFINED.values()]
            texts += [clean_answer(a) for a in answers]  # drafts start a line: "square", not " square"
            texts.append(refine_prompt(cfg, "What colour is the shape?", f"{color} {shape}"))
    return texts * 3


def score(text: str, truth: str, vocabulary) -> bool:
    """Right when the answer names the true word and no other word of the same kind."""
    words = set(text.lower().replace(".", " ").replace(",", " ").split())
    return truth in words and not (words & (set(vocabulary) - {truth}))


def evaluate(pipeline, n: int = 60, seed: int = 10_000, batch_size: int = 32) -> dict:
    """Fresh held-out images through the full staged pipeline (draft + refine)."""
    rng = random.Random(seed)
    truths = [sample(rng) for _ in range(n)]
    images = [draw(color, shape, rng) for color, shape in truths]
    color_q = [rng.choice(QUESTIONS["color"]) for _ in truths]
    shape_q = [rng.choice(QUESTIONS["shape"]) for _ in truths]
    color_a = pipeline.answer_images(images, color_q, batch_size=batch_size)
    shape_a = pipeline.answer_images(images, shape_q, batch_size=batch_size)
    return {
        "color_accuracy": round(sum(score(a.final, c, COLORS) for a, (c, _) in zip(color_a, truths)) / n, 4),
        "shape_accuracy": round(sum(score(a.final, s, SHAPES) for a, (_, s) in zip(shape_a, truths)) / n, 4),
        "n": n,
        "examples": [{"question": a.question, "draft": a.draft, "answer": a.final} for a in color_a[:2] + shape_a[:2]],
    }
