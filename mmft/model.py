"""The multimodal model: frozen CLIP -> projector -> spliced into the LM's input embeddings.

`input_ids` carry the whole prompt with *slots* where the image goes (`image_mask` is True there);
the slots' embeddings are replaced by the projected image tokens, so any number of image tokens
fits and no placeholder token exists in the vocabulary. The LM computes the loss and shifts the
labels itself. One copy of the base weights serves both pipeline stages: the LoRA adapter is on
for the draft and switched off (`disable_adapter()`) for the refine.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from mmft.config import MMFTConfig, save_config
from mmft.projector import Projector, save_projector
from mmft.round import ADAPTER_DIR, PROJECTOR_NAME
from mmft.vision import VisionEncoder


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]


class MultimodalModel(nn.Module):
    def __init__(self, cfg: MMFTConfig, lm, tokenizer, projector: Projector, vision: VisionEncoder | None):
        super().__init__()
        self.cfg = cfg
        self.lm = lm  # PeftModel around the base LM (or the bare LM when there is no adapter)
        self.tokenizer = tokenizer
        self.projector = projector
        self.vision = vision  # None when training from cached features

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
        embeds = self.embed(input_ids, image_mask, features)
        if labels is not None and "logits_to_keep" not in kwargs:
            # Only positions that predict a label reach the LM head: with a 32k vocabulary the logits of
            # image and prompt tokens are most of a step's work. Same loss (HF's, on `shift_labels`);
            # `logits` is then [N_labelled, V].
            shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # [B, T]: t predicts t+1
            keep = shift_labels != -100
            kwargs.update(logits_to_keep=keep, shift_labels=shift_labels[keep])
        return self.lm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from(attention_mask),
            labels=labels,  # unshifted: the LM's loss shifts them
            **kwargs,
        )

    def adapter(self, enabled: bool):
        """Context: LoRA on (draft) or off (refine, text) — same weights, no second copy."""
        if enabled or not self.has_adapter:
            return nullcontext()
        return self.lm.disable_adapter()

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
        embeds = self.embed(input_ids, image_mask, features)
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

    # -- Saving ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, round_info: dict | None = None) -> Path:
        """A round folder: `adapter/` (PEFT), `projector.safetensors`, `config.json`. Never the base."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.has_adapter:
            self.lm.save_pretrained(folder / ADAPTER_DIR)
        save_projector(self.projector, folder / PROJECTOR_NAME)
        save_config(folder, self.cfg, round_info)
        return folder
