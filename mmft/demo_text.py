"""The tiny base LM's language: the text pre-training that stands in for Phi-3.5's.

The shapes demo's LM must know, before any image, how to rewrite an imperfect draft into a sentence
(the refine stage's job), how to read "It is orange. Is it red?", and the words people use (every
synonym of the `text` phrasing family, `mmft.questions`). `refine_corpus` writes those conversations,
`pretrain_text` trains the LM on them, and `share_word_forms` gives every unseen form of a known word
(line-initial `Color` for `▁color`) a known form's input embedding. Demo-only, like `mmft.demo`.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from mmft import questions, shapes
from mmft.config import MMFTConfig
from mmft.data import pad_batch
from mmft.prompt import encode_chat, refine_prompt
from mmft.text import clean_answer

TEXT_QA = [
    ("What colours can a shape have?", "A shape can be red, green, blue, yellow, purple or orange."),
    ("Which shapes do you know?", "I know circles, squares and triangles."),
    ("Hello", "Hello! Show me a picture of a shape and ask about its colour or shape."),
    ("What can you do?", "I can tell the colour and the shape in a picture."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides."),
    ("Is a circle round?", "Yes, a circle is round."),
    ("Does a circle have corners?", "No, a circle has no corners."),
]
# Yes/no drafts are the refine stage's hard case: the value after the yes/no word is the answer, the
# echo before it ("Red No blue") must go, although it is the one the question names.
REFINE_KINDS = {"color": 0.15, "shape": 0.15, "describe": 0.15, "yesno": 0.4, "choice": 0.15}
FILLERS = ("shape", "object", "it", "is", "the", "colour", "color", "image", "answer", "a", "picture", "this")


def noisy_draft(lead: list[str], values: list[str], rng: random.Random) -> str:
    """A draft as an imperfect LoRA model might write it: `lead` (a yes/no answer's echo and yes/no
    word, as cleaning leaves them: "Red No") then the content values, re-cased, repeated, with extra
    words or stray punctuation; without a lead the values may come shuffled (with one, order is
    meaning: the value after the yes/no word is the one seen)."""
    values = list(values)
    if not lead and rng.random() < 0.3:
        rng.shuffle(values)
    words = list(lead) + values
    for _ in range(rng.choice([0, 0, 1, 2])):
        words.insert(rng.randrange(len(lead), len(words) + 1), rng.choice(FILLERS))
    if words and rng.random() < 0.25:
        i = rng.randrange(len(words))
        words.insert(i, words[i])  # "red red circle", "No No blue"
    cased = []
    for w in words:
        r = rng.random()
        cased.append(w.capitalize() if r < 0.1 else w.lower() if r < 0.2 else w.upper() if r < 0.25 else w)
    text = " ".join(cased)
    return text + rng.choice(["", "", "", ".", ",", " ."]) if text else text


def refine_corpus(cfg: MMFTConfig, n: int, seed: int) -> list[list[tuple[str, str]]]:
    """Conversations that teach the tiny base LM its language: rewriting drafts, and plain Q&A.

    Questions come from the `text` phrasing family (training frames, every synonym). The target
    sentence is `questions.render` of the draft's content words, whatever the question and however
    messy the draft: the refine stage must keep the draft's content, never invent."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.08:
            question, reply = rng.choice(TEXT_QA)
            out.append([("user", question), ("assistant", reply)])
            continue
        color, shape = shapes.sample(rng)
        if r < 0.3:  # reading comprehension: the skills a draft needs, learnt from text
            question, facts = questions.ask(rng.choice(("yesno", "yesno", "choice", "color", "shape")), color, shape,
                                            rng, "text")
            seen = questions.render(None, color, shape) if rng.random() < 0.5 else f"I see {questions.article(color + ' ' + shape)}."
            reply = questions.answer(facts)
            out.append([("user", f"{seen} {question}"), ("assistant", clean_answer(reply) if rng.random() < 0.5 else reply)])
            continue
        kind = rng.choices(list(REFINE_KINDS), weights=list(REFINE_KINDS.values()))[0]
        question, facts = questions.ask(kind, color, shape, rng, "text")
        content = dict(polarity=None, color=None, shape=None)
        content[facts["attr"] if kind != "describe" else "color"] = facts["truth"] if kind != "describe" else color
        if kind == "describe":
            content["shape"] = shape
        lead = []
        if kind == "yesno":  # the words the LoRA model is trained to write: "Red No blue" -> lead "Red No"
            content["polarity"] = facts["polarity"]
            lead = clean_answer(questions.answer(facts)).split()[:2]
            lead = lead if rng.random() < 0.8 else lead[1:]
        r = rng.random()
        if r < 0.12:  # a draft that does not match the question's kind: keep what it says
            content = dict(polarity=rng.choice([None, None, "yes", "no"]), color=rng.choice([None, color]),
                           shape=rng.choice([None, shape]))
            lead = [content["polarity"]] if content["polarity"] else []
        elif r < 0.15:
            content["polarity"], lead = "not", ["not"]
        values = [v for v in (content["color"], content["shape"]) if v]
        draft = noisy_draft(lead, values, rng)
        out.append([("user", refine_prompt(cfg, question, draft)), ("assistant", questions.render(**content))])
    return out


def fit(model: torch.nn.Module, steps: int, lr: float, loss_of_batch) -> list[float]:
    """The demo's pre-training loop: AdamW, a one-cycle schedule, gradients clipped at 1.0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in range(steps):
        loss = loss_of_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def pretrain_text(lm_dir: str | Path, cfg: MMFTConfig, conversations: list, steps: int, lr: float = 3e-3,
                  batch_size: int = 32, seed: int = 0, save_dtype: torch.dtype = torch.float16) -> list[float]:
    """Full fine-tuning of the tiny base LM on text conversations, saved back to `lm_dir`.

    Answers are not cleaned here: this is how the base model should talk. The loss is computed on
    answer positions only (the LM head over 32k ids on every prompt token would be most of the cost).
    Saved in `save_dtype`, so the LoRA round trains on exactly the weights that are shipped."""
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).train()
    examples = [vars(encode_chat(tokenizer, cfg, c, clean_answers=False)) for c in conversations]
    rng = random.Random(seed)

    def loss_of_batch() -> torch.Tensor:
        batch = pad_batch(rng.sample(examples, batch_size), tokenizer.pad_token_id)
        hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]  # [B, T-1]: position t predicts token t+1
        keep = targets != -100
        return F.cross_entropy(lm.lm_head(hidden[:, :-1][keep]), targets[keep])  # [N, V] vs [N]

    losses = fit(lm, steps, lr, loss_of_batch)
    share_word_forms(lm, tokenizer, Counter(i for e in examples for i in e["input_ids"]))
    lm.to(save_dtype).save_pretrained(lm_dir)
    return losses


def share_word_forms(lm, tokenizer, seen: Counter) -> int:
    """Give every form of a word the text never had the input embedding of a form it had; returns how many.

    Phi-3's tokenizer writes a line's first word without the space mark, and in its own case: after the
    image prompt's "\n", "Color?" is `Color`, where the text had `▁color`. The real Phi-3.5 saw every
    form in pre-training; the tiny LM sees a few hundred ids, and an unseen form reaches the model as
    its random initial vector (docs/training.md, "Why one word fails"). So each unseen form (same
    letters, any case, with or without `▁`) takes the embedding of a seen one: the same spelling with
    `▁`, else the lower-case or capitalised one, else the commonest (`seen`: how often the text had each
    id). Only the *input* embeddings: the LM is untied first (as Phi-3.5 is), so what it writes is
    unchanged."""
    forms: dict[str, list[tuple[str, int]]] = {}
    for piece, i in tokenizer.get_vocab().items():
        word = piece.replace("\u2581", "")
        if i < lm.config.vocab_size and word.isalpha():
            forms.setdefault(word.lower(), []).append((piece, i))
    out_weight = lm.get_output_embeddings().weight.detach().clone()  # [V, D]
    table = lm.get_input_embeddings().weight.detach().clone()  # [V, D]
    shared = 0
    for members in forms.values():
        known = {piece: i for piece, i in members if seen[i]}
        if not known:
            continue
        for piece, i in members:
            if seen[i]:
                continue
            word = piece.replace("\u2581", "")
            order = ["\u2581" + word, word, "\u2581" + word.lower(), word.lower(), "\u2581" + word.capitalize(),
                     word.capitalize(), max(known, key=lambda p: (seen[known[p]], p))]
            table[i] = table[known[next(p for p in order if p in known)]]
            shared += 1
    lm.config.tie_word_embeddings = False
    lm.get_output_embeddings().weight = torch.nn.Parameter(out_weight)
    lm.get_input_embeddings().weight = torch.nn.Parameter(table)
    return shared
