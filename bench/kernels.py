"""One Phi-3.5-mini decoder layer's four linears through each CPU kernel torch has: ms per layer at
decode (M = 1 row) and prefill (M = 80), and the error against fp32.

    python -m bench.kernels --threads 2            # real shapes
    python -m bench.kernels --tiny                 # toy shapes (tests)

Why: decode reads every weight once per token, so the kernel that reads the fewest bytes at memory
speed wins. int8 (fbgemm, what mmft serves) reads 1 byte a weight; torch's int4 kernel half that,
but was compute-bound on a CPU without avx512_bf16 (docs/benchmarks.md). oneDNN's int8 (AMX on
CPUs that have it) and 7-bit activations (torch's dynamic Linear) are the alternatives to mmft's
int8. This script asks the same question of any CPU, AMX ones included, in one run.

The layer is copied and the calls cycle through the copies, so that no kernel is timed from the
CPU's last-level cache: each kernel gets at least `--copies` copies and enough for twice the L3 (read
from sysfs; a server's can hold 300 MB, five int4 layers). Error = max |y - y_fp32| / max |y_fp32| over
the layer's four outputs at M = 80, same random weights.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench import POSITIVE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=POSITIVE, default=2)
    parser.add_argument("--tiny", action="store_true", help="toy shapes (tests)")
    parser.add_argument("--copies", type=POSITIVE, default=4, help="layer copies cycled through, at least (more where "
                                                              "needed to exceed twice the L3)")
    parser.add_argument("--repeats", type=POSITIVE, default=5, help="timed passes over the copies")
    parser.add_argument("--prefill", type=POSITIVE, default=80, help="rows of the prefill call")
    return parser


if __name__ == "__main__":  # flags before torch: --help and a mistyped flag answer at once
    build_parser().parse_args()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import common  # noqa: E402

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


def _int8_weight_only(w: torch.Tensor):
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8)  # [N]
    return (w / scale[:, None]).round().to(torch.int8), scale.bfloat16()


def _onednn_int8(w: torch.Tensor):
    """The same int8 weights packed for oneDNN, torch's other x86 int8 library (AMX where present)."""
    from mmft.quantize import quantize_rows

    engine, torch.backends.quantized.engine = torch.backends.quantized.engine, "onednn"
    try:
        return torch.ops.quantized.linear_prepack(quantize_rows(w), None)  # calls dispatch on the packing
    finally:
        torch.backends.quantized.engine = engine


def kernels() -> dict:
    """name -> (prepare(w [N, K] fp32), call(x [M, K] fp32, prepared) -> y [M, N])."""
    from mmft.quantize import Int8Linear, activation_bits, probe_activation_bits

    bits, onednn_bits = activation_bits(), probe_activation_bits(_onednn_int8)  # oneDNN's kernel, probed alike
    out = {
        "fp32 F.linear": (lambda w: w, lambda x, p: F.linear(x, p)),
        "bf16 F.linear (oneDNN; AMX where present)": (lambda w: w.bfloat16(), lambda x, p: F.linear(x.bfloat16(), p)),
        f"int8 fbgemm (mmft Int8Linear, {bits}-bit act.)": (Int8Linear.from_tensors, lambda x, p: p(x)),
        "int8 fbgemm, 7-bit act. (torch's dynamic Linear)": (
            lambda w: Int8Linear.from_tensors(w, reduce_range=True), lambda x, p: p(x)),
        f"int8 oneDNN, {onednn_bits}-bit act.": (
            _onednn_int8, lambda x, p: torch.ops.quantized.linear_dynamic(x, p, onednn_bits == 7)),
        "int8 weight-only _weight_int8pack_mm, bf16 act.": (
            _int8_weight_only, lambda x, p: torch._weight_int8pack_mm(x.bfloat16(), *p)),
    }
    if hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        out[f"int4 g{GROUP} _weight_int4pack_mm_for_cpu, bf16 act."] = (
            int4_pack, lambda x, p: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), p[0], GROUP, p[1]))
    return out


def l3_bytes() -> int:
    """The last-level cache's size from sysfs (0 where it cannot be read)."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError, IndexError, KeyError):
        return 0


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = common.set_threads(args.threads)
    shapes = TINY if args.tiny else REAL
    l3 = 0 if args.tiny else l3_bytes()  # toy shapes check the kernels, not their speed

    def layer(i: int) -> dict:  # copy i's fp32 weights, the same for every kernel
        gen = torch.Generator().manual_seed(i)
        return {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}  # [N, K]

    gen = torch.Generator().manual_seed(1234)
    xs = {m: {name: torch.randn(m, k, generator=gen) for name, (_, k) in shapes.items()} for m in (1, args.prefill)}
    first = layer(0)
    ref = {name: F.linear(xs[args.prefill][name], w) for name, w in first.items()}  # [M, N]

    rows, load_before = [], common.load_avg()
    for kernel, (prepare, fn) in kernels().items():
        prepared = [{name: prepare(w) for name, w in first.items()}]
        weight_bytes = sum(p.numel() * p.element_size() for p in _tensors(prepared[0]))
        copies = max(args.copies, -(-2 * l3 // weight_bytes))
        prepared += [{name: prepare(w) for name, w in layer(i).items()} for i in range(1, copies)]
        err = max(float((fn(xs[args.prefill][n], prepared[0][n]).float() - ref[n]).abs().max() / ref[n].abs().max())
                  for n in shapes)
        row = dict(kernel=kernel, error=round(err, 4), copies=copies)
        for m, label in ((1, "decode_ms"), (args.prefill, "prefill_ms")):
            for one in prepared:  # warm-up: one pass
                for n in shapes:
                    fn(xs[m][n], one[n])
            per_layer = []
            for _ in range(args.repeats):
                for one in prepared:
                    t = time.perf_counter()
                    for n in shapes:
                        fn(xs[m][n], one[n])
                    per_layer.append((time.perf_counter() - t) * 1e3)
            row[label] = round(statistics.median(per_layer), 3)
        row["weight_mb"] = round(weight_bytes / 1e6, 1)
        row["decode_gb_per_s"] = round(weight_bytes / 1e6 / row["decode_ms"], 1)
        rows.append(row)
        del prepared

    print(common.table(rows, ["kernel", "decode_ms", "prefill_ms", "weight_mb", "decode_gb_per_s", "error", "copies"]))
    result = dict(bench="kernels", machine=common.machine(), threads=threads, tiny=args.tiny, shapes=shapes,
                  prefill_rows=args.prefill, l3_mb=round(l3 / 1e6, 1), rows=rows, load_before=load_before,
                  load_after=common.load_avg())
    common.emit(result)
    return result


def _tensors(prepared: dict) -> list[torch.Tensor]:
    """The bytes a kernel reads per layer: its weight tensors (int8: the unpacked int8 values)."""
    out = []
    for p in prepared.values():
        if isinstance(p, (torch.nn.Module, torch.ScriptObject)):
            w, _ = p.unpack() if isinstance(p, torch.nn.Module) else torch.ops.quantized.linear_unpack(p)
            out.append(w.int_repr() if w.is_quantized else w)
        elif isinstance(p, tuple):
            out.extend(p)
        else:
            out.append(p)
    return out


if __name__ == "__main__":
    main()
