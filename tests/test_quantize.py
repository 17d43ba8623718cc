"""int8 CPU quantization under LoRA, and the CPU path the loading defaults pick.

Tolerances: symmetric per-channel int8 rounds each weight by at most half a step, scale/2 =
max|w_row| / 255, and activations are quantized per call to 8 bits, or 7 where fbgemm's kernel
would saturate (`activation_bits`, tests/test_activation_bits.py; the bounds below assume 7): step =
(max - min) / 127. For one linear the output error is therefore a small fraction of the largest
output; through a whole (toy) model the errors add up over layers, so the model-level check is looser
and says so. Exactness is asserted where it holds: the adapter toggle, the same base seen from several
adapters, int8 against itself.
"""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from mmft import loading, quantize
from mmft.quantize import Int8Linear, int8_linears, quantize_int8_

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                  task_type="CAUSAL_LM")


def toy_lm(dtype=torch.float32, seed=0):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=256, vocab_size=300, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(config).to(dtype).eval()


def with_lora(lm, seed=1):
    peft = get_peft_model(lm, LORA)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:  # zero B would make the adapter the identity
                p.copy_(torch.empty(p.shape).uniform_(-0.05, 0.05, generator=generator).to(p.dtype))
    return peft.eval()


IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])


def test_one_linear_close_to_float_within_the_int8_bound():
    torch.manual_seed(0)
    linear = nn.Linear(512, 256)
    x = torch.randn(3, 7, 512)
    ref = linear(x)
    q = Int8Linear(linear)
    got = q(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # Activations dominate: 7 bits over randn's range (~7) is a step of ~0.055, rounding error std ~0.016;
    # summed over 512 inputs times weights of std ~0.026 that is an output error std ~0.009, whose max
    # over 5376 outputs (~4 sigma) is ~2.5 % of the largest output (~1.5). Measured 1.9 %; bound 5 %.
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert not torch.equal(got, ref)  # it really is quantized
    assert q.weight.dtype == torch.qint8 and tuple(q.weight.shape) == (256, 512)  # the stand-in PEFT reads
    weight, bias = q.unpack()
    assert weight.dtype == torch.qint8 and tuple(weight.shape) == (256, 512)
    assert torch.equal(q.bias, linear.bias.detach()) and torch.equal(bias, linear.bias.detach())
    # the values: per-channel symmetric, every weight within half a step of the float one. A row's
    # largest weight sits exactly half a step away (127.5 -> 127 or -128); |w| is at most 255 half-steps,
    # so a few fp32 ulps of w and of the dequantized product are ~1e-5 of a half-step: slack 1e-4.
    steps = weight.q_per_channel_scales().float().unsqueeze(1)  # [out, 1]
    assert ((weight.dequantize() - linear.weight.detach()).abs() <= steps / 2 * (1 + 1e-4)).all()
    assert isinstance(q, nn.Linear) and q.in_features == 512 and q.out_features == 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_quantized_in_chunks_exactly_as_in_one_piece(dtype):
    """quantize_rows converts a few rows at a time (no whole fp32 copy): the same int8 values and
    scales as torch's per-channel quantization of the whole fp32 weight, the observer's scale rule."""
    torch.manual_seed(0)
    weight = torch.randn(2 * quantize.ROWS_PER_CHUNK + 5, 48).to(dtype)  # [out, in], a ragged last chunk
    weight[3] = 0  # an all-zero row: the scale's lower clamp
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.5).clamp(min=1e-8).double()
    want = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    got = quantize.quantize_rows(weight)
    assert got.dtype == torch.qint8 and got.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    assert torch.equal(got.int_repr(), want.int_repr())
    assert torch.equal(got.q_per_channel_scales(), want.q_per_channel_scales())
    assert torch.equal(got.q_per_channel_zero_points(), want.q_per_channel_zero_points())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_float_dtype_in_and_out(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(dtype)
    q = Int8Linear(linear)
    x = torch.randn(2, 64).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    # int8's error as above (< 5 %), plus the input's and output's own rounding in bf16/fp16 (2^-8, 2^-11)
    assert (y.float() - linear(x).float()).abs().max() < 0.06 * linear(x).float().abs().max()


def test_one_row_as_a_vector_like_nn_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q, x = Int8Linear(linear), torch.randn(64)
    assert q(x).shape == linear(x).shape == (32,)
    assert torch.equal(q(x), q(x[None])[0])  # the same row as a batch of one


def test_an_adapter_on_lm_head_attached_first_still_gets_an_int8_base():
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(toy_lm(torch.float32), LoraConfig(r=4, target_modules=["o_proj", "lm_head"]))
    assert quantize_int8_(peft) == 2 * 4 + 1
    assert isinstance(peft.get_base_model().lm_head.base_layer, Int8Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_under_lora_toggle_exact_and_lora_untouched(dtype):
    ref_lm = toy_lm(dtype)
    with torch.no_grad():
        ref = ref_lm(input_ids=IDS).logits.float()
    peft = with_lora(toy_lm(dtype))
    lora_before = {n: p.detach().clone() for n, p in peft.named_parameters() if "lora_" in n}
    count = quantize_int8_(peft, dtype)

    names = int8_linears(peft)
    assert count == len(names) == 2 * 4 + 1  # 4 linears per layer + lm_head
    assert all(n.endswith("base_layer") for n in names if "layers" in n) and any(n.endswith("lm_head") for n in names)
    assert not any("lora_" in n for n in names)
    assert not any(type(m) is nn.Linear and "lora_" not in n for n, m in peft.named_modules())
    for n, p in peft.named_parameters():
        if "lora_" in n:  # LoRA itself: float, unchanged
            assert p.is_floating_point() and torch.equal(p, lora_before[n])
    assert peft.get_base_model().model.embed_tokens.weight.dtype == dtype

    with torch.no_grad():
        on = peft(input_ids=IDS).logits
        with peft.disable_adapter():
            off = peft(input_ids=IDS).logits
        off_again = quantize_module_reference(peft)
    assert on.dtype == dtype
    assert torch.equal(off, off_again)  # adapter off is exactly the quantized base, every time
    assert not torch.allclose(on, off)  # and on really adds the adapter
    # Toy model, two layers: the per-linear error above compounds through attention, the MLP and
    # lm_head; measured 3.7 % (fp32) and 3.9 % (bf16) of the largest logit; bound 10 %.
    assert (off.float() - ref).abs().max() < 0.10 * ref.abs().max()


def quantize_module_reference(peft):
    with peft.disable_adapter():
        return peft(input_ids=IDS).logits


def test_adapters_attach_after_quantization_and_share_one_base(tmp_path):
    """Rounds loaded later (PEFT named adapters) wrap the int8 base: one base, several adapters."""
    first = with_lora(toy_lm(), seed=1)
    first.save_pretrained(tmp_path / "a")
    second = with_lora(toy_lm(), seed=2)
    second.save_pretrained(tmp_path / "b")

    base = toy_lm()
    quantize_int8_(base)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "a"), adapter_name="a")
    peft.load_adapter(str(tmp_path / "b"), adapter_name="b")
    layer = peft.get_base_model().model.layers[0].self_attn.qkv_proj
    assert isinstance(layer.base_layer, Int8Linear) and set(layer.lora_A) == {"a", "b"}
    with torch.no_grad():
        peft.set_adapter("a")
        on_a = peft(input_ids=IDS).logits
        with peft.disable_adapter():
            off_a = peft(input_ids=IDS).logits
        peft.set_adapter("b")
        on_b = peft(input_ids=IDS).logits
        with peft.disable_adapter():
            off_b = peft(input_ids=IDS).logits
    assert torch.equal(off_a, off_b)  # one base under both
    assert not torch.allclose(on_a, on_b)

    # The same adapter attached before quantization gives the same model (order does not matter).
    before = PeftModel.from_pretrained(toy_lm(), str(tmp_path / "a"))
    quantize_int8_(before)
    with torch.no_grad():
        assert torch.equal(before(input_ids=IDS).logits, on_a)


def test_cpu_path_defaults(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):  # int8 on CPUs with and without native bf16
        monkeypatch.setattr(loading, "cpu_has_bf16", lambda native=native: native)
        assert loading.resolve_quantize(None, cpu, inference=True) == "int8"
        assert loading.resolve_quantize(None, cpu) == "none"  # build_model for training, projector-only too
    assert loading.resolve_quantize(None, torch.device("cuda")) == "nf4"
    assert loading.resolve_quantize("none", cpu) == "none"
    for amx, dtype in ((False, torch.float32), (True, torch.bfloat16)):  # measured: docs/benchmarks.md
        monkeypatch.setattr(quantize, "cpu_has_amx", lambda amx=amx: amx)
        assert quantize.pick_cpu_path().quantize == "int8" and quantize.pick_cpu_path().dtype == dtype
        assert quantize.pick_cpu_path(trainable=True).quantize == "none"
        assert quantize.pick_cpu_path(trainable=True).dtype is None  # pick_dtype decides


def test_cpu_has_amx_asks_torch_not_onednn(monkeypatch):
    """oneDNN says "bf16 supported" on any AVX-512 core, where it emulates bf16; the AMX probe is
    torch's cpuinfo one, and a torch without it (or failing) means no AMX, never an error."""
    monkeypatch.undo()  # the real cpu_has_amx (conftest pins it to False)
    assert isinstance(quantize.cpu_has_amx(), bool)
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: True)  # what oneDNN says on an AVX-512 Xeon
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert quantize.cpu_has_amx() is False and quantize.pick_cpu_path().dtype == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert quantize.cpu_has_amx() is True and quantize.pick_cpu_path().dtype == torch.bfloat16

    def broken():
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken)
    assert quantize.cpu_has_amx() is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert quantize.cpu_has_amx() is False


def test_cpu_default_dtype_follows_amx(tiny_model, tmp_path, monkeypatch):
    """No dtype and no quantization asked: int8 linears with float32 around them on a CPU without AMX
    (whatever oneDNN says about bf16: pick_dtype alone would say bf16), bf16 around them with AMX;
    asked for, a dtype is kept."""
    tiny_model.save_pretrained(tmp_path / "r")
    for amx, native in ((False, True), (False, False), (True, True)):
        monkeypatch.setattr(quantize, "cpu_has_amx", lambda amx=amx: amx)
        monkeypatch.setattr(loading, "cpu_has_bf16", lambda native=native: native)
        model, _ = loading.load_round(tmp_path / "r", device="cpu")
        assert int8_linears(model.lm)
        want = torch.bfloat16 if amx else torch.float32
        # the base's floats (embeddings, norms, CLIP); the projector stays float32 and PEFT keeps
        # LoRA in float32 under a bf16 base (autocast_adapter_dtype)
        floats = {p.dtype for n, p in model.named_parameters()
                  if p.is_floating_point() and "lora_" not in n and not n.startswith("projector.")}
        assert floats == {want}, (amx, floats)
        assert loading.pick_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    model, _ = loading.load_round(tmp_path / "r", device="cpu", dtype="float32")
    assert int8_linears(model.lm) and model.lm.get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_round_int8_with_every_dtype(tiny_model, tmp_path, dtype):
    """`quantize="int8"` (and the CPU default) with each dtype: no 'expected scalar type' error."""
    from mmft.pipeline import Pipeline

    tiny_model.save_pretrained(tmp_path / "r")
    model, _ = loading.load_round(tmp_path / "r", device="cpu", dtype=dtype)  # the CPU default: int8
    assert int8_linears(model.lm)
    assert model.lm.get_input_embeddings().weight.dtype == dtype
    answer = Pipeline(model).answer_text("Hello")
    assert isinstance(answer.final, str)
    trained = loading.build_model(model.cfg, device="cpu", dtype=torch.float32, trainable=True)
    assert not int8_linears(trained.lm)  # training on CPU stays float
    frozen = loading.build_model(model.cfg, device="cpu", dtype=torch.float32)  # projector-only training
    assert not int8_linears(frozen.lm)


# -- int8 straight from the checkpoint (load_int8_lm) ---------------------------------------------
def saved_lm(tiny_dir, folder, tie=False, dtype=torch.float32, max_shard_size=None, longrope=False):
    """The tiny kit's LM config, re-seeded, optionally tied / bf16 / sharded / Phi-3.5's longrope; saved."""
    from transformers import AutoConfig, Phi3ForCausalLM

    config = AutoConfig.from_pretrained(tiny_dir / "lm")
    config.tie_word_embeddings = tie
    if longrope:  # Phi-3.5-mini's rope: two factor lists and an original context the rotary buffers depend on
        half = config.hidden_size // config.num_attention_heads // 2
        config.rope_parameters = dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=1.0,
                                      original_max_position_embeddings=256,
                                      short_factor=[1.0 + i / half for i in range(half)],
                                      long_factor=[2.0 + i / half for i in range(half)])
    torch.manual_seed(3)
    lm = Phi3ForCausalLM(config).to(dtype)
    lm.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return folder


def old_path(folder, dtype):
    """What build_model did before: transformers' own load (checkpoint dtype), then quantize_int8_."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    quantize_int8_(lm, dtype)
    return lm


def assert_same_int8_model(old, new):
    """Exact: module types, int8 values and scales of every linear, every parameter and buffer, configs."""
    mo, mn = dict(old.named_modules()), dict(new.named_modules())
    assert mo.keys() == mn.keys()
    for name, m in mo.items():
        assert type(m) is type(mn[name]), name
        if isinstance(m, Int8Linear):
            a, b = m.unpack()[0], mn[name].unpack()[0]
            assert torch.equal(a.int_repr(), b.int_repr()), name
            assert torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales()), name
            assert (m.bias is None) == (mn[name].bias is None) and (m.bias is None or torch.equal(m.bias, mn[name].bias))
    for get in (lambda lm: dict(lm.named_parameters()), lambda lm: dict(lm.named_buffers())):
        to, tn = get(old), get(new)
        assert to.keys() == tn.keys()
        for k in to:  # the rotary buffers included: real, not meta, and equal
            assert not tn[k].is_meta and tn[k].dtype == to[k].dtype and torch.equal(tn[k], to[k]), k
    assert old.config.to_dict() == new.config.to_dict()
    assert old.generation_config.to_dict() == new.generation_config.to_dict()
    assert not new.training


VARIANTS = {
    "untied": {},
    "tied": dict(tie=True),
    "sharded": dict(max_shard_size="300KB"),  # the 8 MB embedding alone in one shard, layers in others
    "bf16-longrope": dict(dtype=torch.bfloat16, longrope=True),  # Phi-3.5 ships bf16, with longrope
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_int8_load_equals_transformers_load_then_quantize(tiny_dir, tmp_path, variant, dtype):
    folder = saved_lm(tiny_dir, tmp_path / "lm", **VARIANTS[variant])
    if variant == "sharded":
        assert len(list(folder.glob("model-*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").exists()
    old, new = old_path(folder, dtype), quantize.load_int8_lm(folder, dtype=dtype)
    assert_same_int8_model(old, new)
    assert len(int8_linears(new)) == 2 * 4 + 1 and new.get_input_embeddings().weight.dtype == dtype
    if variant == "tied":
        assert old.config.tie_word_embeddings and isinstance(new.lm_head, Int8Linear)
    if variant == "bf16-longrope":
        assert new.model.rotary_emb.rope_type == "longrope"
    with torch.no_grad():
        assert torch.equal(old(input_ids=IDS).logits, new(input_ids=IDS).logits)
        kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(old.generate(input_ids=IDS, **kwargs), new.generate(input_ids=IDS, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_on_the_streamed_base_equals_the_old_order(tiny_dir, tmp_path, dtype):
    """build_model now attaches the round's adapter to the int8 base (before: float base, then quantize):
    the same LoRA weights and dtype, the same logits with the adapter on, for a bf16 checkpoint too."""
    folder = saved_lm(tiny_dir, tmp_path / "lm", dtype=torch.bfloat16)
    adapter = with_lora(quantize.load_int8_lm(folder, dtype=torch.float32), seed=4)
    adapter.save_pretrained(tmp_path / "adapter")
    from transformers import AutoModelForCausalLM

    before = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype="auto"), str(tmp_path / "adapter"))
    quantize_int8_(before, dtype)
    after = PeftModel.from_pretrained(quantize.load_int8_lm(folder, dtype=dtype), str(tmp_path / "adapter"))
    lora_before = {n: p for n, p in before.named_parameters() if "lora_" in n}
    lora_after = {n: p for n, p in after.named_parameters() if "lora_" in n}
    assert lora_before.keys() == lora_after.keys() and lora_before
    assert all(p.dtype == lora_after[n].dtype and torch.equal(p, lora_after[n]) for n, p in lora_before.items())
    with torch.no_grad():
        assert torch.equal(before(input_ids=IDS).logits, after(input_ids=IDS).logits)


def rewrite(folder, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_missing_misshapen_or_foreign_tensor_is_named(tiny_dir, tmp_path):
    folder = saved_lm(tiny_dir, tmp_path / "lm")
    key = "model.layers.1.mlp.down_proj.weight"
    good = {}
    rewrite(folder, lambda t: good.update(t))

    rewrite(folder, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"no tensor {key}: an incomplete download"):
        quantize.load_int8_lm(folder)
    rewrite(folder, lambda t: t.update(good, **{key: good[key][:, :-1].contiguous()}))
    with pytest.raises(ValueError, match=rf"'{key}' has shape \[64, 127\], the model's config expects \[64, 128\]"):
        quantize.load_int8_lm(folder)
    rewrite(folder, lambda t: t.update(good, **{"model.layers.0.mlp.extra.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.extra.weight' is not a parameter of Phi3ForCausalLM"):
        quantize.load_int8_lm(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors or model.safetensors.index.json"):
        quantize.load_int8_lm(folder)
