"""Tiny, architecture-true stand-ins for CLIP ViT-B/32 and Phi-3.5-mini, built offline in seconds.

No weights can be downloaded here, so tests, benchmarks and the bundled shapes demo run on these:
a real `CLIPModel` (56 px images, 8 px patches -> 7x7 + CLS = 50 tokens, like ViT-B/32 at 224/32),
a real `Phi3ForCausalLM`, and a byte-level BPE tokenizer trained locally with `tokenizers` that
carries Phi-3.5's special tokens and chat template. Everything is written with `save_pretrained`
and read back through `from_pretrained(path)`, so the real loading code is what runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPModel, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from mmft.config import MMFTConfig

# Phi-3.5-mini-instruct's chat template, verbatim.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]

_CORPUS = [
    "What is the colour of the shape in the image? The shape is red.",
    "What shape is shown? It is a circle. It is a square. It is a triangle.",
    "Describe the image. A blue square on a light background. A green triangle. A yellow circle.",
    "Which colour? red green blue yellow purple orange. Which shape? circle square triangle.",
    "Question: Draft answer: Rewrite the draft answer as one clear sentence that answers the question.",
    "The picture shows a small purple triangle near the top left and an orange circle at the bottom.",
    "What is the man doing? He is riding a bike down the street next to a bus and a car.",
    "There are two people sitting at a table with food, plates, cups and a laptop in the room.",
]


def make_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with Phi-3.5's special tokens and template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator((corpus or []) + _CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
        chat_template=PHI3_CHAT_TEMPLATE,
        padding_side="right",
    )


def make_lm(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Phi3ForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_clip(hidden: int = 32, layers: int = 2, projection_dim: int = 16, seed: int = 0):
    """A tiny CLIP (56 px / 8 px patches -> 50 tokens) and its image processor."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=56, patch_size=8),
        projection_dim=projection_dim,
    )
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
    )
    return CLIPModel(config), processor


def build_tiny_models(folder: str | Path, mode: str = "patch", corpus: list[str] | None = None,
                      **config_overrides) -> MMFTConfig:
    """Write a tiny LM (+ tokenizer) and CLIP under `folder`; return an MMFTConfig naming them."""
    folder = Path(folder)
    tokenizer = make_tokenizer(corpus)
    lm = make_lm(tokenizer)
    lm.save_pretrained(folder / "lm")
    tokenizer.save_pretrained(folder / "lm")
    clip, processor = make_clip()
    clip.save_pretrained(folder / "clip")
    processor.save_pretrained(folder / "clip")
    defaults = dict(lora_r=8, lora_alpha=16, lora_dropout=0.0, gen_max_new_tokens=16,
                    prompt_max_question_tokens=64, prompt_max_answer_tokens=64)
    defaults.update(config_overrides)
    return MMFTConfig(lm_model_id=str(folder / "lm"), vit_model_id=str(folder / "clip"),
                      vit_feature_mode=mode, **defaults)
