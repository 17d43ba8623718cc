"""The multimodal model: label alignment, equivalence with transformers' LLaVA, KV cache, adapter toggle."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import _randomise_lora

from mmft.data import pad_batch
from mmft.model import position_ids_from
from mmft.prompt import IGNORE_INDEX, encode_chat


def _examples(model, n_image_tokens):
    conversations = [
        [("user", "What colour is the shape?"), ("assistant", "The shape is a red circle.")],
        [("user", "Which shape?"), ("assistant", "A blue square."), ("user", "Colour?"), ("assistant", "Blue")],
    ]
    return [vars(encode_chat(model.tokenizer, model.cfg, c, num_image_tokens=n_image_tokens)) for c in conversations]


def _images(n):
    return [Image.new("RGB", (60 + 7 * i, 50), (40 * i, 200, 90)) for i in range(n)]


def test_labels_are_scored_once_against_the_next_token(tiny_model):
    model = tiny_model
    batch = pad_batch(_examples(model, model.vision.num_tokens), model.tokenizer.pad_token_id)
    batch["pixel_values"] = model.vision.preprocess(_images(2))
    labels = batch["labels"]
    # The collator does not shift: a label is the input id at its own position.
    answer = labels != IGNORE_INDEX
    assert answer.any()
    assert torch.equal(labels[answer], batch["input_ids"][answer])
    assert not answer[batch["image_mask"]].any() and not answer[batch["attention_mask"] == 0].any()

    out = model(**batch)  # with labels, logits only where a label is predicted: [N_labelled, V]
    assert out.logits.shape[0] == int(answer[:, 1:].sum())
    logits = model(**{**batch, "labels": None}).logits.float()  # every position
    right = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    twice = F.cross_entropy(logits[:, :-2].reshape(-1, logits.shape[-1]), labels[:, 2:].reshape(-1))
    assert torch.allclose(out.loss, right, atol=1e-5)
    assert abs(out.loss.item() - twice.item()) > 1e-3  # a double shift would be caught


def _llava_from(model):
    """transformers' LlavaForConditionalGeneration holding the same CLIP, projector and Phi-3 weights
    (LoRA merged into a deep copy: merging in place would change the base the refine stage uses)."""
    import copy

    from transformers import LlavaConfig, LlavaForConditionalGeneration

    lm = copy.deepcopy(model.lm).merge_and_unload()
    image_token = model.tokenizer.convert_tokens_to_ids("<unk>")
    config = LlavaConfig(
        vision_config=model.vision.vision_model.config, text_config=lm.config,
        image_token_index=image_token, image_seq_length=model.vision.num_tokens, projector_hidden_act="gelu",
        vision_feature_layer=model.cfg.vit_feature_layer,
        vision_feature_select_strategy=model.cfg.vit_feature_select_strategy,
        multimodal_projector_bias=True,
    )
    llava = LlavaForConditionalGeneration(config).eval()
    llava.model.vision_tower.load_state_dict(model.vision.vision_model.state_dict())
    llava.model.multi_modal_projector.load_state_dict(model.projector.state_dict())
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    return llava, image_token


@pytest.mark.parametrize("layer, strategy, n_tokens", [(-1, "full", 50), (-2, "default", 49)])
def test_patch_mode_matches_transformers_llava(tiny_config, layer, strategy, n_tokens):
    """Both feature choices (mmft's old one and LLaVA's, the default for new rounds), fp32."""
    from dataclasses import replace

    from mmft.loading import build_model

    torch.manual_seed(0)
    cfg = replace(tiny_config, vit_feature_layer=layer, vit_feature_select_strategy=strategy)
    model = build_model(cfg, device="cpu", dtype=torch.float32, trainable=True)
    _randomise_lora(model)
    model.eval()
    assert model.vision.num_tokens == n_tokens
    examples = _examples(model, model.vision.num_tokens)[:1]
    batch = pad_batch(examples, model.tokenizer.pad_token_id)
    pixel_values = model.vision.preprocess(_images(1))
    llava, image_token = _llava_from(model)
    llava_ids = batch["input_ids"].masked_fill(batch["image_mask"], image_token)
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"], batch["image_mask"], pixel_values=pixel_values).logits
        ref = llava(input_ids=llava_ids, attention_mask=batch["attention_mask"], pixel_values=pixel_values).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5  # same fp32 ops in the same order, up to kernel rounding


def _prompt_batch(model, questions, side="left"):
    prompts = [vars(encode_chat(model.tokenizer, model.cfg, [("user", q)], model.vision.num_tokens)) for q in questions]
    batch = pad_batch(prompts, model.tokenizer.pad_token_id, padding_side=side)
    batch.pop("labels")
    batch["pixel_values"] = model.vision.preprocess(_images(len(questions)))
    return batch


def test_cached_generate_equals_uncached(tiny_model):
    model = tiny_model.eval()
    batch = _prompt_batch(model, ["What colour is it?"])
    cached = model.generate(**batch, max_new_tokens=10, min_new_tokens=10)
    uncached = model.generate(**batch, max_new_tokens=10, min_new_tokens=10, use_cache=False)
    assert cached.shape == (1, 10)
    assert torch.equal(cached, uncached)
    # and the naive loop (full forward per token, argmax) agrees too
    ids, mask, image_mask = batch["input_ids"], batch["attention_mask"], batch["image_mask"]
    with torch.no_grad():
        for _ in range(10):
            logits = model(ids, mask, image_mask, pixel_values=batch["pixel_values"]).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            image_mask = torch.cat([image_mask, torch.zeros_like(nxt, dtype=torch.bool)], 1)
    assert torch.equal(ids[:, -10:], cached)


def test_left_padded_batch_generates_like_single_prompts(tiny_model):
    model = tiny_model.eval()
    questions = ["What colour is it?", "Which shape is shown in this picture, please?"]
    batch = _prompt_batch(model, questions)
    together = model.generate(**batch, max_new_tokens=6, min_new_tokens=6)
    for i, q in enumerate(questions):
        single = _prompt_batch(model, [q])
        single["pixel_values"] = batch["pixel_values"][i : i + 1]
        assert torch.equal(model.generate(**single, max_new_tokens=6, min_new_tokens=6)[0], together[i])


def test_disable_adapter_gives_base_logits_and_restores_adapter(tiny_model):
    model = tiny_model.eval()
    ids = torch.tensor([model.tokenizer("the red circle")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with_adapter = model.lm(input_ids=ids, attention_mask=mask).logits
        with model.adapter(False):
            off = model.lm(input_ids=ids, attention_mask=mask).logits
        after = model.lm(input_ids=ids, attention_mask=mask).logits
        base = model.lm.get_base_model()
        # The base's own forward without any LoRA: unload a deep copy to get the plain weights.
        import copy

        plain = copy.deepcopy(model.lm).unload()
        reference = plain(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(with_adapter, off)
    assert torch.equal(off, reference)
    assert torch.equal(after, with_adapter)
    assert base is model.lm.get_base_model()


def test_position_ids_skip_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids_from(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_slot_count_mismatch_is_an_error(tiny_model):
    import pytest

    model = tiny_model
    batch = _prompt_batch(model, ["What colour?"])
    with pytest.raises(ValueError, match="image slots"):
        model.embed(batch["input_ids"], batch["image_mask"], torch.zeros(1, 3, model.cfg.mp_input_dim))
    with pytest.raises(ValueError, match="no image features"):
        model.embed(batch["input_ids"], batch["image_mask"], None)


def test_adapter_toggle_never_asks_peft_for_the_model_status_or_a_repr(tiny_model, monkeypatch):
    """PEFT's disable_adapter() repr()s every LoRA layer (get_model_status), and an int8 base layer's repr
    unpacks its weight: ~21-24 s per refine at real size. The toggle must touch neither."""
    import copy

    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tiny_model.eval()
    ids = torch.tensor([model.tokenizer("the red circle")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = copy.deepcopy(model.lm).unload()(input_ids=ids, attention_mask=mask).logits  # the bare base
        with_adapter = model.lm(input_ids=ids, attention_mask=mask).logits

    def boom(*args, **kwargs):
        raise AssertionError("the adapter toggle must not call this")

    monkeypatch.setattr(PeftModel, "get_model_status", boom)
    layers = [m for m in model.lm.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == 4 * model.lm.config.num_hidden_layers  # the four Phi-3 targets per decoder layer
    for layer in layers:
        monkeypatch.setattr(layer, "extra_repr", boom)
        monkeypatch.setattr(layer.base_layer, "extra_repr", boom)
    batch = _prompt_batch(model, ["What colour is it?"])
    with torch.no_grad():
        with model.adapter(False):
            off = model.lm(input_ids=ids, attention_mask=mask).logits
            assert all(layer.disable_adapters for layer in layers)
        on_again = model.lm(input_ids=ids, attention_mask=mask).logits
        base_draft = model.generate(**batch, use_adapter=False, max_new_tokens=4)
        lora_draft = model.generate(**batch, use_adapter=True, max_new_tokens=4)
    assert torch.equal(off, plain)  # exact: the same weights, LoRA skipped
    assert torch.equal(on_again, with_adapter) and not torch.equal(off, with_adapter)
    assert not any(layer.disable_adapters for layer in layers)
    assert base_draft.shape == lora_draft.shape == (1, 4)


def test_adapter_contexts_nest_and_restore(tiny_model):
    model = tiny_model.eval()
    with model.adapter(False):
        with model.adapter(True):
            assert model.switch.enabled
        with model.adapter(None):  # forward() uses this: keeps what the enclosing context set
            assert not model.switch.enabled
        assert not model.switch.enabled
    assert model.switch.enabled and not model.lm._adapters_disabled


def test_lora_on_embed_tokens_is_switched_with_the_rest(tmp_path):
    """`lora_target_modules` may include embed_tokens: then the prompt's embeddings belong to the adapter
    and must be computed under the switch. Before, `generate(use_adapter=False)` (refine, typed text)
    embedded the prompt with the adapter still on."""
    from mmft.loading import build_model
    from mmft.pipeline import Pipeline
    from mmft.testing import build_tiny_models

    cfg = build_tiny_models(tmp_path, lora_target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                                                           "embed_tokens"])
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu", dtype=torch.float32, trainable=True)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                p.normal_(0, 0.5)  # a trained adapter: non-zero everywhere, the embedding's too
    model.eval()
    pipe = Pipeline(model)
    batch = pipe._batch([pipe._encode("What colour is the shape?", False)])
    ids = batch["input_ids"]
    with torch.no_grad():
        on, off = model.lm.get_input_embeddings()(ids), None
        with model.adapter(False):
            off = model.lm.get_input_embeddings()(ids)
            reference = model.generate(**batch, use_adapter=False, max_new_tokens=6)
            ref_logits = model(**batch).logits
        assert float((on - off).abs().max()) > 0.1  # the embedding LoRA does change the prompt
        assert torch.equal(model.generate(**batch, use_adapter=False, max_new_tokens=6), reference)
        assert not torch.equal(model(**batch).logits, ref_logits)  # adapter on: embeddings and linears
        with model.adapter(False):
            assert torch.equal(model(**batch).logits, ref_logits)
