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


def test_int8_dynamic_on_request_for_cpu_inference(tiny_model, tmp_path):
    from mmft.pipeline import Pipeline
    from mmft.quantize import Int8Linear as DynamicLinear

    tiny_model.save_pretrained(tmp_path / "r")
    fp32, _ = loading.load_round(tmp_path / "r", device="cpu", dtype=torch.float32, quantize="none")
    int8, _ = loading.load_round(tmp_path / "r", device="cpu", dtype=torch.float32, quantize="int8")
    quantized = [n for n, m in int8.lm.named_modules() if isinstance(m, DynamicLinear)]
    assert any(n.endswith("qkv_proj.base_layer") for n in quantized) and any(n.endswith("lm_head") for n in quantized)
    assert not any("lora_" in n for n in quantized)
    ids = torch.tensor([int8.tokenizer("the red circle")["input_ids"]])
    with torch.no_grad():
        ref, got = fp32.lm(input_ids=ids).logits, int8.lm(input_ids=ids).logits
        with int8.adapter(False):
            off = int8.lm(input_ids=ids).logits
    assert (ref - got).abs().max() < 0.1 * ref.abs().max()  # close to fp32, not equal
    assert not torch.allclose(got, off)  # the adapter still toggles on the quantized base
    assert isinstance(Pipeline(int8).answer_text("Hello").final, str)
    with pytest.raises(ValueError, match="int8 dynamic quantization is for CPU inference"):
        loading.build_model(int8.cfg, device="cpu", quantize="int8", trainable=True)
    with pytest.raises(ValueError, match="quantize must be one of"):
        loading.resolve_quantize("fp8", torch.device("cpu"))
