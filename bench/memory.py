"""Peak memory of the staged pipeline (draft -> refine): one weight copy vs the original's two.

    python -m bench.memory --precision int8               # 32 layers; every variant fits in 24 GB
    python -m bench.memory --precision fp32 --layers 4,8  # two fp32 copies do not fit: fit and scale
    python -m bench.memory --tiny                         # tiny kit, in-process (tests)

Every variant runs the real `Pipeline` (image -> draft -> refine, `--new-tokens` forced per stage)
on the real-size model (random weights, ViT-B/32-sized CLIP, LoRA r=16 on every linear), each in
its own subprocess, and reports the process's peak RSS:

- single:     one base LM, no adapter; both stages on it (the memory floor: one copy).
- one_copy:   this project: one base LM + LoRA; the draft with the adapter on, the refine with
              `disable_adapter()` (no second model, no merge).
- two_copies: a second full model: the draft on base + LoRA, the refine on a separately built base
              LM. (The original loaded one base and merged the LoRA into it *in place*, so its
              "base" refine model was the fine-tuned one; keeping a true base beside a merged or
              adapted copy costs this much.)

With several --layers the peak is fitted as a + b * layers per variant and extrapolated to
--target-layers (say so when quoting it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from bench import POSITIVE, PRECISIONS

VARIANTS = ("single", "one_copy", "two_copies")


def _counts(text: str) -> list[int]:
    """`--layers`: "32" or "4,8", each a positive whole number."""
    return [POSITIVE(x) for x in text.split(",") if x.strip()] or [POSITIVE(text)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="tiny kit, in this process (tests)")
    parser.add_argument("--precision", choices=PRECISIONS[:3], default=None,
                        help="default: the app's CPU path, int8")
    parser.add_argument("--layers", type=_counts, default=[32], help="one count, or several to fit and "
                                                                     "extrapolate: 4,8")
    parser.add_argument("--target-layers", type=POSITIVE, default=32)
    parser.add_argument("--new-tokens", type=POSITIVE, default=32, help="tokens forced per stage")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":  # flags before torch: --help and a mistyped flag answer at once
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from bench import common  # noqa: E402


class KeepVocab(LogitsProcessor):
    """The stand-in tokenizer covers ids below `size`; mask the rest so drafts decode to text."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids, scores):
        scores[:, self.size:] = -float("inf")
        return scores


def run_variant(variant: str, layers: int, precision: str, new_tokens: int, tiny: bool, tmp: str) -> dict:
    from mmft.model import MultimodalModel
    from mmft.pipeline import Pipeline
    from mmft.testing import make_tokenizer

    load_before = common.load_avg()
    t = time.perf_counter()
    adapter = variant != "single"
    if tiny:
        model = common.tiny_model(tmp, adapter=adapter)
        refine_model = common.tiny_model(f"{tmp}/second", adapter=False) if variant == "two_copies" else None
    else:
        tokenizer = make_tokenizer()
        model = common.real_size_model(tokenizer, layers, precision, "patch", adapter=adapter)
        refine_model = None
        if variant == "two_copies":  # a second, separately built base LM for the refine stage
            lm = common.build_real_lm(layers, precision, seed=1)
            refine_model = MultimodalModel(model.cfg, lm, tokenizer, model.projector, None).eval()
    build_s = time.perf_counter() - t
    rss_built = common.rss_gb()

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               logits_processor=LogitsProcessorList([KeepVocab(len(model.tokenizer))]))
    t = time.perf_counter()
    with torch.no_grad():
        if refine_model is None:
            answer = Pipeline(model).answer_image(picture, common.QUESTION, **gen)
            draft, final = answer.draft, answer.final
        else:
            draft = Pipeline(model).draft([picture], [common.QUESTION], **gen)[0]
            final = Pipeline(refine_model).refine([common.QUESTION], [draft], **gen)[0]
    run_s = time.perf_counter() - t
    return dict(variant=variant, layers=None if tiny else layers, precision=precision, build_s=round(build_s, 2),
                run_s=round(run_s, 2), rss_built_gb=round(rss_built, 2), peak_rss_gb=round(common.peak_rss_gb(), 2),
                draft_chars=len(draft or ""), final_chars=len(final or ""),
                load_before=load_before, load_after=common.load_avg())


def need_gb(variant: str, layers: int, precision: str) -> float:
    counts = common.lm_param_count(common.phi35_config(layers))
    per_byte = {"fp32": 4, "bf16": 2, "int8": 1, "nf4": 0.6}[precision]
    embed_bytes = 2 if precision == "bf16" else 4
    one = (counts["layer_linear"] + counts["lm_head"]) * per_byte + counts["embed"] * embed_bytes
    copies = 2 if variant == "two_copies" else 1
    return (one * copies + 1.5e9) / common.GB


def run_subprocess(variant: str, layers: int, args) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--worker", variant, "--layers", str(layers),
           "--precision", args.precision, "--new-tokens", str(args.new_tokens),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(variant=variant, layers=layers, precision=args.precision, error=" | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit(rows: list[dict], variant: str, target: int) -> dict | None:
    """Least-squares a + b * layers over this variant's runs; the peak at `target` layers."""
    points = [(r["layers"], r["peak_rss_gb"]) for r in rows if r["variant"] == variant and "peak_rss_gb" in r]
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    a = my - b * mx
    return dict(variant=variant, gb_fixed=round(a, 3), gb_per_layer=round(b, 4), layers=target,
                peak_rss_gb=round(a + b * target, 2), extrapolated=True)


def main(argv=None) -> dict:
    from bench.decode import default_precision

    parser = build_parser()
    args = parser.parse_args(argv)
    args.precision = args.precision or default_precision()
    common.set_threads(args.threads)
    layer_counts = args.layers

    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_variant(args.worker, layer_counts[0], args.precision, args.new_tokens, False, tmp)),
                  flush=True)
        return {}

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    result = dict(bench="memory", machine=common.machine(), tiny=args.tiny, precision=args.precision,
                  new_tokens=args.new_tokens)
    rows = []
    if args.tiny:
        for variant in variants:
            with tempfile.TemporaryDirectory() as tmp:
                row = run_variant(variant, 0, "fp32", args.new_tokens, True, tmp)
            row["peak_rss_clean"] = False  # in-process: the peak is the largest so far
            rows.append(row)
    else:
        for layers in layer_counts:
            for variant in variants:
                gb = need_gb(variant, layers, args.precision)
                if gb > common.available_gb():
                    rows.append(dict(variant=variant, layers=layers, precision=args.precision,
                                     error=f"needs ~{gb:.1f} GB, {common.available_gb():.1f} GB free: refused"))
                else:
                    rows.append(run_subprocess(variant, layers, args))
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    result["runs"] = rows

    by_variant = {}
    for variant in variants:
        direct = [r for r in rows if r["variant"] == variant and r.get("layers") == args.target_layers
                  and "peak_rss_gb" in r]
        if args.tiny:
            direct = [r for r in rows if r["variant"] == variant]
        by_variant[variant] = direct[0] if direct else fit(rows, variant, args.target_layers)
    result["at_target"] = by_variant
    single = (by_variant.get("single") or {}).get("peak_rss_gb")
    for name in ("one_copy", "two_copies"):
        peak = (by_variant.get(name) or {}).get("peak_rss_gb")
        if single and peak and not args.tiny:
            result[f"{name}_vs_single"] = round(peak / single, 3)
    result["load_avg_end"] = common.load_avg()

    print(f"memory: staged pipeline, {args.precision}, {args.new_tokens} tokens per stage, "
          f"{'tiny kit (in-process: peaks not separable)' if args.tiny else f'layers {layer_counts}'}")
    print(common.table(rows, ["variant", "layers", "build_s", "run_s", "rss_built_gb", "peak_rss_gb",
                              "load_before", "load_after", "error"]))
    if not args.tiny:
        summary = [dict(variant=v, **{k: x for k, x in (r or {}).items() if k != "variant"}) for v, r in by_variant.items()]
        print(f"at {args.target_layers} layers:")
        print(common.table(summary, ["variant", "peak_rss_gb", "extrapolated", "gb_fixed", "gb_per_layer"]))
        print({k: v for k, v in result.items() if k.endswith("_vs_single")})
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
