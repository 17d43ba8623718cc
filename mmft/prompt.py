"""The one prompt builder, used by training and inference alike.

The tokenizer's own chat template renders the conversation (Phi-3.5: `<|user|>\\n...<|end|>\\n
<|assistant|>\\n`) and the whole rendering is tokenized once, exactly as `apply_chat_template(...,
tokenize=True)` does, so training and inference see the ids the chat format really has: an answer
in context is `["▁", "<0x0A>", "He", "▁is", ...]`, not the `["▁He", "▁is", ...]` it gets alone.
Sentinels in the rendered text mark where each answer and the image go; character offsets
(`return_offsets_mapping`) map them to tokens. Labels cover exactly the answers' tokens plus the
end-of-turn token that teaches the model to stop; the image gets slots (pad id, `image_mask`) that the
model fills with projected image tokens — no placeholder token in the vocabulary.
Labels are *not* shifted here: the LM's loss shifts them.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from mmft.config import MMFTConfig
from mmft.text import clean_answer

IGNORE_INDEX = -100
# LLaVA's image placeholder is never text: LLaVA-Instruct marks the image with it, and an exported Llava
# processor reads it as the image token, so every message loses it, in training, inference and the export.
IMAGE_TEXT = "<image>"


def control_texts(tokenizer) -> list[str]:
    """`<image>` and the text of every token the tokenizer matches in raw text (its added tokens: Phi-3.5's
    `<|end|>`, `<|assistant|>`, `<s>`, and `</s>`, which it does not mark special), longest first; an added
    token of whitespace alone (some tokenizers have them) is layout, not control, and stays."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.content.strip()}
    return sorted(added | {IMAGE_TEXT}, key=lambda c: (-len(c), c))


def strip_control_text(tokenizer, text: str, removed: list[str] | None = None) -> str:
    """`text` without any `control_texts`, removed until none is left (`<im<image>age>`); each one removed is
    added to `removed`, once. Typed into a message, they would be the real control tokens: a visitor could
    end the turn and write the model's. `apply_chat_template` does not do this; the prompt builder does it
    to every message."""
    controls = control_texts(tokenizer)
    while True:
        before = text
        for control in controls:
            if control in text:
                text = text.replace(control, "")
                if removed is not None and control not in removed:
                    removed.append(control)
        if text == before:  # each pass that changes anything shortens the text: this ends
            return text


INVISIBLE = ("Cc", "Cf", "Zs", "Zl", "Zp")  # Unicode control, format (zero-width) and space characters


def blank(text: str) -> bool:
    """Nothing a reader would see: empty, spaces, NULs, zero-width characters. A question of these is no
    question (the app and the pipeline refuse it)."""
    return not any(unicodedata.category(ch) not in INVISIBLE for ch in text)


@dataclass
class Encoded:
    """One tokenized conversation; image slots hold the pad id and are True in `image_mask`."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_mask: list[bool] = field(default_factory=list)
    truncated: bool = False  # a question or answer was cut to its token budget


def _truncate(tokenizer, text: str, budget: int, whole_words: bool = False) -> tuple[str, bool]:
    """Cut `text` before its (budget+1)-th token (counted alone), on a character boundary; with
    `whole_words` (answers: the model learns them) back to the last whitespace before a cut word."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= budget:
        return text, False
    cut = enc["offset_mapping"][budget][0]
    if whole_words and not text[cut].isspace() and not text[cut - 1].isspace():
        space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
        cut = space if space > 0 else cut  # one long word: cut inside it, as before
    return text[:cut].rstrip(), True


def _free_tag(texts: list[str]) -> str:
    """A sentinel prefix that occurs in none of `texts` (NULs or sentinel look-alikes in user text)."""
    n = 0
    while any(f"\x00mmft{n}:" in t for t in texts):
        n += 1
    return f"\x00mmft{n}:"


def encode_chat(
    tokenizer,
    config: MMFTConfig,
    turns: list[tuple[str, str]],
    num_image_tokens: int = 0,
    clean_answers: bool | None = None,
    budget_questions: bool = True,
) -> Encoded:
    """Tokenize `turns` = [("user", q1), ("assistant", a1), ("user", q2), ...].

    Ending on a user turn gives an inference prompt (generation prompt appended); ending on an
    assistant turn gives a training example (the template's closing eos included). Questions are
    stripped and cut to `prompt_max_question_tokens` (unless `budget_questions=False`: a message
    already budgeted, like `refine_prompt(..., tokenizer)`'s) and lose any control-token text
    (`strip_control_text`: `<image>`, `<|end|>`...), as answers do; answers are cleaned (`clean_answers`,
    default `config.prompt_clean_answers`) or stripped, and cut to `prompt_max_answer_tokens`.

    The ids are exactly `tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]` of those
    messages (with `config.prompt_system` first, if set). The image: `num_image_tokens` slots are
    inserted before the whitespace that leads the first user message — for Phi-3.5 right after
    `<|user|>`, before its `▁`, `<0x0A>` — so every other id is the plain chat's (the question's first
    word has no `▁`), and it is where an exported Llava model's `<|user|><image>\n` puts the image.
    Labels are the ids of each answer's tokens *in context* (tokens starting inside the answer's
    characters) and of the end-of-turn tokens right after it, unless the answer was cut to its budget
    (the model must not learn to stop mid-sentence); -100 everywhere else.
    """
    if not turns or turns[0][0] != "user":
        raise ValueError("a conversation must start with a user turn")
    clean = config.prompt_clean_answers if clean_answers is None else clean_answers
    contents, truncated, cut_answers = [], False, set()
    for i, (role, text) in enumerate(turns):
        text = strip_control_text(tokenizer, text)
        if role == "user":
            text, cut = text.strip(), False
            if budget_questions:
                text, cut = _truncate(tokenizer, text, config.prompt_max_question_tokens)
        elif role == "assistant":
            text = clean_answer(text) if clean else text.strip()
            text, cut = _truncate(tokenizer, text, config.prompt_max_answer_tokens, whole_words=True)
            if cut:
                cut_answers.add(i)
        else:
            raise ValueError(f"unknown role {role!r}; expected 'user' or 'assistant'")
        truncated |= cut
        contents.append(text)

    # Render with sentinels in place of the answers and before the first question.
    tag = _free_tag(contents + [config.prompt_system])
    image_key = f"{tag}image\x00"
    answers: dict[str, str] = {}
    cut_keys: set[str] = set()  # answers cut to their budget: taught without the end of turn
    messages = [{"role": "system", "content": config.prompt_system}] if config.prompt_system else []
    for i, ((role, _), text) in enumerate(zip(turns, contents)):
        if role == "assistant":
            key = f"{tag}answer{i}\x00"
            answers[key], text = text, key
            if i in cut_answers:
                cut_keys.add(key)
        elif i == 0 and num_image_tokens:
            text = image_key + text
        messages.append({"role": role, "content": text})
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=turns[-1][0] == "user"
    )
    for key in list(answers) + ([image_key] if num_image_tokens else []):
        if rendered.count(key) != 1:
            raise ValueError("the tokenizer's chat template must render each message once, unchanged; "
                             f"it rendered {rendered.count(key)} copies of one")

    # Put the contents back, noting the answers' and the image's character offsets.
    text, spans, image_at = "", [], None
    for piece in re.split(f"({re.escape(tag)}[a-z0-9]+\x00)", rendered):
        if piece == image_key:
            image_at = len(text)
        elif piece in answers:
            spans.append((len(text), len(text) + len(answers[piece]), piece not in cut_keys))
            text += answers[piece]
        else:
            text += piece

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    eot = config.prompt_end_of_turn
    for start, end, whole in spans:
        if eot and whole and text.startswith(eot, end):  # a cut answer must not teach stopping mid-sentence
            end += len(eot)
        for k, (s, _) in enumerate(offsets):
            if start <= s < end:
                labels[k] = ids[k]

    out = Encoded(input_ids=ids, labels=labels, image_mask=[False] * len(ids), truncated=truncated)
    if image_at is not None:
        # The image goes before the whitespace that separates the user tag from the message: right
        # after `<|user|>`, so the text after it is `\n{question}` exactly as in the plain chat, and a
        # Llava processor rendering `<|user|><image>\n{question}` tokenizes it the same way (text
        # right after a special token gets a `▁` prefix: `\n` has one here either way).
        image_at = len(text[:image_at].rstrip())
        at = next((k for k, (s, _) in enumerate(offsets) if s >= image_at), len(ids))
        if any(e > image_at for _, e in offsets[:at]):
            raise ValueError("the tokenizer merges the user tag with the text after it; expected a token "
                             "boundary where the first user message (and its leading whitespace) starts")
        n = num_image_tokens
        out.input_ids = ids[:at] + [tokenizer.pad_token_id] * n + ids[at:]
        out.labels = labels[:at] + [IGNORE_INDEX] * n + labels[at:]
        out.image_mask = [False] * at + [True] * n + [False] * (len(ids) - at)
    return out


def refine_prompt(config: MMFTConfig, question: str, draft: str, tokenizer=None) -> str:
    """The user message the base model gets to rewrite a draft into clean language.

    With `tokenizer`, only the question is cut to `prompt_max_question_tokens`, so the draft and the
    instruction stay whole; encode the result with `encode_chat(..., budget_questions=False)`.
    """
    if tokenizer is not None:  # cut what the model will read, as `encode_chat` cuts the draft's question
        question, _ = _truncate(tokenizer, strip_control_text(tokenizer, question).strip(),
                                config.prompt_max_question_tokens)
    question = question.strip()
    return config.pipe_refine_template.format(question=question, draft=draft.strip())
