"""mmft's CPU paths against llama.cpp, on the same random weights, side by side in one run.

    python -m bench.side_by_side --llama-cpp DIR      # real size (32 layers), 2 threads; or MMFT_LLAMA_CPP=DIR
    python -m bench.side_by_side --layers 2           # real width, 2 layers (development)
    python -m bench.side_by_side --tiny               # toy shapes (tests); llama.cpp half only where built

1. One Phi-3.5-mini-shaped LM with random weights is built in bf16 (one layer at a time) and saved
   as a transformers folder (safetensors), with three LoRA adapters (r=16, every linear) beside it.
2. llama.cpp (DIR = its source tree with `build/bin/llama-bench`, e.g. the one vendored by the
   `llama-cpp-python` sdist): its own `convert_hf_to_gguf.py` writes a bf16 GGUF from that folder
   (the vocabulary is copied from the Phi-3 vocab GGUF in --vocab-gguf: the folder has no
   `tokenizer.model`), `llama-quantize` makes Q8_0 and Q4_K_M. Without DIR this half is skipped.
3. Timed, alternating (mmft rows, then each GGUF, per --rounds), every engine in its own process
   at --threads: llama.cpp by `llama-bench -p 80 -n 64` (prefill = 80 / its pp t/s), mmft by
   `generate` after an 80-token prefill (decode tok/s over --new-tokens, adapter off so both run
   the same weights). Peak RSS per process (wait4). Load average before and after each.
4. mmft rows load as `mmft.loading.build_model` does (int8: `mmft.quantize.load_int8_lm`, linears
   quantized as they are read, the rest cast to the dtype; then the adapter), then two more rounds
   are loaded as PEFT named adapters on the same base: RSS with one and three. The app's default row
   also answers one image question through the staged `Pipeline` (16 draft + 32 refine tokens;
   real-size CLIP and projector; warm: after a first 1 + 1-token one) and times the adapter toggle.
5. Quantization error: each row's logits over the 80-token prompt and its greedy tokens against the
   unquantized reference row (float32 where it is run, else bf16), same weights.

The last line is JSON: machine, rows, accuracy, the pipeline, and the goal check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import GGUF_TYPES, POSITIVE, VOCAB_GGUF


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp source tree with build/bin (or MMFT_LLAMA_CPP)")
    parser.add_argument("--vocab-gguf", default=VOCAB_GGUF, help="Phi-3 vocab-only GGUF for the converted model")
    parser.add_argument("--threads", type=POSITIVE, default=2, help="threads for both engines")
    parser.add_argument("--layers", type=POSITIVE, default=32)
    parser.add_argument("--tiny", action="store_true", help="toy shapes (tests)")
    parser.add_argument("--mmft", default=None,
                        help="mmft rows as dtype:quantize, comma separated (default: the app's default, "
                             "bfloat16:none (the reference), and int8 with the other dtype)")
    parser.add_argument("--rounds", type=POSITIVE, default=1, help="alternations of all engines")
    parser.add_argument("--prompt-tokens", type=POSITIVE, default=80)
    parser.add_argument("--new-tokens", type=POSITIVE, default=32, help="mmft decode tokens (llama-bench: 64)")
    parser.add_argument("--gguf", default=",".join(GGUF_TYPES), help="llama.cpp quantizations to compare")
    parser.add_argument("--llama-reps", type=POSITIVE, default=2, help="llama-bench repetitions (-r)")
    parser.add_argument("--keep", default=None,
                        help="keep the weights and GGUFs in this folder (a re-run reuses what it holds)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":  # flags before torch: --help and a mistyped flag answer at once
    build_parser().parse_args()

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from bench import common  # noqa: E402
from bench.llama_cpp import llama_bench, llama_cpp_dir, make_ggufs, run_logged, tail  # noqa: E402

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GOALS = dict(decode_vs_q4_k_m=1.0, prefill_s=1.5, image_question_s=10.0, rss_three_rounds_gb=8.0)


# -- the weights ----------------------------------------------------------------------------------
def tiny_config():
    """Toy shapes with the real vocabulary (the GGUF vocab must match) and K-quant-friendly widths."""
    config = common.small_phi3_config()
    config.vocab_size, config.pad_token_id, config.eos_token_id = 32064, 32000, 32000
    return config


def save_weights(folder: Path, layers: int, tiny: bool) -> dict:
    """Worker: the random LM (bf16, as Phi-3.5 ships) as a transformers folder + three adapters."""
    from peft import get_peft_model

    from mmft.config import MMFTConfig
    from mmft.loading import lora_config

    config = tiny_config() if tiny else common.phi35_config(layers)
    t = time.perf_counter()
    lm = common.build_real_lm(layers, "bf16", config=config)
    lm.save_pretrained(folder / "lm")
    lora = lora_config(MMFTConfig())
    peft = get_peft_model(lm, lora)
    for i in range(3):
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:  # a trained adapter: B non-zero, A as initialised but seeded
                    bound = 0.01 if "lora_B" in name else 1 / p.shape[-1] ** 0.5
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator).to(p.dtype))
        peft.save_pretrained(folder / f"round-{i + 1}")
    return dict(saved_s=round(time.perf_counter() - t, 1), peak_rss_gb=round(common.peak_rss_gb(), 2))


def kept_shape_error(folder: Path, config) -> str | None:
    """A kept folder (--keep) holds the weights of the run that made it: refuse another shape's."""
    saved = json.loads((folder / "lm" / "config.json").read_text())
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
    wrong = {k: (saved.get(k), getattr(config, k)) for k in keys if saved.get(k) != getattr(config, k)}
    return f"--keep {folder} holds another model (saved, asked): {wrong}; use another folder" if wrong else None


# -- mmft ---------------------------------------------------------------------------------------------
def mmft_worker(folder: Path, dtype_name: str, quantize: str, prompt: int, new_tokens: int, pipeline: bool,
                tiny: bool, out: Path) -> dict:
    """Load as `build_model` does, add two rounds as named adapters, time, save logits for the check."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mmft.quantize import int8_linears, load_int8_lm

    dtype = DTYPE_NAMES[dtype_name]
    load_before = common.load_avg()
    t = time.perf_counter()
    # as build_model: int8 is read tensor by tensor straight into int8 linears, then the adapter attached
    if quantize == "int8":
        lm = load_int8_lm(folder / "lm", dtype=dtype)
    else:
        lm = AutoModelForCausalLM.from_pretrained(folder / "lm", dtype=dtype)
    lm = PeftModel.from_pretrained(lm, str(folder / "round-1"), adapter_name="round-1")
    lm.eval()
    build_s = time.perf_counter() - t
    rss_one = common.rss_gb()
    for name in ("round-2", "round-3"):  # more rounds on the same base: PEFT named adapters
        lm.load_adapter(str(folder / name), adapter_name=name)
    lm.set_adapter("round-1")
    rss_three = common.rss_gb()

    config = lm.get_base_model().config
    ids = torch.randint(3, 32000, (1, prompt), generator=torch.Generator().manual_seed(0))
    kwargs = dict(do_sample=False, pad_token_id=config.pad_token_id, eos_token_id=None)
    with torch.no_grad(), lm.disable_adapter():
        logits = lm(input_ids=ids).logits[0].float()  # [T, V]: the quantization-error probe
        lm.generate(input_ids=ids[:, :8], max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        timer = common.TokenTimer()
        gen = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=timer,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - timer.start
    stats = common.rates(timer.times, gen.shape[1] - prompt, total)
    save_file(dict(logits=logits.contiguous(), tokens=gen[0, prompt:].contiguous()), str(out))  # no pickles
    row = dict(engine="mmft", precision=f"{quantize} ({dtype_name})" if quantize != "none" else dtype_name,
               dtype=dtype_name, quantize=quantize, threads=torch.get_num_threads(), build_s=round(build_s, 1),
               prefill_s=stats["ttft_s"], decode_tokens_per_s=stats["decode_tokens_per_s"],
               new_tokens=stats["tokens"], int8_linears=len(int8_linears(lm)),
               rss_one_round_gb=round(rss_one, 2), rss_three_rounds_gb=round(rss_three, 2))
    if pipeline:
        row["pipeline"] = staged_pipeline(lm, tiny)
    return dict(row, peak_rss_gb=round(common.peak_rss_gb(), 2), load_before=load_before,
                load_after=common.load_avg())


def staged_pipeline(lm, tiny: bool) -> dict:
    """One image question through the real `Pipeline`: draft 16 tokens (adapter on), refine 32 (off),
    timed warm (the app's every question after its first); the first, 1 + 1 tokens, is timed apart."""
    import numpy as np
    from PIL import Image
    from transformers import LogitsProcessorList

    from bench.memory import KeepVocab
    from mmft.config import MMFTConfig
    from mmft.model import MultimodalModel
    from mmft.pipeline import Pipeline
    from mmft.projector import Projector
    from mmft.testing import make_tokenizer

    tokenizer = make_tokenizer()
    vision = common.build_real_vision("patch")
    if tiny:  # a ViT-B/32 is most of a toy model's time; the toy run only checks that it works
        vision.vision_model.encoder.layers = vision.vision_model.encoder.layers[:1]
    dim = lm.get_input_embeddings().weight.shape[1]
    cfg = MMFTConfig(lm_model_id="random", vit_model_id="random", mp_input_dim=vision.feature_dim,
                     mp_output_dim=dim, mp_hidden_dim=dim)
    torch.manual_seed(0)
    projector = Projector(cfg.mp_input_dim, dim, dim, cfg.mp_depth).to(lm.get_input_embeddings().weight.dtype)
    model = MultimodalModel(cfg, lm, tokenizer, projector, vision).eval()
    pipe = Pipeline(model)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    keep = LogitsProcessorList([KeepVocab(len(tokenizer))])

    def gen(n):
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, logits_processor=keep)

    toggles = []
    for _ in range(5):
        t = time.perf_counter()
        with model.adapter(False):
            pass
        toggles.append(time.perf_counter() - t)
    with torch.no_grad():
        t = time.perf_counter()  # warm, as the app answers every question after its first
        pipe.answer_image(picture, common.QUESTION, **gen(1))
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        draft = pipe.draft([picture], [common.QUESTION], **gen(16))[0]
        draft_s = time.perf_counter() - t
        t = time.perf_counter()
        pipe.refine([common.QUESTION], [draft], **gen(32))
        refine_s = time.perf_counter() - t
    return dict(draft_tokens=16, refine_tokens=32, draft_s=round(draft_s, 2), refine_s=round(refine_s, 2),
                total_s=round(draft_s + refine_s, 2), warm_up_1_plus_1_tokens_s=round(first_s, 2),
                adapter_toggle_ms=round(1000 * min(toggles), 2),
                peak_rss_gb=round(common.peak_rss_gb(), 2))


def run_mmft(folder: Path, spec: str, args, pipeline: bool, tmp: Path) -> dict:
    dtype_name, quantize = spec.split(":")
    out = tmp / f"logits-{dtype_name}-{quantize}.safetensors"
    cmd = [sys.executable, "-m", "bench.side_by_side", "--worker", spec, "--folder", str(folder),
           "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--out", str(out)]
    cmd += ["--pipeline"] if pipeline else []
    cmd += ["--tiny"] if args.tiny else []
    log = tmp / f"mmft-{dtype_name}-{quantize}.log"
    rc, _, _ = run_logged(cmd, log)
    if rc != 0:
        return dict(engine="mmft", precision=spec, error=tail(log))
    row = json.loads(log.read_text().strip().splitlines()[-1])
    row["logits_file"] = str(out)
    return row


def accuracy(rows: list[dict]) -> list[dict]:
    """Each mmft row's logits and greedy tokens against the unquantized reference (fp32 if run)."""
    mm = [r for r in rows if r["engine"] == "mmft" and "logits_file" in r]
    refs = [r for r in mm if r["quantize"] == "none"]
    if not refs:
        return []
    ref_row = min(refs, key=lambda r: r["dtype"] != "float32")  # float32 first
    ref = load_file(ref_row["logits_file"])
    out = []
    for r in mm:
        if r is ref_row:
            continue
        got = load_file(r["logits_file"])
        diff = (got["logits"] - ref["logits"]).abs()
        n = min(len(got["tokens"]), len(ref["tokens"]))
        same = (got["tokens"][:n] == ref["tokens"][:n]).int()
        first_diff = None if bool(same.all()) else int((same == 0).nonzero()[0])
        out.append(dict(row=r["precision"], reference=ref_row["precision"],
                        max_abs_logit_diff=round(float(diff.max()), 4),
                        rel_to_max_logit=round(float(diff.max() / ref["logits"].abs().max()), 4),
                        mean_abs_logit_diff=round(float(diff.mean()), 5),
                        top1_agree=round(float((got["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean()), 3),
                        greedy_same_tokens=f"{int(same.sum())}/{n}", first_greedy_difference=first_diff))
    return out


# -- the run ----------------------------------------------------------------------------------------
def default_spec() -> str:
    """The app's CPU default: `pick_cpu_path`'s quantization and dtype (`pick_dtype` on this CPU where
    the path names none), as `build_model` picks them."""
    from mmft.loading import pick_dtype
    from mmft.quantize import pick_cpu_path

    path = pick_cpu_path()
    name = {v: k for k, v in DTYPE_NAMES.items()}[pick_dtype(torch.device("cpu"), path.dtype)]
    return f"{name}:{path.quantize}"


def goal_check(rows: list[dict], default: str) -> dict:
    mine = next((r for r in rows if r["engine"] == "mmft" and r.get("spec") == default and "error" not in r), None)
    q4 = [r for r in rows if r["engine"] == "llama.cpp" and r["precision"] == "Q4_K_M" and "error" not in r]
    if mine is None:
        return dict(default=default, error="the default row did not run")
    pipe = mine.get("pipeline", {})
    q4_decode = max((r["decode_tokens_per_s"] for r in q4), default=None)
    # the same statistic for both engines: the best round of each (mmft's first row alone against
    # llama.cpp's best of --rounds was a fail where mmft led in every round)
    my_decode = max(r["decode_tokens_per_s"] for r in rows if r["engine"] == "mmft" and r.get("spec") == default
                    and "error" not in r)
    checks = dict(
        decode_tokens_per_s=dict(value=my_decode, llama_cpp_q4_k_m=q4_decode,
                                 met=None if q4_decode is None else my_decode >= q4_decode),
        prefill_s=dict(value=mine["prefill_s"], goal=GOALS["prefill_s"], met=mine["prefill_s"] <= GOALS["prefill_s"]),
        image_question_s=dict(value=pipe.get("total_s"), goal=GOALS["image_question_s"],
                              met=None if not pipe else pipe["total_s"] <= GOALS["image_question_s"]),
        peak_rss_three_rounds_gb=dict(value=mine["peak_rss_gb"], goal=GOALS["rss_three_rounds_gb"],
                                      met=mine["peak_rss_gb"] <= GOALS["rss_three_rounds_gb"]),
        three_rounds_one_base=dict(rss_one_round_gb=mine["rss_one_round_gb"],
                                   rss_three_rounds_gb=mine["rss_three_rounds_gb"],
                                   met=mine["rss_three_rounds_gb"] - mine["rss_one_round_gb"] < 0.5),
    )
    return dict(default=default, **checks)


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.set_threads(args.threads)

    if args.worker == "save":
        print(json.dumps(save_weights(Path(args.folder), args.layers, args.tiny)), flush=True)
        return {}
    if args.worker:
        dtype_name, quantize = args.worker.split(":")
        row = mmft_worker(Path(args.folder), dtype_name, quantize, args.prompt_tokens, args.new_tokens,
                          args.pipeline, args.tiny, Path(args.out))
        print(json.dumps(dict(row, spec=args.worker)), flush=True)
        return {}

    default = default_spec()
    other = "float32:int8" if default.startswith("bfloat16") else "bfloat16:int8"
    specs = [s for s in (args.mmft or f"{default},bfloat16:none,{other}").split(",") if s]
    if args.tiny:
        specs = list(dict.fromkeys(specs + ["float32:none"]))  # an fp32 reference costs nothing at toy size
    bad = [s for s in specs if s.count(":") != 1 or s.split(":")[0] not in DTYPE_NAMES
           or s.split(":")[1] not in ("int8", "none")]
    if bad:
        parser.error(f"--mmft rows are dtype:quantize with dtype in {list(DTYPE_NAMES)}, quantize int8|none: {bad}")
    if not args.tiny:
        counts = common.lm_param_count(common.phi35_config(args.layers))
        params = counts["layer_linear"] + counts["lm_head"] + counts["embed"]
        big = max(4 if s.startswith("float32:none") else 2 for s in specs)
        common.need_memory((params * big + 2.5e9) / common.GB, f"the largest mmft row at {args.layers} layers")

    result = dict(bench="side_by_side", machine=common.machine(), tiny=args.tiny,
                  layers=None if args.tiny else args.layers, threads=args.threads, default=default)
    root, why = llama_cpp_dir(args.llama_cpp)
    result["llama_cpp"] = why
    print(why, file=sys.stderr, flush=True)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmft-side-by-side-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        rc, secs = 0, 0.0
        if (tmp / "round-3" / "adapter_config.json").exists():  # a kept folder from an earlier run
            wrong = kept_shape_error(tmp, tiny_config() if args.tiny else common.phi35_config(args.layers))
            if wrong:
                raise SystemExit(wrong)
        else:
            rc, secs, _ = run_logged([sys.executable, "-m", "bench.side_by_side", "--worker", "save", "--folder",
                                      str(tmp), "--layers", str(args.layers)] + (["--tiny"] if args.tiny else []),
                                     tmp / "save.log")
        if rc != 0:
            raise SystemExit(f"could not build and save the random model: {tail(tmp / 'save.log')}")
        result["weights"] = dict(saved_s=round(secs, 1), folder_gb=round(
            sum(f.stat().st_size for f in (tmp / "lm").iterdir()) / common.GB, 2))
        ggufs, notes = ({}, [])
        if root is not None:
            if not Path(args.vocab_gguf).exists():
                notes = [f"vocab GGUF {args.vocab_gguf} not found: llama.cpp half skipped"]
            else:
                ggufs, notes = make_ggufs(root, tmp, args.vocab_gguf, args.threads, args.gguf.split(","))
        result["llama_cpp_notes"] = notes
        rows = []
        for r in range(args.rounds):
            for spec in specs:
                row = run_mmft(tmp, spec, args, pipeline=spec == default and r == 0, tmp=tmp)
                rows.append(dict(row, round=r + 1))
                print(f"  {row}", file=sys.stderr, flush=True)
            for kind, path in ggufs.items():
                row = llama_bench(root, path, kind, args.threads, args.prompt_tokens, 64, args.llama_reps,
                                  tmp / f"bench-{kind}.log")
                rows.append(dict(row, round=r + 1))
                print(f"  {row}", file=sys.stderr, flush=True)
        result["accuracy"] = accuracy([r for r in rows if r.get("round") == 1])
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        row.pop("logits_file", None)
        row["default"] = row.get("spec") == default or None
    result["rows"] = rows
    result["goal_check"] = goal_check(rows, default)
    result["load_avg_end"] = common.load_avg()

    print(f"side by side: {'toy Phi-3' if args.tiny else f'Phi-3.5-mini shapes, {args.layers} layers'}, random "
          f"weights, {args.prompt_tokens}-token prefill, {args.threads} threads ({result['llama_cpp']})")
    print(common.table(rows, ["round", "engine", "precision", "default", "threads", "decode_tokens_per_s",
                              "prefill_s", "peak_rss_gb", "rss_one_round_gb", "rss_three_rounds_gb",
                              "load_before", "load_after", "error"]))
    if result["accuracy"]:
        print("quantization error (same weights, prompt logits and greedy tokens):")
        print(common.table(result["accuracy"], ["row", "reference", "max_abs_logit_diff", "rel_to_max_logit",
                                                "top1_agree", "greedy_same_tokens"]))
    pipe = next((r["pipeline"] for r in rows if r.get("pipeline")), None)
    if pipe:
        print(f"image question at the default ({default}): draft {pipe['draft_s']} s + refine {pipe['refine_s']} s "
              f"= {pipe['total_s']} s; adapter toggle {pipe['adapter_toggle_ms']} ms")
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
