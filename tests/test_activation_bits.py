"""int8's activation bits: 8 where fbgemm's kernel adds its products in int32 (AVX-512 VNNI), 7 where it adds
pairs in int16 and 8 bits would saturate (`mmft.quantize.activation_bits` probes the kernel).

Every test passes on any x86 CPU: the kernel without VNNI is also reached on a VNNI CPU by holding fbgemm to
AVX2 (`FBGEMM_ENABLE_INSTRUCTIONS`, in a subprocess), and checks that need VNNI say so and skip elsewhere.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmft import quantize
from mmft.quantize import Int8Linear

ROOT = Path(__file__).resolve().parents[1]


def saturating_linear() -> tuple[nn.Linear, torch.Tensor]:
    """Weights at the ends of int8 (+127, -128, and half of that) and activations that quantize to the
    top of their range: every pair of products is past int16 (255 x 127 x 2 = 64770), so a kernel
    that adds pairs in int16 halves the outputs."""
    linear = nn.Linear(256, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0], [-1.0], [0.5]]).expand(3, 256))
    return linear, torch.ones(2, 256)


def probe_in_subprocess(**env) -> tuple[int, float, float]:
    """(activation_bits(), default's worst relative error, 8 bits' worst relative error) on the saturating
    linear, in a fresh process with `env` (fbgemm reads its instruction limit once)."""
    code = (
        "import torch, tests.test_activation_bits as t\n"
        "from mmft.quantize import Int8Linear, activation_bits\n"
        "linear, x = t.saturating_linear(); want = linear(x)\n"
        "rel = lambda q: float(((q(x) - want).abs() / want.abs()).max())\n"
        "print(activation_bits(), rel(Int8Linear(linear)), rel(Int8Linear(linear, reduce_range=False)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONWARNINGS="ignore", **env),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    bits, default_rel, eight_bit_rel = done.stdout.split()[-3:]
    return int(bits), float(default_rel), float(eight_bit_rel)


def test_default_activation_bits_never_saturate_the_kernel():
    linear, x = saturating_linear()
    with torch.no_grad():
        want = linear(x)  # 256, -256, 128 in each row
        got = Int8Linear(linear)(x)
    # Exact but for the weights' rounding: 1.0 is 127.5 steps, stored as 127 or -128: 0.4 %. Saturation: ~50 %.
    assert ((got - want).abs() <= 0.01 * want.abs()).all()
    assert quantize.activation_bits() in (7, 8)


def test_without_vnni_the_probe_picks_seven_bits():
    """FBGEMM_ENABLE_INSTRUCTIONS=AVX2 holds fbgemm to its kernel for CPUs without AVX-512 VNNI (int16
    pairs), as on an older CPU: 8-bit activations must saturate there and the probe must choose 7."""
    bits, default_rel, eight_bit_rel = probe_in_subprocess(FBGEMM_ENABLE_INSTRUCTIONS="AVX2")
    assert eight_bit_rel > 0.3  # the kernel really saturates 8 bits (measured 0.50)
    assert (bits, default_rel <= 0.01) == (7, True)


@pytest.mark.skipif(not torch.cpu._is_vnni_supported() or "FBGEMM_ENABLE_INSTRUCTIONS" in os.environ,
                    reason="needs AVX-512 VNNI, with fbgemm free to use it")
def test_with_vnni_the_probe_picks_eight_bits():
    """What the docs promise: on an AVX-512 VNNI CPU (Intel Xeons since Cascade Lake, AMD since Zen 4) int8
    takes 8-bit activations, and they are exact on the saturating linear."""
    bits, default_rel, eight_bit_rel = probe_in_subprocess()
    assert (bits, default_rel <= 0.01, eight_bit_rel <= 0.01) == (8, True, True)


def test_the_default_takes_the_probed_bits_and_eight_halve_the_error():
    torch.manual_seed(0)
    linear = nn.Linear(1024, 256)
    x = torch.randn(16, 1024)
    x[:, :8] *= 20  # outlier channels, as an LLM's activations have: they set the quantization step
    with torch.no_grad():
        ref = linear(x)
        err = {bits: float((Int8Linear(linear, reduce_range=bits == 7)(x) - ref).abs().max()) for bits in (7, 8)}
        default = float((Int8Linear(linear)(x) - ref).abs().max())
    assert default == err[quantize.activation_bits()]
    if quantize.activation_bits() == 8:  # without VNNI 8 bits saturate here: that is why the probe says 7
        # Measured 0.5x (one more bit halves the activation step, which dominates); bound 0.75x.
        assert err[8] < 0.75 * err[7]


def test_the_probe_ignores_the_default_dtype():
    """The kernel takes float32 only: a probe built in the default dtype failed (and every Int8Linear
    with it) once a user had set bf16 as the default."""
    quantize.activation_bits.cache_clear()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        bits = quantize.activation_bits()
    finally:
        torch.set_default_dtype(default)
    assert bits in (7, 8) and bits == quantize.activation_bits()
