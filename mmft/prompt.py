"""The one prompt builder, used by training and inference alike.

The tokenizer's own chat template renders the conversation (Phi-3.5: `<|user|>\\n...<|end|>\\n
<|assistant|>\\n`). Sentinels mark where the image goes (start of the first user turn) and where
each answer goes; the rendered text is cut at them, so the projected image tokens are *spliced*
between the prompt's start text and its end text — no placeholder token in the vocabulary — and
labels cover exactly the answers (plus the end-of-turn token that teaches the model to stop).
Labels are *not* shifted here: the LM's loss shifts them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mmft.config import MMFTConfig
from mmft.text import clean_answer

IGNORE_INDEX = -100
_IMAGE = "\x00mmft-image\x00"
_ANSWER = "\x00mmft-answer-{}\x00"
_SENTINEL = re.compile("(\x00mmft-(?:image|answer-\\d+)\x00)")


@dataclass
class Encoded:
    """One tokenized conversation; image slots hold the pad id and are True in `image_mask`."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_mask: list[bool] = field(default_factory=list)
    truncated: bool = False  # a question or answer was cut to its token budget

    def add(self, ids: list[int], train: bool = False, image: bool = False):
        self.input_ids += ids
        self.labels += ids if train else [IGNORE_INDEX] * len(ids)
        self.image_mask += [image] * len(ids)


def _truncate(tokenizer, text: str, budget: int) -> tuple[str, bool]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text, False
    return tokenizer.decode(ids[:budget], skip_special_tokens=True), True


def encode_chat(
    tokenizer,
    config: MMFTConfig,
    turns: list[tuple[str, str]],
    num_image_tokens: int = 0,
    clean_answers: bool | None = None,
) -> Encoded:
    """Tokenize `turns` = [("user", q1), ("assistant", a1), ("user", q2), ...].

    Ending on a user turn gives an inference prompt (generation prompt appended); ending on an
    assistant turn gives a training example. The image (`num_image_tokens` slots) goes at the
    start of the first user turn. `clean_answers` defaults to `config.prompt_clean_answers`.
    """
    if not turns or turns[0][0] != "user":
        raise ValueError("a conversation must start with a user turn")
    clean = config.prompt_clean_answers if clean_answers is None else clean_answers
    messages, answers, truncated = [], [], False
    if config.prompt_system:
        messages.append({"role": "system", "content": config.prompt_system})
    for i, (role, text) in enumerate(turns):
        if role == "user":
            text, cut = _truncate(tokenizer, text.strip(), config.prompt_max_question_tokens)
            if i == 0 and num_image_tokens:
                text = _IMAGE + text
        elif role == "assistant":
            text = clean_answer(text) if clean else text.strip()
            text, cut = _truncate(tokenizer, text, config.prompt_max_answer_tokens)
            answers.append(text)
            text = _ANSWER.format(len(answers) - 1)
        else:
            raise ValueError(f"unknown role {role!r}; expected 'user' or 'assistant'")
        truncated |= cut
        messages.append({"role": role, "content": text})

    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=turns[-1][0] == "user"
    )
    if num_image_tokens and rendered.count(_IMAGE) != 1:
        raise ValueError("the tokenizer's chat template dropped the image position from the prompt")

    out = Encoded(truncated=truncated)
    eot = config.prompt_end_of_turn
    after_answer = False
    for piece in _SENTINEL.split(rendered):
        if piece == _IMAGE:
            out.add([tokenizer.pad_token_id] * num_image_tokens, image=True)
        elif piece.startswith("\x00mmft-answer-"):
            answer = answers[int(piece.split("-")[-1].rstrip("\x00"))]
            out.add(tokenizer(answer, add_special_tokens=False)["input_ids"], train=True)
            after_answer = True
        elif piece:
            if after_answer and eot and piece.startswith(eot):
                out.add(tokenizer(eot, add_special_tokens=False)["input_ids"], train=True)
                piece = piece[len(eot) :]
            out.add(tokenizer(piece, add_special_tokens=False)["input_ids"])
            after_answer = False
    return out


def refine_prompt(config: MMFTConfig, question: str, draft: str) -> str:
    """The user message the base model gets to rewrite a draft into clean language."""
    return config.pipe_refine_template.format(question=question.strip(), draft=draft.strip())
