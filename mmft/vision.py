"""CLIP image features, frozen: images in, `[B, N, D_v]` feature tokens out.

`pooled` gives one token per image (`get_image_features`, 1x512 for ViT-B/32); `patch` gives one
token per patch from `hidden_states[feature_layer]`, with CLS ("full", 50x768 for ViT-B/32) or
without ("default", 49x768) — exactly LLaVA's `vision_feature_layer` / `vision_feature_select_strategy`.
Whatever PIL hands us is made RGB first, and images too large to decode safely are refused before
their pixels are read. PIL's own decompression-bomb guard stays on for the whole process.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from transformers import CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

RESIZE_HINT = "resize it (e.g. to 1024 px on the long side) and try again"
# CLIP's processor scales the *short* side up to its input size, then keeps the centre square: a thin strip
# (1x100,000 px, a few hundred bytes) would be scaled to gigabytes first. Past this long/short ratio the
# image is cropped to its centre, which is all CLIP keeps anyway.
MAX_ASPECT = 20


class ImageError(ValueError):
    """An image we cannot or will not use; the message says why and what to do."""


def check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:  # CLIP's resize divides by the short side
        raise ImageError(f"image is {width}x{height} pixels: it has nothing to see")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}; {RESIZE_HINT}"
        )


def open_image(path_or_file) -> Image.Image:
    """`Image.open` (header only) with PIL's bomb guard left on: an image past PIL's hard limit is an
    ImageError naming the problem (not PIL's DecompressionBombError). Our own, lower, limit is
    `check_size`, applied by `load_image` before any pixel is decoded."""
    try:
        return Image.open(path_or_file)
    except Image.DecompressionBombError as err:
        raise ImageError(f"image is too large to decode safely ({err}); {RESIZE_HINT}") from None


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as stored when its EXIF block is damaged (PIL
    re-serialises it while turning and fails with struct.error, KeyError, TypeError ...)."""
    if image.mode in ("I;16", "F"):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except OSError:  # the pixels themselves: damaged or truncated
        raise
    except Exception:
        return image


def _centre(image: Image.Image) -> Image.Image:
    """The image, cropped to its centre if it is longer than MAX_ASPECT times its short side."""
    width, height = image.size
    short = min(width, height)
    if max(width, height) <= MAX_ASPECT * short:
        return image
    w, h = min(width, MAX_ASPECT * short), min(height, MAX_ASPECT * short)
    left, top = (width - w) // 2, (height - h) // 2
    return image.crop((left, top, left + w, top + h))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white; 16/32-bit and float are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied: PIL converts it to LA only
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        # convert("RGB") clips 16-bit values to 255 (a white image): rescale to 8 bits instead.
        array = np.asarray(image, dtype=np.float64)
        # float images in [0, 1] (numpy, scientific formats) are [0, 1] images, not very dark 8-bit ones
        unit = image.mode == "F" and 0.0 < float(array.max()) <= 1.0
        top = 65535.0 if image.mode.startswith("I;16") else 1.0 if unit else max(float(array.max()), 255.0)
        array = np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(source, max_pixels: int) -> Image.Image:
    """Open a path, bytes or PIL image; check its size from the header, then decode to RGB."""
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray)):
            image = open_image(io.BytesIO(source))
        elif isinstance(source, np.ndarray):
            image = Image.fromarray(source)
        else:
            image = open_image(Path(source))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image file not found: {source}") from None
    except (OSError, ValueError, TypeError) as err:
        raise ImageError(f"could not read the image ({err}); is it a PNG, JPEG or similar?") from None
    check_size(image, max_pixels)
    try:
        image = _upright(image)
        image.load()
        return _centre(to_rgb(image))
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"the image file is damaged or truncated ({err})") from None


class VisionEncoder(nn.Module):
    """Frozen CLIP vision tower (+ its projection for `pooled`); never trained, never in autograd."""

    def __init__(self, clip: CLIPModel, processor: CLIPImageProcessorPil, mode: str, max_pixels: int,
                 feature_layer: int = -2, select_strategy: str = "default"):
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.processor = processor
        self.mode = mode
        self.max_pixels = max_pixels
        self.feature_layer = feature_layer  # index into hidden_states (patch mode), as LlavaConfig
        states = clip.vision_model.config.num_hidden_layers + 1  # the embeddings, then each layer
        if mode == "patch" and not -states <= feature_layer < states:
            raise ValueError(f"vit_feature_layer {feature_layer} is out of range for this CLIP: hidden_states "
                             f"has {states} entries (-{states} .. {states - 1}; -1 is the last layer)")
        self.select_strategy = select_strategy  # "default": drop CLS, "full": keep it
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, model_id: str, mode: str, max_pixels: int, revision=None, dtype=None,
                        feature_layer: int = -2, select_strategy: str = "default"):
        clip = CLIPModel.from_pretrained(model_id, revision=revision, dtype=dtype)
        processor = CLIPImageProcessorPil.from_pretrained(model_id, revision=revision)
        return cls(clip, processor, mode, max_pixels, feature_layer, select_strategy)

    @classmethod
    def from_config(cls, cfg, dtype=None) -> "VisionEncoder":
        """The encoder an `MMFTConfig` describes (model, revision, feature mode, layer, CLS choice)."""
        return cls.from_pretrained(cfg.vit_model_id, cfg.vit_feature_mode, cfg.vit_max_pixels, cfg.vit_revision,
                                   dtype, cfg.vit_feature_layer, cfg.vit_feature_select_strategy)

    @property
    def feature_dim(self) -> int:
        if self.mode == "pooled":
            return self.visual_projection.out_features
        return self.vision_model.config.hidden_size

    @property
    def num_tokens(self) -> int:
        if self.mode == "pooled":
            return 1
        cfg = self.vision_model.config
        return (cfg.image_size // cfg.patch_size) ** 2 + (self.select_strategy == "full")

    def preprocess(self, images) -> torch.Tensor:
        """Images (any mode, path, bytes) -> pixel values `[B, 3, H, W]`."""
        rgb = [load_image(image, self.max_pixels) for image in images]
        return self.processor(images=rgb, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.vision_model.parameters())
        pixel_values = pixel_values.to(param.device, param.dtype)
        if self.mode == "pooled":
            out = self.vision_model(pixel_values=pixel_values)
            return self.visual_projection(out.pooler_output).unsqueeze(1)  # [B, 1, D_proj]
        if self.feature_layer == -1:  # the last layer: no need to keep every layer's output
            features = self.vision_model(pixel_values=pixel_values).last_hidden_state  # [B, 1 + P, D_v]
        else:
            out = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
            features = out.hidden_states[self.feature_layer]  # [B, 1 + P, D_v]
        return features[:, 1:] if self.select_strategy == "default" else features  # [B, P (+ 1), D_v]

    def encode(self, images, batch_size: int = 32) -> torch.Tensor:
        """Images -> features `[B, N, D_v]`, in batches so a long list does not exhaust memory."""
        chunks = [
            self(self.preprocess(images[i : i + batch_size])) for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks)
