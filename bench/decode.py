"""Decode speed after an image prompt: this project's cached generate vs the original's loops.

    python -m bench.decode --tiny                  # tiny kit models, seconds
    python -m bench.decode --layers 8              # Phi-3.5-mini shapes, 8 of 32 layers, random weights
    python -m bench.decode --precision int8        # the whole 32 layers, int8 dynamic quantization

Variants, all greedy on the same model (LoRA on: the draft stage), the same prompt (image tokens +
a question) and `--new-tokens` forced new tokens (end-of-turn/eos masked until then, as
`min_new_tokens` does):

- cached:  `MultimodalModel.generate` with a streamer (KV cache; the app's streaming path).
- naive:   the original's fallback ("unable to use generate with embeddings"): every new token
           re-runs the full uncached forward over prompt embeddings + the embeddings of the tokens
           so far, logits at every position, argmax of the last.
- generate: plain `lm.generate(inputs_embeds=...)` on the embeddings, computed beforehand.
- three_pass: the original's draft, for reference: three uncached forwards, each over the prompt +
           the previous pass's argmax at *every* position (all positions decoded in parallel, so
           fast and garbage); CLIP + projector re-run each pass, as the original did.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from bench import POSITIVE, PRECISIONS

VARIANTS = ("cached", "naive", "generate", "three_pass")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="tiny kit models (tests, seconds)")
    parser.add_argument("--layers", type=POSITIVE, default=32, help="decoder layers of the real-size LM (32 = full)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="real-size LM precision (default: the app's CPU path, int8)")
    parser.add_argument("--mode", choices=("patch", "pooled"), default="patch",
                        help="image tokens: patch = 49 (LLaVA's default: second-to-last layer, no CLS), pooled = 1")
    parser.add_argument("--new-tokens", type=POSITIVE, default=64)
    parser.add_argument("--naive-tokens", type=POSITIVE, default=None,
                        help="stop the naive loop after this many tokens (its tokens/s is then an upper bound)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    return parser


if __name__ == "__main__":  # flags before torch: --help and a mistyped flag answer at once
    build_parser().parse_args()

import torch  # noqa: E402

from bench import common  # noqa: E402
from mmft.model import position_ids_from  # noqa: E402


def stop_ids(model) -> list[int]:
    tok = model.tokenizer
    ids = [tok.convert_tokens_to_ids(model.cfg.prompt_end_of_turn), tok.eos_token_id]
    return [i for i in ids if i is not None and i >= 0]


def prompt_embeds(model, batch) -> torch.Tensor:
    features = model.image_features(pixel_values=batch["pixel_values"])
    return model.embed(batch["input_ids"], batch["image_mask"], features)  # [1, T, D]


@torch.no_grad()
def run_cached(model, batch, n: int) -> tuple[list[int], dict]:
    timer = common.TokenTimer()
    out = model.generate(**batch, streamer=timer, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    total = time.perf_counter() - timer.start
    return out[0].tolist(), common.rates(timer.times, out.shape[1], total)


@torch.no_grad()
def run_generate(model, batch, n: int) -> tuple[list[int], dict]:
    embeds = prompt_embeds(model, batch)
    timer = common.TokenTimer()
    out = model.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], streamer=timer,
                            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=stop_ids(model),
                            pad_token_id=model.tokenizer.pad_token_id)
    total = time.perf_counter() - timer.start
    return out[0].tolist(), common.rates(timer.times, out.shape[1], total)


@torch.no_grad()
def run_naive(model, batch, n: int) -> tuple[list[int], dict]:
    """The original's fallback: one full uncached forward over everything for each new token."""
    start = time.perf_counter()
    embeds = prompt_embeds(model, batch)
    mask = batch["attention_mask"]
    embed = model.lm.get_input_embeddings()
    stops = stop_ids(model)
    tokens, times = [], []
    for _ in range(n):
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from(mask),
                          use_cache=False).logits  # [1, T, V]: every position, as the original
        last = logits[:, -1].float()
        last[:, stops] = -float("inf")  # min_new_tokens
        token = last.argmax(-1, keepdim=True)  # [1, 1]
        tokens.append(int(token))
        times.append(time.perf_counter() - start)
        embeds = torch.cat([embeds, embed(token).to(embeds.dtype)], dim=1)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
    return tokens, common.rates(times, n, time.perf_counter() - start)


@torch.no_grad()
def run_three_pass(model, batch, n: int, passes: int = 3) -> tuple[list[int], dict]:
    """The original's draft: `passes` uncached forwards, argmax at every position each time."""
    start = time.perf_counter()
    embed = model.lm.get_input_embeddings()
    answer = batch["input_ids"].new_zeros(1, 0)
    lengths = []
    for _ in range(passes):
        prompt = prompt_embeds(model, batch)  # CLIP + projector again, as the original's getInputs
        embeds = torch.cat([prompt, embed(answer).to(prompt.dtype)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from(mask),
                          use_cache=False).logits  # [1, T, V]
        answer = logits.argmax(-1)  # every position at once: the next pass's "answer"
        lengths.append(embeds.shape[1])
    total = time.perf_counter() - start
    return answer[0].tolist(), dict(total_s=round(total, 3), passes=passes, sequence_lengths=lengths,
                                    tokens_out=answer.shape[1])


RUNNERS = {"cached": run_cached, "naive": run_naive, "generate": run_generate, "three_pass": run_three_pass}


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def default_precision() -> str:
    """The app's CPU inference path (`pick_cpu_path`): int8 linears (fp32 around them, as built here)."""
    from mmft.loading import pick_dtype
    from mmft.quantize import pick_cpu_path

    if pick_cpu_path().quantize == "int8":
        return "int8"
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[pick_dtype(torch.device("cpu"))]


def build(args, tmp: str):
    if args.tiny:
        return common.tiny_model(tmp, mode=args.mode), "fp32"
    precision = args.precision or default_precision()
    config = common.phi35_config(args.layers)
    counts = common.lm_param_count(config)
    bytes_per_param = {"fp32": 4, "bf16": 2, "int8": 1, "nf4": 0.6}[precision]
    need = sum(counts.values()) * bytes_per_param + counts["embed"] * 4 + 2.5e9
    common.need_memory(need / common.GB, f"the real-size model ({args.layers} layers, {precision})")
    from mmft.testing import make_tokenizer

    model = common.real_size_model(make_tokenizer(), args.layers, precision, args.mode)
    return model, precision


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")

    result = dict(bench="decode", machine=common.machine(), tiny=args.tiny, mode=args.mode,
                  new_tokens=args.new_tokens, load_avg_start=common.load_avg())
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model, precision = build(args, tmp)
        result.update(precision=precision, build_s=round(time.perf_counter() - t, 2),
                      layers=None if args.tiny else args.layers, threads=torch.get_num_threads())
        batch = common.image_batch(model)
        result["prompt_tokens"] = int(batch["input_ids"].shape[1])
        result["image_tokens"] = int(batch["image_mask"].sum())
        with torch.no_grad():  # warm-up: first calls pay for kernel selection and allocation
            model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            t = time.perf_counter()
            prompt_embeds(model, batch)
            result["vision_projector_s"] = round(time.perf_counter() - t, 3)

        tokens, rows = {}, []
        for name in variants:
            n = args.naive_tokens if name == "naive" and args.naive_tokens else args.new_tokens
            before = common.load_avg()
            tokens[name], stats = RUNNERS[name](model, batch, n)
            stats.update(load_before=before, load_after=common.load_avg())
            result[name] = stats
            rows.append(dict(variant=name, **stats))
            print(f"  {name}: {stats}", file=sys.stderr, flush=True)
        result["peak_rss_gb"] = round(common.peak_rss_gb(), 2)

    if "cached" in tokens:
        for other in ("naive", "generate"):
            if other in tokens:
                n = min(len(tokens["cached"]), len(tokens[other]))
                result[f"cached_matches_{other}"] = tokens["cached"][:n] == tokens[other][:n]
                result[f"first_mismatch_{other}"] = first_mismatch(tokens["cached"][:n], tokens[other][:n])
        if "naive" in tokens:
            result["speedup_cached_vs_naive"] = round(
                result["cached"]["tokens_per_s"] / result["naive"]["tokens_per_s"], 2)
            result["naive_tokens_run"] = len(tokens["naive"])
    result["load_avg_end"] = common.load_avg()

    print(f"decode: {'tiny kit' if args.tiny else f'Phi-3.5-mini shapes, {args.layers} layers'}, "
          f"{precision}, {result['prompt_tokens']}-token prompt ({result['image_tokens']} image tokens), "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(common.table(rows, ["variant", "tokens", "ttft_s", "total_s", "tokens_per_s", "decode_tokens_per_s",
                              "load_before", "load_after"]))
    if "speedup_cached_vs_naive" in result:
        print(f"cached / naive tokens/s: {result['speedup_cached_vs_naive']}x;  "
              f"same tokens: {result.get('cached_matches_naive')}")
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
