"""The one prompt builder: same prompt for training and inference, labels only on answers."""

import pytest
from transformers import AutoTokenizer

from mmft.config import MMFTConfig
from mmft.prompt import IGNORE_INDEX, encode_chat, refine_prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir / "lm")


def test_training_prompt_starts_with_the_inference_prompt(tokenizer):
    cfg = MMFTConfig()
    question = "What colour is the shape in the picture?"
    train = encode_chat(tokenizer, cfg, [("user", question), ("assistant", "It is red.")], num_image_tokens=50)
    infer = encode_chat(tokenizer, cfg, [("user", question)], num_image_tokens=50)
    n = len(infer.input_ids)
    assert train.input_ids[:n] == infer.input_ids
    assert train.image_mask[:n] == infer.image_mask
    assert all(label == IGNORE_INDEX for label in train.labels[:n])
    # the image sits between the start text and the question, and is 50 slots long
    text = tokenizer.decode(infer.input_ids[: infer.image_mask.index(True)])
    assert text == "<|user|>\n"
    assert sum(infer.image_mask) == 50
    assert tokenizer.decode(infer.input_ids).endswith(question + "<|end|>\n<|assistant|>\n")


def test_labels_cover_every_assistant_turn_and_its_end_token(tokenizer):
    cfg = MMFTConfig(prompt_clean_answers=False)
    turns = [("user", "<image>\nColour?"), ("assistant", "Red."), ("user", "Shape?"), ("assistant", "A circle.")]
    enc = encode_chat(tokenizer, cfg, [(r, t.replace("<image>\n", "")) for r, t in turns], num_image_tokens=3)
    trained = [tok for tok, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Red.<|end|>A circle.<|end|>"
    assert enc.image_mask.index(True) == 2  # "<|user|>", "\n", then the image: first user turn only
    assert sum(enc.image_mask) == 3


def test_answers_are_cleaned_by_default_and_not_when_switched_off(tokenizer):
    turns = [("user", "What is it?"), ("assistant", "The shape is a red circle.")]
    on = encode_chat(tokenizer, MMFTConfig(), turns)
    off = encode_chat(tokenizer, MMFTConfig(prompt_clean_answers=False), turns)
    decode = lambda e: tokenizer.decode([t for t, l in zip(e.input_ids, e.labels) if l != IGNORE_INDEX])
    assert decode(on) == "shape red circle<|end|>"
    assert decode(off) == "The shape is a red circle.<|end|>"


def test_long_questions_are_truncated_to_the_budget(tokenizer):
    cfg = MMFTConfig(prompt_max_question_tokens=8)
    enc = encode_chat(tokenizer, cfg, [("user", "red " * 500)])
    assert enc.truncated
    assert len(enc.input_ids) < 30


def test_bad_conversations_are_refused(tokenizer):
    with pytest.raises(ValueError, match="start with a user turn"):
        encode_chat(tokenizer, MMFTConfig(), [("assistant", "hi")])
    with pytest.raises(ValueError, match="unknown role"):
        encode_chat(tokenizer, MMFTConfig(), [("user", "a"), ("robot", "b")])


def test_refine_prompt_contains_question_and_draft():
    text = refine_prompt(MMFTConfig(), " What colour? ", "red circle ")
    assert "What colour?" in text and "red circle" in text
