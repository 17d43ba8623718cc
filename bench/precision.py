"""CPU precision study on Phi-3.5-mini's shapes: decode speed vs the machine's memory bandwidth.

    python -m bench.precision                               # fp32, bf16, int8, nf4; 32 layers
    python -m bench.precision --precisions fp32,int8 --layers 32
    python -m bench.precision --tiny                        # toy shapes, in-process (tests)
    python -m bench.precision --paired --precisions fp32,bf16,int8 --layers 12   # A/B in one process

Each precision runs in its own subprocess (clean peak RSS, one model in memory at a time); with
--paired they share one process and their decode runs alternate, so the ratios survive a shared,
busy machine:

- fp32: the weights as built.
- bf16: weights and activations bf16 (this CPU has no native bf16: oneDNN/ATen emulate it).
- int8: the app's `mmft.quantize.Int8Linear` on every nn.Linear (lm_head too), per-channel int8
        weights, activations quantized per call (fbgemm; the same kernel torch.ao's deprecated
        `quantize_dynamic` used, whose modules PEFT cannot wrap).
- nf4:  bitsandbytes Linear4bit (NF4, double quant, bf16 compute) on every decoder linear, lm_head
        kept fp32, as `mmft.loading.load_lm(quantize="nf4")` asks transformers for.

Decode tokens/s is measured after a `--prompt-tokens` prefill (text ids: the precision study is about
the LM's weights; the image prompt's length is matched). The bandwidth limit for a precision is
read bandwidth / bytes read per decoded token (all linear weights as stored + KV cache + one
embedding row); the fraction is measured / limit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench import POSITIVE, PRECISIONS

DEFAULT_TOKENS = {"fp32": 16, "bf16": 16, "int8": 32, "nf4": 6}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=POSITIVE, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="toy Phi-3 shapes, all in this process (tests)")
    parser.add_argument("--layers", type=POSITIVE, default=32)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--new-tokens", type=POSITIVE, default=None,
                        help=f"decoded tokens per precision (default {DEFAULT_TOKENS})")
    parser.add_argument("--prompt-tokens", type=POSITIVE, default=80,
                        help="prefill length (the issue's 80; the patch-mode image prompt is 77 now)")
    parser.add_argument("--paired", action="store_true",
                        help="load --precisions together and alternate decode runs (ratios robust to load)")
    parser.add_argument("--rounds", type=POSITIVE, default=3, help="alternations for --paired")
    parser.add_argument("--worker", choices=PRECISIONS, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":  # flags before torch: --help and a mistyped flag answer at once
    build_parser().parse_args()

import torch  # noqa: E402

from bench import common  # noqa: E402

# nf4 decodes at ~1 token/s or less on this CPU: fewer tokens keep a full run under 10 minutes.
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "nf4": 0.6}


def measure(precision: str, layers: int, new_tokens: int, prompt_tokens: int, tiny: bool) -> dict:
    """Build, prefill, decode; one precision. Runs in its own process unless --tiny."""
    config = common.small_phi3_config() if tiny else common.phi35_config(layers)
    if not tiny:
        counts = common.lm_param_count(config)
        need = (counts["layer_linear"] + counts["lm_head"]) * WEIGHT_BYTES[precision] + counts["embed"] * 4
        need += 0.6e9 + (0.5e9 if precision in ("int8", "nf4") else 0)  # runtime; one fp32 layer converting
        if precision == "nf4":
            need += counts["lm_head"] * 3.4  # lm_head stays fp32
        common.need_memory(need / common.GB, f"{precision} at {layers} layers")
    load_before = common.load_avg()
    t = time.perf_counter()
    lm = common.build_real_lm(layers, precision, config=config)
    build_s = time.perf_counter() - t
    rss_built = common.rss_gb()
    ids = torch.randint(3, config.vocab_size - 1, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    kwargs = dict(do_sample=False, pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    with torch.no_grad():
        lm.generate(input_ids=ids[:, :8], max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up, short
        timer = common.TokenTimer()
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=timer,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - timer.start
    stats = common.rates(timer.times, out.shape[1] - ids.shape[1], total)
    kv_bytes = 2 if precision == "bf16" else 4
    per_token = common.bytes_per_token(lm, config, prompt_tokens + new_tokens // 2, kv_bytes)
    finite = bool(torch.isfinite(lm(input_ids=out[:, -4:]).logits).all())
    return dict(precision=precision, layers=config.num_hidden_layers, build_s=round(build_s, 2),
                rss_built_gb=round(rss_built, 2), peak_rss_gb=round(common.peak_rss_gb(), 2),
                prefill_s=stats["ttft_s"], prompt_tokens=prompt_tokens, new_tokens=stats["tokens"],
                decode_tokens_per_s=stats["decode_tokens_per_s"], bytes_per_token=per_token,
                finite_logits=finite, load_before=load_before, load_after=common.load_avg())


def paired(precisions: list[str], layers: int, rounds: int, new_tokens: int, tiny: bool) -> dict:
    """Both models in one process, decode timed in alternation: load drift hits both alike.

    On a shared machine the absolute speeds move with other jobs; the per-round ratio does not.
    """
    config = common.small_phi3_config() if tiny else common.phi35_config(layers)
    if not tiny:
        counts = common.lm_param_count(config)
        need = sum((counts["layer_linear"] + counts["lm_head"]) * WEIGHT_BYTES[p] + counts["embed"] * 4
                   for p in precisions) + 1.5e9
        common.need_memory(need / common.GB, f"{'+'.join(precisions)} at {layers} layers, together")
    models = {p: common.build_real_lm(layers, p, config=config) for p in precisions}
    ids = torch.randint(3, config.vocab_size - 1, (1, 16), generator=torch.Generator().manual_seed(0))
    kwargs = dict(do_sample=False, pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
                  max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    table = {p: [] for p in precisions}
    with torch.no_grad():
        for lm in models.values():
            lm.generate(input_ids=ids[:, :4], max_new_tokens=2, min_new_tokens=2, do_sample=False,
                        pad_token_id=config.pad_token_id)
        for _ in range(rounds):
            for p, lm in models.items():
                timer = common.TokenTimer()
                out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=timer, **kwargs)
                total = time.perf_counter() - timer.start
                table[p].append(common.rates(timer.times, out.shape[1] - ids.shape[1], total)["decode_tokens_per_s"])
    first, *others = precisions
    ratios = {o: [round(b / a, 3) for a, b in zip(table[first], table[o])] for o in others}
    return dict(layers=config.num_hidden_layers, rounds=rounds, new_tokens=new_tokens, decode_tokens_per_s=table,
                ratio_vs_first=ratios, load_after=common.load_avg())


def run_subprocess(precision: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.precision", "--worker", precision, "--layers", str(args.layers),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(tokens_for(precision, args)),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(precision=precision, error=" | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tokens_for(precision: str, args) -> int:
    return args.new_tokens or DEFAULT_TOKENS[precision]


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.set_threads(args.threads)

    if args.worker:  # one precision, in this (fresh) process; print its JSON line
        print(json.dumps(measure(args.worker, args.layers, tokens_for(args.worker, args), args.prompt_tokens,
                                 tiny=False)), flush=True)
        return {}

    precisions = [p for p in args.precisions.split(",") if p]
    bad = sorted(set(precisions) - set(PRECISIONS))
    if bad:
        parser.error(f"unknown precisions {bad}; choose from {PRECISIONS}")
    result = dict(bench="precision", machine=common.machine(), tiny=args.tiny,
                  layers=None if args.tiny else args.layers, threads=torch.get_num_threads())
    if args.paired:
        result["paired"] = paired(precisions, 2 if args.tiny else args.layers, args.rounds,
                                  args.new_tokens or 8, args.tiny)
        print(f"paired decode tokens/s, {result['paired']['rounds']} alternating rounds, "
              f"{result['paired']['layers']} layers (load before {result['machine']['load_avg']}, "
              f"after {result['paired']['load_after']}):")
        rows = [dict(precision=p, rounds=v, ratio_vs_first=result["paired"]["ratio_vs_first"].get(p))
                for p, v in result["paired"]["decode_tokens_per_s"].items()]
        print(common.table(rows, ["precision", "rounds", "ratio_vs_first"]))
        common.emit(result)
        return result
    gib = 0.125 if args.tiny else 1.0
    bandwidth = [common.memory_bandwidth(gib)]
    rows = []
    for precision in precisions:
        if args.tiny:
            row = measure(precision, 2, tokens_for(precision, args), args.prompt_tokens, tiny=True)
            row["peak_rss_clean"] = False  # in-process: one peak for all
        else:
            row = run_subprocess(precision, args)
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)
    bandwidth.append(common.memory_bandwidth(gib))
    read = max(b["read_gb_s"] for b in bandwidth)
    for row in rows:
        if row.get("decode_tokens_per_s"):
            row["limit_tokens_per_s"] = round(read * common.GB / row["bytes_per_token"], 3)
            row["fraction_of_limit"] = round(row["decode_tokens_per_s"] / row["limit_tokens_per_s"], 3)
            row["gb_per_token"] = round(row["bytes_per_token"] / common.GB, 3)
    result.update(bandwidth=dict(read_gb_s=read, runs=bandwidth), precisions=rows,
                  load_avg_end=common.load_avg())

    print(f"precision: {'toy Phi-3' if args.tiny else f'Phi-3.5-mini shapes, {args.layers} layers'}, "
          f"{args.prompt_tokens}-token prefill, read bandwidth {read} GB/s (best of "
          f"{', '.join(f'{k} {v}' for k, v in bandwidth[0]['probes_gb_s'].items())}, ...)")
    print(common.table(rows, ["precision", "build_s", "peak_rss_gb", "prefill_s", "new_tokens", "decode_tokens_per_s",
                              "gb_per_token", "limit_tokens_per_s", "fraction_of_limit", "load_before",
                              "load_after", "error"]))
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
