"""Peak RSS of the app's CPU load: int8 base (LM + CLIP) and three rounds, through `RoundCache`.

    python -m bench.load_memory --layers 4                    # both loaders; ~2 min
    python -m bench.load_memory --layers 32 --keep /tmp/lm32  # real size; needs ~14 GB free for "transformers"
    python -m bench.load_memory --tiny                        # toy shapes (tests)

1. A Phi-3.5-mini-shaped LM with random weights is saved in bf16 (as Phi-3.5 ships), with the real
   Phi-3.5 tokenizer, a ViT-B/32-shaped CLIP in fp32 (as openai/clip-vit-base-patch32 ships) and
   three round folders (LoRA r=16 on every linear, a patch-mode projector, config.json naming both).
2. Each loader runs in a fresh process: `RoundCache.load` of round 1 (the base + its adapter), then
   rounds 2 and 3 (named adapters on the same base), then one text answer (draft + refine, 4 tokens
   each). Peak RSS is the process's own `ru_maxrss`; RSS is also read after each step.
   - streamed:     `mmft.quantize.load_int8_lm` (what `build_model` does now): tensor by tensor, no map.
   - transformers: `from_pretrained(dtype="auto")` then `quantize_int8_` (what `build_model` did
     before; it quantized after attaching the adapter, which gives the same model).

The last line is JSON: machine, the rows, the goal (peak <= 8 GB with three rounds) per row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOADERS = ("streamed", "transformers")

from bench import POSITIVE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=POSITIVE, default=32)
    parser.add_argument("--tiny", action="store_true", help="toy shapes (tests)")
    parser.add_argument("--loaders", default=",".join(LOADERS))
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the app's, around int8)")
    parser.add_argument("--threads", type=POSITIVE, default=None)
    parser.add_argument("--keep", default=None, help="keep the saved weights here (a re-run reuses them)")
    parser.add_argument("--worker", choices=(*LOADERS, "save"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":  # flags before torch: --help and a mistyped flag answer at once
    build_parser().parse_args()

import torch  # noqa: E402

from bench import common  # noqa: E402

GOAL_GB = 8.0


def save_all(folder: Path, layers: int, tiny: bool) -> None:
    """Worker: LM + tokenizer, CLIP + processor, three round folders over them."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from bench.side_by_side import save_weights
    from mmft.config import MMFTConfig, save_config
    from mmft.loading import lora_config
    from mmft.projector import Projector, save_projector
    from mmft.round import ADAPTER_DIR
    from mmft.testing import make_clip, make_tokenizer

    save_weights(folder, layers, tiny)  # lm/ (bf16) and round-{1,2,3}/ (PEFT adapters)
    make_tokenizer().save_pretrained(folder / "lm")
    if tiny:
        clip, processor = make_clip()
    else:
        torch.manual_seed(0)
        clip = CLIPModel(CLIPConfig())  # ViT-B/32's shapes, random
        processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    clip.save_pretrained(folder / "clip")
    processor.save_pretrained(folder / "clip")
    dim = clip.config.vision_config.hidden_size
    lm_dim = json.loads((folder / "lm" / "config.json").read_text())["hidden_size"]
    for i in (1, 2, 3):
        out = folder / "rounds" / f"round-{i}"
        out.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder / f"round-{i}"), str(out / ADAPTER_DIR))
        lora = lora_config(MMFTConfig())
        cfg = MMFTConfig(lm_model_id=str(folder / "lm"), vit_model_id=str(folder / "clip"), vit_feature_mode="patch",
                         lora_r=lora.r, lora_alpha=lora.lora_alpha, mp_input_dim=dim, mp_output_dim=lm_dim,
                         mp_hidden_dim=lm_dim, gen_max_new_tokens=4)
        torch.manual_seed(i)
        save_projector(Projector(dim, lm_dim, lm_dim, cfg.mp_depth), out / "projector.safetensors")
        save_config(out, cfg, {"round": i})


def worker(folder: Path, loader: str, dtype: str) -> dict:
    """Fresh process: three rounds through RoundCache with `loader`, RSS after each step."""
    from mmft import loading
    from mmft.serving import RoundCache

    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        from mmft.quantize import quantize_int8_

        def transformers_then_quantize(model_id, revision=None, dtype=torch.float32):
            lm = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, dtype="auto")
            quantize_int8_(lm, dtype)
            return lm

        loading.load_int8_lm = transformers_then_quantize
    row = dict(loader=loader, dtype=dtype, load_before=common.load_avg())
    cache, t = RoundCache(), time.perf_counter()
    for i in (1, 2, 3):
        pipe = cache.load(f"round-{i}", folder / "rounds" / f"round-{i}", device="cpu", dtype=dtype, quantize="int8")
        row[f"rss_{i}_gb"] = round(common.rss_gb(), 2)
        if i == 1:
            row["base_load_s"] = round(time.perf_counter() - t, 1)
            row["peak_one_round_gb"] = round(common.peak_rss_gb(), 2)
    row["load_s"] = round(time.perf_counter() - t, 1)
    row["peak_three_rounds_gb"] = round(common.peak_rss_gb(), 2)
    with torch.no_grad():
        t = time.perf_counter()
        answer = pipe.answer_text("What is next to the man?")
    row["answer_s"] = round(time.perf_counter() - t, 1)
    row["answered"] = isinstance(answer.final, str)
    row["peak_after_answer_gb"] = round(common.peak_rss_gb(), 2)
    row["int8_linears"] = sum(type(m).__name__ == "Int8Linear" for m in pipe.model.lm.modules())
    return dict(row, load_after=common.load_avg())


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    if args.worker == "save":
        save_all(Path(args.folder), args.layers, args.tiny)
        return {}
    if args.worker:
        print(json.dumps(worker(Path(args.folder), args.worker, args.dtype)), flush=True)
        return {}

    from bench.side_by_side import default_spec

    dtype = args.dtype or default_spec().split(":")[0]  # what the app loads int8 with on this CPU
    loaders = [name for name in args.loaders.split(",") if name]
    if not set(loaders) <= set(LOADERS):
        parser.error(f"--loaders: choose from {LOADERS}, got {loaders}")
    if not args.tiny:
        counts = common.lm_param_count(common.phi35_config(args.layers))
        linear = counts["layer_linear"] + counts["lm_head"]
        # transformers' path: the bf16 map (2 bytes a weight) + int8 (1 byte a linear weight) + CLIP, rounds, runtime
        common.need_memory((2 * (linear + counts["embed"]) + linear + 2.5e9) / common.GB, "the transformers loader")
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmft-load-memory-"))
    tmp.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "bench.load_memory", "--folder", str(tmp), "--layers", str(args.layers)]
    base += (["--tiny"] if args.tiny else []) + (["--threads", str(args.threads)] if args.threads else [])
    result = dict(bench="load_memory", machine=common.machine(), tiny=args.tiny,
                  layers=None if args.tiny else args.layers, dtype=dtype)
    rows = []
    try:
        if (tmp / "rounds" / "round-3" / "config.json").exists():  # kept: the shape must be the one asked for
            from bench.side_by_side import kept_shape_error, tiny_config

            wrong = kept_shape_error(tmp, tiny_config() if args.tiny else common.phi35_config(args.layers))
            if wrong:
                raise SystemExit(wrong)
        else:
            t = time.perf_counter()
            done = subprocess.run(base + ["--worker", "save"], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"could not save the random model: {done.stderr.strip().splitlines()[-3:]}")
            result["saved_s"] = round(time.perf_counter() - t, 1)
        for loader in loaders:
            done = subprocess.run(base + ["--worker", loader, "--dtype", dtype], capture_output=True, text=True)
            if done.returncode != 0:
                rows.append(dict(loader=loader, error=" | ".join(done.stderr.strip().splitlines()[-3:])))
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(dict(row, goal_met=row["peak_after_answer_gb"] <= GOAL_GB))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result["rows"] = rows
    print(f"load memory: {'toy Phi-3' if args.tiny else f'Phi-3.5-mini shapes, {args.layers} layers'}, int8 ({dtype}), "
          f"LM bf16 checkpoint + CLIP fp32, three rounds via RoundCache")
    print(common.table(rows, ["loader", "load_s", "peak_one_round_gb", "rss_1_gb", "rss_3_gb", "peak_three_rounds_gb",
                              "peak_after_answer_gb", "goal_met", "load_before", "load_after", "error"]))
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
