"""llama.cpp check of the Llava export: convert a tiny exported round with llama.cpp's own converters
and compare llama.cpp's greedy tokens with transformers' on the same prompt.

    python -m bench.llama_cpp_export --llama-cpp PATH/TO/llama.cpp [--work DIR] [--vocab-gguf FILE]

Needs: a built llama.cpp (`build/bin/llama-mtmd-cli`; its converters bring their own `gguf-py`),
`sentencepiece` + `protobuf` (the Phi-3 converter reads `tokenizer.model`, written here from
llama.cpp's vocab-only `models/ggml-vocab-phi-3.gguf`). Not in the default test run: it needs a
llama.cpp build.

What it does, on a tiny round with Phi-3's real 32,064-id vocabulary (the kit's tokenizer) (LoRA + projector random,
lm_head scaled so greedy choices have clear margins):
1. `python -m mmft.export ROUND OUT --text-model TEXT` (the Llava folder + the merged LM alone)
2. text half:   convert_hf_to_gguf.py TEXT --outfile text.gguf --outtype f32; llama-completion vs
   transformers' Phi3ForCausalLM, greedy, on the same prompt
3. vision half: convert_hf_to_gguf.py OUT --mmproj (recorded: does it take a CLIP Llava?), then the
   LLaVA-1.5 route llama.cpp documents (tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py
   on the vision tower + projector); llama-mtmd-cli vs transformers' Llava for the feature choices
   (-1, "full"), (-1, "default"), (-2, "default")
Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import POSITIVE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, default=Path("/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp"))
    parser.add_argument("--work", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--tokens", type=POSITIVE, default=8)
    parser.add_argument("--vocab-gguf", type=Path, help="Phi-3 vocab GGUF (default: LLAMA_CPP/models/ggml-vocab-phi-3.gguf)")
    return parser


if __name__ == "__main__":  # flags before torch: --help and a mistyped flag answer at once
    build_parser().parse_args()

import torch  # noqa: E402

QUESTION = "What colour is the shape?"
VARIANTS = [(-1, "full"), (-1, "default"), (-2, "default")]


def sh(cmd: list[str], env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)


def write_sentencepiece(vocab_gguf: Path, out: Path, gguf_py: Path) -> None:
    """tokenizer.model (SentencePiece protobuf) with the GGUF's pieces, scores and types."""
    sys.path.insert(0, str(gguf_py))
    import gguf  # llama.cpp's own reader
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = gguf.GGUFReader(str(vocab_gguf))
    field = lambda name: reader.fields[name]  # noqa: E731
    tokens = [bytes(field("tokenizer.ggml.tokens").parts[i]).decode() for i in field("tokenizer.ggml.tokens").data]
    scores = [float(field("tokenizer.ggml.scores").parts[i][0]) for i in field("tokenizer.ggml.scores").data]
    types = [int(field("tokenizer.ggml.token_type").parts[i][0]) for i in field("tokenizer.ggml.token_type").data]
    # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
    sp_type = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
               3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
               5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.byte_fallback = True
    model.normalizer_spec.add_dummy_prefix = True
    for text, score, kind in zip(tokens[:32000], scores, types):  # the base SentencePiece vocab
        model.pieces.add(piece=text, score=score, type=sp_type.get(kind, pb.ModelProto.SentencePiece.NORMAL))
    out.write_bytes(model.SerializeToString())


def build_round(work: Path) -> Path:
    from mmft.config import MMFTConfig
    from mmft.loading import build_model
    from mmft.testing import make_clip, make_lm, make_tokenizer

    tok = make_tokenizer()  # the real Phi-3 tokenizer (32,064 ids) and Phi-3.5 chat template
    tok.save_pretrained(work / "lm")
    lm = make_lm(tok)
    with torch.no_grad():
        lm.lm_head.weight.mul_(30.0)  # clear greedy margins: a conversion check, not a language model
    lm.save_pretrained(work / "lm")
    clip, processor = make_clip()
    with torch.no_grad():  # llama.cpp stores the patch convolution in f16 whatever --use-f32 says: start there
        conv = clip.vision_model.embeddings.patch_embedding.weight
        conv.copy_(conv.half().float())
    clip.save_pretrained(work / "clip")
    processor.save_pretrained(work / "clip")
    cfg = MMFTConfig(lm_model_id=str(work / "lm"), vit_model_id=str(work / "clip"), vit_feature_mode="patch",
                     lora_r=8, lora_alpha=16, lora_dropout=0.0, gen_max_new_tokens=8)
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu", dtype=torch.float32, trainable=True)
    with torch.no_grad():
        for name, param in model.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.save_pretrained(work / "round", {"round": 1})


def llava_variant(export: Path, dest: Path, layer: int, strategy: str) -> Path:
    """The export with another feature choice written in (what a round trained with it exports as)."""
    shutil.copytree(export, dest)
    config = json.loads((dest / "config.json").read_text())
    n_patches = (config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]) ** 2
    config.update(vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                  image_seq_length=n_patches + (strategy == "full"))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    proc = json.loads((dest / "processor_config.json").read_text())
    proc["vision_feature_select_strategy"] = strategy
    (dest / "processor_config.json").write_text(json.dumps(proc, indent=2))
    return dest


def transformers_answer(folder: Path, image, n: int) -> tuple[list[int], str, list[float], object]:
    """Greedy tokens, their text and the top-2 logit margin at each step (how close a tie was)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = llava.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, suppress_tokens=None,
                             output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    margins = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
    return new, processor.decode(new, skip_special_tokens=False), margins, processor.tokenizer


def first_divergence(ours: list[int], text: str, tokenizer) -> int | None:
    """Index of the first token where llama.cpp's answer (re-tokenized) leaves ours; None if it never does."""
    theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(theirs) >= len(ours) else len(theirs)


def mmproj_inputs(llava_dir: str | Path, clip_dir: str | Path, out: str | Path) -> Path:
    """What llama.cpp's LLaVA-1.5 converter reads: `out/clip/` (a CLIPModel folder whose config.json
    names the feature layer, with the export's vision weights) and `out/llava.projector`.

    The converter's `--clip-model-is-vision` path fails on transformers 5 (CLIPVisionModel has no
    `.vision_model` any more), so it is given the full CLIPModel the round names, as its docs do."""
    from transformers import CLIPModel, CLIPTokenizer, LlavaForConditionalGeneration

    llava_dir, clip_dir, out = Path(llava_dir), Path(clip_dir), Path(out)
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32)
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32)
    tower = llava.model.vision_tower
    clip.vision_model.load_state_dict(getattr(tower, "vision_model", tower).state_dict())  # the export's weights
    vit = out / "clip"
    clip.save_pretrained(vit)
    shutil.copy(clip_dir / "preprocessor_config.json", vit)
    if not (clip_dir / "vocab.json").exists():  # the tiny CLIP has no tokenizer; CLIPProcessor wants one
        (vit / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
        (vit / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(str(vit / "vocab.json"), str(vit / "merges.txt")).save_pretrained(vit)
    else:
        for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (clip_dir / name).exists():
                shutil.copy(clip_dir / name, vit)
    config = json.loads((vit / "config.json").read_text())
    config["vision_feature_layer"] = llava.config.vision_feature_layer  # read by the converter
    (vit / "config.json").write_text(json.dumps(config, indent=2))
    projector = {f"multi_modal_projector.{k}": v.contiguous() for k, v in
                 llava.model.multi_modal_projector.state_dict().items()}
    torch.save(projector, out / "llava.projector")  # llama.cpp's legacy converter reads this pickle format (tensors only)
    return out


def legacy_mmproj(llava_dir: Path, clip_dir: Path, out: Path, llama_cpp: Path, env) -> subprocess.CompletedProcess:
    mmproj_inputs(llava_dir, clip_dir, out)
    return sh([sys.executable, llama_cpp / "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py", "-m",
               out / "clip", "--llava-projector", out / "llava.projector", "--output-dir", out, "--use-f32",
               "--projector-type", "mlp"], env=env)


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    llama_cpp = args.llama_cpp.resolve()
    vocab = args.vocab_gguf or llama_cpp / "models" / "ggml-vocab-phi-3.gguf"
    missing = [str(p) for p in (llama_cpp / "convert_hf_to_gguf.py", llama_cpp / "gguf-py", vocab) if not p.exists()]
    if missing:  # before minutes of building a round to convert
        parser.error(f"--llama-cpp {args.llama_cpp}: no {', '.join(missing)} (a llama.cpp tree, e.g. the one the "
                     "llama-cpp-python sdist vendors; --vocab-gguf for another vocabulary)")
    try:
        import google.protobuf  # noqa: F401  (tokenizer.model is a SentencePiece protobuf)
    except ImportError:
        parser.error("the protobuf package is needed to write tokenizer.model: pip install protobuf")
    temporary = args.work is None
    work = args.work or Path(tempfile.mkdtemp(prefix="llama-export-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, llama_cpp, vocab, work)
    finally:
        if temporary:  # a 60 MB folder per run otherwise
            shutil.rmtree(work, ignore_errors=True)


def _run(args, llama_cpp: Path, vocab: Path, work: Path) -> dict:
    bins = llama_cpp / "build" / "bin"
    env = {**os.environ, "PYTHONPATH": f"{llama_cpp / 'gguf-py'}:{os.environ.get('PYTHONPATH', '')}"}
    result = dict(bench="llama_cpp_export", llama_cpp=str(llama_cpp))

    import random

    from mmft.export import export_llava
    from mmft.shapes import draw

    round_dir = build_round(work)
    export = export_llava(round_dir, work / "llava", dtype="float32", text_model=work / "text", force=True)
    write_sentencepiece(vocab, work / "text" / "tokenizer.model", llama_cpp / "gguf-py")
    pictures = []  # 56 px: neither side resizes
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                         ("purple", "circle"), ("orange", "square"), ("yellow", "triangle")]):
        path = work / f"shape-{i}.png"
        draw(colour, shape, random.Random(i), size=56).save(path)
        pictures.append(path)

    # text half
    done = sh([sys.executable, llama_cpp / "convert_hf_to_gguf.py", work / "text", "--outfile", work / "text.gguf",
               "--outtype", "f32"], env=env)
    result["text_convert"] = dict(rc=done.returncode, tail=done.stderr.strip().splitlines()[-1:] if done.returncode else [])
    # vision half, the documented modern route first
    done = sh([sys.executable, llama_cpp / "convert_hf_to_gguf.py", export, "--mmproj", "--outfile",
               work / "mmproj-hf.gguf", "--outtype", "f32"], env=env)
    error = [line for line in (done.stderr + done.stdout).splitlines() if "Error" in line or "error" in line]
    result["mmproj_convert_hf_to_gguf"] = dict(rc=done.returncode, error=error[-1:] if done.returncode else [])
    result["variants"] = []
    for layer, strategy in VARIANTS:
        name = f"layer{layer}-{strategy}"
        folder = llava_variant(export, work / name, layer, strategy)
        row = dict(vision_feature_layer=layer, strategy=strategy)
        conv = legacy_mmproj(folder, work / "clip", work / f"{name}-gguf", llama_cpp, env)
        row["legacy_convert_rc"] = conv.returncode
        if conv.returncode:
            row["error"] = (conv.stderr.strip().splitlines() or ["?"])[-1]
            result["variants"].append(row)
            continue
        mmproj = work / f"{name}-gguf" / "mmproj-model-f32.gguf"
        row["pictures"] = []
        for path in pictures:
            from PIL import Image

            ours, text, margins, tokenizer = transformers_answer(folder, Image.open(path), args.tokens)
            one = dict(picture=path.name, transformers=text)
            if (bins / "llama-mtmd-cli").exists() and (work / "text.gguf").exists():
                run = sh([bins / "llama-mtmd-cli", "-m", work / "text.gguf", "--mmproj", mmproj, "--image", path,
                          "-p", QUESTION, "-n", str(args.tokens), "--temp", "0", "--top-k", "1", "-t", "2",
                          "--no-warmup"])
                one.update(llama_cpp=run.stdout.strip(), rc=run.returncode)
                one["same"] = run.returncode == 0 and run.stdout.strip() == text.strip()
                at = None if one["same"] else first_divergence(ours, run.stdout.strip(), tokenizer)
                one["diverges_at"] = at
                one["transformers_margin_there"] = round(margins[at], 3) if at is not None and at < len(margins) else None
            row["pictures"].append(one)
        row["same_answers"] = sum(bool(p.get("same")) for p in row["pictures"])
        gaps = [p["transformers_margin_there"] for p in row["pictures"] if p.get("transformers_margin_there") is not None]
        row["largest_margin_overruled"] = max(gaps) if gaps else None
        result["variants"].append(row)
    print(f"text model -> GGUF: rc {result['text_convert']['rc']}; convert_hf_to_gguf.py --mmproj on the Llava "
          f"folder: rc {result['mmproj_convert_hf_to_gguf']['rc']} {result['mmproj_convert_hf_to_gguf']['error']}")
    print(f"{'feature choice':<16} {'converts':<9} {'same greedy answers':<20} largest transformers top-2 margin "
          "where llama.cpp chose otherwise")
    for row in result["variants"]:
        choice = f"({row['vision_feature_layer']}, {row['strategy']})"
        same = f"{row.get('same_answers')}/{len(row.get('pictures', []))}"
        print(f"{choice:<16} {str(row['legacy_convert_rc'] == 0):<9} {same:<20} {row.get('largest_margin_overruled')}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
