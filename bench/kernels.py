"""One Phi-3.5-mini decoder layer's four linears through each CPU kernel torch has: ms per layer at
decode (M = 1 row) and prefill (M = 80), and the error against fp32.

    python -m bench.kernels --threads 2            # real shapes
    python -m bench.kernels --tiny                 # toy shapes (tests)

Why: decode reads every weight once per token, so the kernel that reads the fewest bytes at memory
speed wins. int8 (fbgemm, what mmft serves) reads 1 byte a weight; torch's int4 kernel half that,
but was compute-bound on a CPU without avx512_bf16 (docs/benchmarks.md). This script asks the same
question of any CPU, AMX ones included, in one run.

The layer is copied `--copies` times and the calls cycle through the copies, so that no kernel is
timed from the CPU's last-level cache (one int4 layer, 57 MB, fits a server's L3). Error = max
|y - y_fp32| / max |y_fp32| over the layer's four outputs at M = 80, same random weights.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench import common

# Phi-3.5-mini: hidden 3072, intermediate 8192, 32 heads of 96 (qkv fused, gate_up fused).
REAL = dict(qkv_proj=(9216, 3072), o_proj=(3072, 3072), gate_up_proj=(16384, 3072), down_proj=(3072, 8192))
TINY = dict(qkv_proj=(384, 128), o_proj=(128, 128), gate_up_proj=(512, 128), down_proj=(128, 256))
GROUP = 128  # int4 group size (K must be a multiple)


def int4_pack(w: torch.Tensor):
    """[N, K] float -> torch's CPU int4 pack + [K/G, N, 2] bf16 (scale, zero): asymmetric per group,
    as gpt-fast / torchao's tinygemm layout (dequant = (q - 8) * scale + zero)."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)  # [N, K/G, G]
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)  # [N, K] in 0..15
    zero = lo + 8 * scale
    sz = torch.cat([scale, zero], -1).permute(1, 0, 2).contiguous().to(torch.bfloat16)  # [K/G, N, 2]
    return torch._convert_weight_to_int4pack_for_cpu(q, 2), sz


def kernels(w: torch.Tensor):
    """name -> (prepared weight, fn(x_fp32, prepared) -> y). Missing ops are skipped."""
    from mmft.quantize import Int8Linear

    out = {
        "fp32 F.linear": (w, lambda x, p: F.linear(x, p)),
        "bf16 F.linear (oneDNN; AMX where present)": (w.bfloat16(), lambda x, p: F.linear(x.bfloat16(), p)),
        "int8 fbgemm (mmft Int8Linear)": (Int8Linear.from_tensors(w), lambda x, p: p(x)),
    }
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
    w8 = (w / scale[:, None]).round().to(torch.int8)
    out["int8 weight-only _weight_int8pack_mm, bf16 act."] = (
        (w8, scale.bfloat16()), lambda x, p: torch._weight_int8pack_mm(x.bfloat16(), *p))
    try:
        out[f"int4 g{GROUP} _weight_int4pack_mm_for_cpu, bf16 act."] = (
            int4_pack(w), lambda x, p: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), p[0], GROUP, p[1]))
    except (RuntimeError, AttributeError) as e:  # an op this torch build lacks
        print(f"int4 skipped: {e}".splitlines()[0])
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="toy shapes (tests)")
    parser.add_argument("--copies", type=int, default=4, help="layer copies cycled through (defeats the L3)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the copies")
    parser.add_argument("--prefill", type=int, default=80, help="rows of the prefill call")
    args = parser.parse_args(argv)
    threads = common.set_threads(args.threads)
    shapes = TINY if args.tiny else REAL
    gen = torch.Generator().manual_seed(0)
    copies = [{name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}
              for _ in range(args.copies)]  # [N, K] fp32 each
    xs = {m: {name: torch.randn(m, k, generator=gen) for name, (_, k) in shapes.items()} for m in (1, args.prefill)}
    ref = {name: F.linear(xs[args.prefill][name], w) for name, w in copies[0].items()}  # [M, N]

    rows, load_before = [], common.load_avg()
    names = list(kernels(copies[0]["o_proj"]))
    for kernel in names:
        prepared = [{name: kernels(w)[kernel][0] for name, w in layer.items()} for layer in copies]
        fn = kernels(copies[0]["o_proj"])[kernel][1]
        err = max(float((fn(xs[args.prefill][n], prepared[0][n]).float() - ref[n]).abs().max() / ref[n].abs().max())
                  for n in shapes)
        row = dict(kernel=kernel, error=round(err, 4))
        for m, label in ((1, "decode_ms"), (args.prefill, "prefill_ms")):
            for layer in prepared:  # warm-up: one pass
                for n in shapes:
                    fn(xs[m][n], layer[n])
            per_layer = []
            for _ in range(args.repeats):
                for layer in prepared:
                    t = time.perf_counter()
                    for n in shapes:
                        fn(xs[m][n], layer[n])
                    per_layer.append((time.perf_counter() - t) * 1e3)
            row[label] = round(statistics.median(per_layer), 3)
        weight_bytes = sum(p.numel() * p.element_size() for p in _tensors(prepared[0]))
        row["weight_mb"] = round(weight_bytes / 1e6, 1)
        row["decode_gb_per_s"] = round(weight_bytes / 1e6 / row["decode_ms"], 1)
        rows.append(row)
        del prepared

    print(common.table(rows, ["kernel", "decode_ms", "prefill_ms", "weight_mb", "decode_gb_per_s", "error"]))
    result = dict(bench="kernels", machine=common.machine(), threads=threads, tiny=args.tiny, shapes=shapes,
                  prefill_rows=args.prefill, copies=args.copies, rows=rows, load_before=load_before,
                  load_after=common.load_avg())
    common.emit(result)
    return result


def _tensors(prepared: dict) -> list[torch.Tensor]:
    """The bytes a kernel reads per layer: its weight tensors (int8: the unpacked int8 values)."""
    out = []
    for p in prepared.values():
        if isinstance(p, torch.nn.Module):
            w, _ = p.unpack()
            out.append(w.int_repr() if w.is_quantized else w)
        elif isinstance(p, tuple):
            out.extend(p)
        else:
            out.append(p)
    return out


if __name__ == "__main__":
    main()
