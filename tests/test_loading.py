"""Device, dtype and quantization choices."""

import subprocess
import sys
from pathlib import Path

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
    for bad in (torch.int8, torch.qint8, 16):
        with pytest.raises(ValueError, match="dtype must be a float dtype"):
            loading.pick_dtype(cpu, bad)


def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.pick_device().type == "cpu"
    assert loading.pick_device("cpu").type == "cpu"


def test_cpu_default_is_unquantized_and_4bit_is_available_on_request(tiny_config):
    from bitsandbytes.nn import Linear4bit

    lm, _ = loading.load_lm(tiny_config, torch.device("cpu"), torch.float32)
    assert not any(isinstance(m, Linear4bit) for m in lm.modules())
    q, _ = loading.load_lm(tiny_config, torch.device("cpu"), torch.float32, quantize="nf4")
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


def test_quantize_has_one_spelling():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [loading.resolve_quantize(q, cpu) for q in ("nf4", "int8", "none", None)] == ["nf4", "int8", "none", "none"]
    assert loading.resolve_quantize(None, cuda) == "nf4"
    # neither bitsandbytes nor fbgemm's int8 kernels run on mps: it serves unquantized (int8 was refused)
    assert loading.resolve_quantize(None, torch.device("mps"), inference=True) == "none"
    assert loading.resolve_quantize(None, cpu, inference=True) == "int8"
    for old in (True, False, "auto", "yes", "no"):  # the old spellings are refused, with the allowed ones
        with pytest.raises(ValueError, match=r"quantize must be one of \('nf4', 'int8', 'none'\) or None"):
            loading.resolve_quantize(old, cpu)
    from mmft.config import RunArguments

    with pytest.raises(ValueError, match="quantize must be one of"):
        RunArguments(quantize="yes")


def test_build_model_leaves_the_callers_config_alone(tiny_config):
    from dataclasses import asdict

    before = asdict(tiny_config)
    model = loading.build_model(tiny_config, device="cpu", dtype=torch.float32)
    assert asdict(tiny_config) == before and tiny_config.mp_input_dim is None
    assert (model.cfg.mp_input_dim, model.cfg.mp_hidden_dim, model.cfg.mp_output_dim) == (32, 64, 64)
    assert model.cfg is not tiny_config


def test_old_round_loads_with_the_features_it_was_trained_on(tmp_path):
    """A round saved before the feature-choice keys existed (the demo round's config.json without them,
    as it was committed before): last layer, CLS kept (50 tokens)."""
    import json
    import shutil
    from pathlib import Path

    from mmft.config import MMFTConfig, load_config

    source = Path(__file__).resolve().parents[1] / "demo"
    shutil.copytree(source / "round", tmp_path / "round")
    (tmp_path / "base").symlink_to(source / "base", target_is_directory=True)  # the round names ../base/...
    demo = tmp_path / "round"
    data = json.loads((demo / "config.json").read_text())
    for key in ("vit_feature_layer", "vit_feature_select_strategy"):
        data["mmft"].pop(key, None)
    (demo / "config.json").write_text(json.dumps(data))
    cfg, _ = load_config(demo)
    assert (cfg.vit_feature_layer, cfg.vit_feature_select_strategy) == (-1, "full")
    assert (MMFTConfig().vit_feature_layer, MMFTConfig().vit_feature_select_strategy) == (-2, "default")
    model, _ = loading.load_round(demo, device="cpu", dtype=torch.float32)
    assert model.vision.num_tokens == 50 and model.cfg.mp_input_dim == model.vision.vision_model.config.hidden_size
    # and a config saved now keeps its choice
    from mmft.config import save_config

    save_config(tmp_path, MMFTConfig(vit_feature_mode="patch"))
    assert load_config(tmp_path)[0].vit_feature_select_strategy == "default"


def test_peft_reading_a_deprecated_transformers_property_warns_no_user():
    """Every PeftModel peft 0.21 builds reads transformers 5's deprecated `is_gradient_checkpointing`: a
    FutureWarning on each app start. Built here as the app builds one; other FutureWarnings still show."""
    code = ("import warnings, mmft.loading\n"
            "from peft import LoraConfig, get_peft_model\n"
            "from transformers import Phi3Config, Phi3ForCausalLM\n"
            "lm = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
            " num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))\n"
            "get_peft_model(lm, LoraConfig(r=2, target_modules=['qkv_proj']))\n"
            "assert lm.is_activation_checkpointing is False\n"
            "warnings.warn('another deprecation', FutureWarning)\n")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is_gradient_checkpointing" not in done.stderr and "another deprecation" in done.stderr


def test_the_bitsandbytes_kernels_hint_is_dropped_on_every_cpu():
    """peft imports bitsandbytes, which logs on CPUs with avx512_bf16 only that its CPU 4-bit kernel wants
    the `kernels` package (mmft never runs 4-bit on a CPU). The record is logged here as bitsandbytes
    logs it, so the test can fail on any CPU: it is dropped, the logger's other records are not."""
    code = ("import logging, mmft.loading\n"
            "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
            "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: No module named kernels')\n"
            "log.warning('another bitsandbytes warning')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels-community" not in done.stderr and "another bitsandbytes warning" in done.stderr


def test_a_round_naming_a_base_that_is_nowhere_says_so_and_only_for_what_it_loads(tmp_path):
    import json
    import shutil

    demo = Path(__file__).resolve().parent.parent / "demo"
    shutil.copytree(demo / "round", tmp_path / "round")
    config = json.loads((tmp_path / "round" / "config.json").read_text())
    config["mmft"].update(lm_model_id=str(demo / "base" / "lm"), vit_model_id=str(tmp_path / "gone" / "clip"))
    (tmp_path / "round" / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError) as err:
        loading.load_round(tmp_path / "round", device="cpu", dtype=torch.float32, quantize="none")
    assert str(err.value) == (f"{tmp_path / 'round' / 'config.json'} names vit_model_id '{tmp_path / 'gone' / 'clip'}' "
                              "is neither a model folder on disk nor a Hub repo id (OWNER/NAME)")
    model, _ = loading.load_round(tmp_path / "round", device="cpu", dtype=torch.float32, quantize="none",
                                  with_vision=False)  # CLIP is not loaded: its folder is not needed
    assert model.vision is None
