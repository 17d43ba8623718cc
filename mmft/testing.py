"""Tiny, architecture-true stand-ins for CLIP ViT-B/32 and Phi-3.5-mini, built offline in seconds.

No weights can be downloaded here, so tests, benchmarks and the bundled shapes demo run on these:
a real `CLIPModel` (56 px images, 8 px patches -> 7x7 + CLS = 50 tokens, like ViT-B/32 at 224/32),
a real `Phi3ForCausalLM` (Phi-3.5's 32,064-id vocabulary, everything else tiny), and the *real*
Phi-3.5 tokenizer + chat template, vendored in `mmft/assets/phi3-tokenizer/` (see PROVENANCE.md
there). Everything is written with `save_pretrained` and read back through `from_pretrained(path)`,
so the real loading code is what runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

PHI3_TOKENIZER_DIR = Path(__file__).parent / "assets" / "phi3-tokenizer"
TOKENIZER_SOURCES = ("ggml-vocab-phi-3.gguf", "ggml-vocab-phi-3.gguf.inp", "ggml-vocab-phi-3.gguf.out",
                     "microsoft-Phi-3.5-mini-instruct.jinja")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmft.testing",
                                     description="Regenerate the vendored Phi-3.5 tokenizer from llama.cpp's "
                                                 "vocab-only GGUF (mmft/assets/phi3-tokenizer/PROVENANCE.md).")
    parser.add_argument("source", type=Path, help=f"folder holding {', '.join(TOKENIZER_SOURCES)}")
    parser.add_argument("out", type=Path, nargs="?", default=PHI3_TOKENIZER_DIR, help="default: the vendored folder")
    return parser


if __name__ == "__main__":  # flags before torch: --help and a wrong folder answer at once
    ARGS = build_parser().parse_args()
    if not ARGS.source.is_dir() or any(not (ARGS.source / n).is_file() for n in TOKENIZER_SOURCES):
        build_parser().error(f"{ARGS.source} must hold {', '.join(TOKENIZER_SOURCES)}")
    if importlib.util.find_spec("gguf") is None:
        build_parser().error("reading the GGUF needs the gguf package: pip install gguf")

import torch  # noqa: E402
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, Phi3Config, Phi3ForCausalLM  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from mmft.config import MMFTConfig  # noqa: E402

PHI3_VOCAB_SIZE = 32064  # rows of Phi-3.5-mini's embedding matrix = the tokenizer's ids


def make_tokenizer():
    """The real Phi-3.5-mini tokenizer (32,064 ids, chat template), from the vendored files."""
    return AutoTokenizer.from_pretrained(PHI3_TOKENIZER_DIR)


def convert_phi3_tokenizer(source: str | Path, out: str | Path = PHI3_TOKENIZER_DIR) -> None:
    """Regenerate the vendored tokenizer from llama.cpp's vocab-only GGUF (needs `pip install gguf`).

    `python -m mmft.testing SOURCE_DIR` with SOURCE_DIR holding `ggml-vocab-phi-3.gguf`, its `.inp`/
    `.out` reference tokenizations and `microsoft-Phi-3.5-mini-instruct.jinja`. Only this conversion
    reads GGUF; the result is a plain `tokenizer.json` folder. Settings as in Phi-3.5-mini-instruct's
    tokenizer_config.json: no BOS added, left padding, 131,072-token context.
    """
    import shutil

    source, out = Path(source), Path(out)
    tok = AutoTokenizer.from_pretrained(source, gguf_file="ggml-vocab-phi-3.gguf", padding_side="left",
                                        model_max_length=131072)
    tok.add_bos_token = False  # the setter rewrites the post-processor (the kwarg alone does not)
    tok.chat_template = (source / "microsoft-Phi-3.5-mini-instruct.jinja").read_text()
    tok.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):  # about this load, not about the tokenizer
        config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("ggml-vocab-phi-3.gguf.inp", "ggml-vocab-phi-3.gguf.out"):
        shutil.copyfile(source / name, out / name)


def make_lm(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Phi3ForCausalLM:
    """A tiny Phi-3 with Phi-3.5's vocabulary size, so every id the tokenizer makes has a row."""
    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=max(PHI3_VOCAB_SIZE, len(tokenizer)),
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


def build_tiny_models(folder: str | Path, mode: str = "patch", **config_overrides) -> MMFTConfig:
    """Write a tiny LM (+ the real tokenizer) and CLIP under `folder`; return an MMFTConfig naming them."""
    folder = Path(folder)
    tokenizer = make_tokenizer()
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


if __name__ == "__main__":
    convert_phi3_tokenizer(ARGS.source, ARGS.out)
    print(f"wrote {ARGS.out}")
