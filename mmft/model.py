"""The multimodal model: frozen CLIP -> projector -> spliced into the LM's input embeddings.

`input_ids` carry the whole prompt with *slots* where the image goes (`image_mask` is True there);
the slots' embeddings are replaced by the projected image tokens, so any number of image tokens
fits and no placeholder token exists in the vocabulary. The LM computes the loss and shifts the
labels itself. One copy of the base weights serves both pipeline stages: the LoRA adapter is on
for the draft and switched off for the refine. Several rounds can share one base LM and CLIP: each
round is a PEFT *named* adapter on the same `PeftModel` plus its own projector (`MultimodalModel.sibling`);
an `AdapterSwitch` per base serialises adapter choice + generation across threads.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from mmft.config import MMFTConfig, save_config
from mmft.projector import Projector, save_projector
from mmft.round import ADAPTER_DIR, PROJECTOR_NAME
from mmft.vision import VisionEncoder


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]


class AdapterSwitch:
    """The LoRA state of one base LM, shared by every round loaded on it: a lock, and the LoRA layers.

    PEFT's `disable_adapter()` first calls `get_model_status()`, which `repr()`s every LoRA layer; with
    torch.ao dynamic int8 base layers each repr unpacks the packed weight (~21-24 s per refine at real
    size). Here the LoRA layers are listed once (again after an adapter is loaded or deleted: `refresh`)
    and the flag their forward reads (`disable_adapters`) is flipped directly: microseconds, whatever the
    base layers are. One flag per layer covers every adapter it holds, so "off" is the bare base.
    The lock (re-entrant) is held for adapter choice + forward/generate, so threads cannot interleave.
    """

    def __init__(self, lm):
        self.lm = lm
        self.lock = threading.RLock()
        self.enabled = True
        self.refresh()

    def refresh(self) -> None:
        self.layers = [m for m in self.lm.modules() if isinstance(m, BaseTunerLayer)]
        # The adapter every layer has active, if they agree. When the active adapter is deleted, PEFT picks
        # a successor per layer (rounds may cover different modules) and reports the first layer's: then
        # `selected` is None and the next `select` sets them all.
        active = {tuple(m.active_adapters) for m in self.layers}
        only = next(iter(active)) if len(active) == 1 else ()
        self.selected = only[0] if len(only) == 1 else None
        if self.layers and not all(hasattr(m, "_disable_adapters") for m in self.layers):
            raise RuntimeError("this peft version's LoRA layers have no `_disable_adapters` flag: "
                               "mmft.model.AdapterSwitch needs peft as pinned in requirements.txt")

    def select(self, name: str | None) -> None:
        """Make `name` the active adapter on every layer (a no-op when it already is, as in training;
        switching is rare: only when rounds share a base)."""
        if name is None or not isinstance(self.lm, PeftModel) or self.selected == name:
            return
        if name not in self.lm.peft_config:
            raise RuntimeError(f"adapter {name!r} is no longer loaded (its round was dropped from the cache); "
                               "load the round again")
        self.lm.set_adapter(name, inference_mode=True)
        self.selected = name

    def set_enabled(self, enabled: bool) -> None:
        # The instance dict directly: nn.Module.__setattr__ costs ~20 us a call, 128 layers at real size.
        for layer in self.layers:
            vars(layer)["_disable_adapters"] = not enabled  # what LoraLayer.forward reads (peft 0.21)
        if isinstance(self.lm, PeftModel):
            vars(self.lm)["_adapters_disabled"] = not enabled  # what PeftModel reports
        self.enabled = enabled


class MultimodalModel(nn.Module):
    def __init__(self, cfg: MMFTConfig, lm, tokenizer, projector: Projector, vision: VisionEncoder | None,
                 adapter_name: str | None = None, switch: AdapterSwitch | None = None):
        super().__init__()
        self.cfg = cfg
        self.lm = lm  # PeftModel around the base LM (or the bare LM when there is no adapter)
        self.tokenizer = tokenizer
        self.projector = projector
        self.vision = vision  # None when training from cached features
        if adapter_name is None and isinstance(lm, PeftModel):
            adapter_name = lm.active_adapter
        self.adapter_name = adapter_name  # this round's named adapter on the (possibly shared) PeftModel
        self.switch = switch or AdapterSwitch(lm)

    def sibling(self, cfg: MMFTConfig, projector: Projector, adapter_name: str) -> "MultimodalModel":
        """Another round on the same base LM, CLIP and tokenizer (its adapter already loaded on `self.lm`)."""
        self.switch.refresh()
        return MultimodalModel(cfg, self.lm, self.tokenizer, projector, self.vision, adapter_name, self.switch)

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def has_adapter(self) -> bool:
        return isinstance(self.lm, PeftModel)

    def image_features(self, pixel_values=None, image_features=None) -> torch.Tensor | None:
        """CLIP features `[N_img, N_tok, D_v]`: cached ones as given, else computed (no grad)."""
        if image_features is not None:
            return image_features
        if pixel_values is None:
            return None
        if self.vision is None:
            raise ValueError("pixel_values given but this model has no vision encoder (cached features only)")
        return self.vision(pixel_values)

    def embed(self, input_ids, image_mask, features=None) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(input_ids)  # [B, T, D_lm]
        slots = int(image_mask.sum()) if image_mask is not None else 0
        if features is None:
            if slots:
                raise ValueError(f"the prompt has {slots} image slots but no image features were given")
            if self.training and any(p.requires_grad for p in self.projector.parameters()):
                # A text-only batch still runs the projector (adds exactly 0, gives zero gradients), so
                # every DDP process reduces the same weights at every step.
                param = next(self.projector.parameters())
                embeds = embeds + 0.0 * self.projector(param.new_zeros(1, 1, self.projector.linear_1.in_features)).sum()
            return embeds
        proj_param = next(self.projector.parameters())
        projected = self.projector(features.to(proj_param.device, proj_param.dtype))  # [N_img, N_tok, D_lm]
        if slots != projected.shape[0] * projected.shape[1]:
            raise ValueError(
                f"the prompt has {slots} image slots but the images give "
                f"{projected.shape[0]} x {projected.shape[1]} tokens"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), projected.to(embeds.dtype))

    def forward(self, input_ids, attention_mask, image_mask=None, labels=None, pixel_values=None,
                image_features=None, **kwargs):
        features = self.image_features(pixel_values, image_features)
        if labels is not None and "logits_to_keep" not in kwargs:
            # Only positions that predict a label reach the LM head: with a 32k vocabulary the logits of
            # image and prompt tokens are most of a step's work. Same loss (HF's, on `shift_labels`);
            # `logits` is then [N_labelled, V].
            shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # [B, T]: t predicts t+1
            keep = shift_labels != -100
            kwargs.update(logits_to_keep=keep, shift_labels=shift_labels[keep])
        with self.adapter(None):  # this round's adapter, on unless an enclosing `adapter(False)` says off
            embeds = self.embed(input_ids, image_mask, features)  # inside: LoRA may sit on embed_tokens
            return self.lm(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids_from(attention_mask),
                labels=labels,  # unshifted: the LM's loss shifts them
                **kwargs,
            )

    @contextmanager
    def adapter(self, enabled: bool | None):
        """Context: this round's LoRA on (draft) or every adapter off (refine, text) — same weights, no
        second copy; None keeps the state an enclosing context set (outside any: on). Holds the base's
        lock, so no other thread switches adapters meanwhile."""
        with self.switch.lock:
            if not self.has_adapter:
                yield
                return
            self.switch.select(self.adapter_name)
            before = self.switch.enabled
            self.switch.set_enabled(before if enabled is None else enabled)
            try:
                yield
            finally:
                self.switch.set_enabled(before)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, image_mask=None, pixel_values=None, image_features=None,
                 use_adapter: bool = True, streamer=None, **overrides) -> torch.Tensor:
        """KV-cached `generate` on spliced embeddings; returns only the new tokens `[B, T_new]`."""
        device = self.device
        features = self.image_features(
            None if pixel_values is None else pixel_values.to(device),
            None if image_features is None else image_features.to(device),
        )
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        image_mask = None if image_mask is None else image_mask.to(device)
        eot = self.tokenizer.convert_tokens_to_ids(self.cfg.prompt_end_of_turn)
        stop = [t for t in (eot, self.tokenizer.eos_token_id) if t is not None and t >= 0]
        kwargs = dict(
            max_new_tokens=self.cfg.gen_max_new_tokens,
            do_sample=self.cfg.gen_do_sample,
            eos_token_id=stop,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if self.cfg.gen_repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.cfg.gen_repetition_penalty
        if kwargs["do_sample"] or overrides.get("do_sample"):
            kwargs.update(temperature=self.cfg.gen_temperature, top_p=self.cfg.gen_top_p)
        kwargs.update(overrides)
        with self.adapter(use_adapter):
            # embedded under the switch: with LoRA on embed_tokens the prompt's embeddings are the adapter's
            embeds = self.embed(input_ids, image_mask, features)  # [B, T, D]
            return self.lm.generate(
                inputs_embeds=embeds, attention_mask=attention_mask, streamer=streamer, **kwargs
            )

    # -- Trainer hooks ---------------------------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1,
                                        offload=False):
        """The Trainer calls this on the model it is given; delegate to the LM."""
        self.lm.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs,
            every_n_layers=every_n_layers,
            offload=offload,
        )

    # -- Trainer checkpoints: the trained weights only -----------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA + projector (or the projector alone): what a Trainer checkpoint holds, never the base."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The Trainer's resume path hands us a checkpoint's `trained_state_dict()` with strict=False;
        load it strictly anyway: every trained weight, with its shape, and nothing else. A full state
        dict loads as in torch."""
        if set(state_dict) - set(self.trained_state_dict()) and not set(self.state_dict()) - set(state_dict):
            return super().load_state_dict(state_dict, strict, assign)
        params = dict(self.named_parameters())
        trained = self.trained_state_dict()
        missing, extra = sorted(set(trained) - set(state_dict)), sorted(set(state_dict) - set(trained))
        wrong = [k for k in set(trained) & set(state_dict) if tuple(state_dict[k].shape) != tuple(params[k].shape)]
        if missing or extra or wrong:
            raise ValueError(f"checkpoint does not match the trained weights: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}, wrong shape {sorted(wrong)[:5]} (another run's checkpoint?)")
        with torch.no_grad():
            for key, value in state_dict.items():
                params[key].copy_(value)
        return nn.modules.module._IncompatibleKeys([], [])

    # -- Saving ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, round_info: dict | None = None) -> Path:
        """A round folder: `adapter/` (PEFT), `projector.safetensors`, `config.json`. Never the base."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.has_adapter:
            # the LoRA weights only: with LoRA on embed_tokens PEFT would also save the frozen embedding
            self.lm.save_pretrained(folder / ADAPTER_DIR, save_embedding_layers=False)
        save_projector(self.projector, folder / PROJECTOR_NAME)
        save_config(folder, self.cfg, round_info)
        return folder
