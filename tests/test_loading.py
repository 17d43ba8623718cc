"""Device, dtype and quantization choices."""

import pytest
import torch

from mmft import loading


def test_dtype_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: False)
    assert loading.pick_dtype(cpu) == torch.float32
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: True)
    assert loading.pick_dtype(cpu) == torch.bfloat16
    assert loading.pick_dtype(torch.device("cuda")) == torch.bfloat16
    assert loading.pick_dtype(cpu, "fp32") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        loading.pick_dtype(cpu, "fp8")


def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.pick_device().type == "cpu"
    assert loading.pick_device("cpu").type == "cpu"


def test_cpu_default_is_unquantized_and_4bit_is_available_on_request(tiny_config):
    from bitsandbytes.nn import Linear4bit

    lm, _ = loading.load_lm(tiny_config, torch.device("cpu"), torch.float32)
    assert not any(isinstance(m, Linear4bit) for m in lm.modules())
    q, _ = loading.load_lm(tiny_config, torch.device("cpu"), torch.float32, quantize=True)
    layers = [m for m in q.modules() if isinstance(m, Linear4bit)]
    assert layers and layers[0].weight.quant_type == "nf4"
