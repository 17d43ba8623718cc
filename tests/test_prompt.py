"""The one prompt builder: same prompt for training and inference, labels only on answers."""

import pytest
from transformers import AutoTokenizer

from mmft.config import MMFTConfig
from mmft.prompt import IGNORE_INDEX, encode_chat, refine_prompt
from mmft.testing import PHI3_TOKENIZER_DIR


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir / "lm")


def test_the_kit_tokenizer_is_phi3s_on_all_46_reference_strings(tokenizer):
    """llama.cpp's reference tokenizations of the original Hugging Face Phi-3 tokenizer, vendored."""
    inp = (PHI3_TOKENIZER_DIR / "ggml-vocab-phi-3.gguf.inp").read_text(encoding="utf-8")
    out = (PHI3_TOKENIZER_DIR / "ggml-vocab-phi-3.gguf.out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")[:-1]
    expected = [[int(i) for i in line.split()] for line in out.split("\n")[:-1]]
    assert len(texts) == len(expected) == 46
    for text, ids in zip(texts, expected):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, repr(text)


def test_the_kit_tokenizer_has_phi3s_special_tokens_and_settings(tokenizer):
    assert len(tokenizer) == 32064
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 32000)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 32000)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 0)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")}
    assert ids == {"<|assistant|>": 32001, "<|system|>": 32006, "<|end|>": 32007, "<|user|>": 32010}
    assert tokenizer.padding_side == "left"  # as Phi-3.5-mini-instruct's tokenizer_config.json
    assert tokenizer("Hello world")["input_ids"] == [15043, 3186]  # no BOS added, as Phi-3.5's
    assert tokenizer("Hi")["input_ids"] == [6324]  # "▁Hi": a text alone gets the SentencePiece prefix space
    # ... but after a special token and a newline, "Hi" has none: [..., "▁", "<0x0A>", "Hi", ...]
    assert tokenizer("<|user|>\nHi<|end|>", add_special_tokens=False)["input_ids"] == [32010, 29871, 13, 18567, 32007]
    assert (PHI3_TOKENIZER_DIR / "chat_template.jinja").read_text() == tokenizer.chat_template


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
    assert infer.input_ids[: infer.image_mask.index(True)] == [32010, 29871, 13]  # "<|user|>", "▁", "\n"
    assert sum(infer.image_mask) == 50
    # the decoder shows SentencePiece's "▁" before a newline or a text start as a space
    assert tokenizer.decode(infer.input_ids).endswith(" " + question + "<|end|> \n<|assistant|> \n")


def test_labels_cover_every_assistant_turn_and_its_end_token(tokenizer):
    cfg = MMFTConfig(prompt_clean_answers=False)
    turns = [("user", "<image>\nColour?"), ("assistant", "Red."), ("user", "Shape?"), ("assistant", "A circle.")]
    enc = encode_chat(tokenizer, cfg, [(r, t.replace("<image>\n", "")) for r, t in turns], num_image_tokens=3)
    trained = [tok for tok, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Red.<|end|> A circle.<|end|>"  # "▁A": SentencePiece's space
    assert enc.image_mask.index(True) == 3  # "<|user|>", "▁", "\n", then the image: first user turn only
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
