"""CLIP features: every PIL mode, the size guard, damaged files, pooled and patch shapes."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmft.vision import ImageError, VisionEncoder, load_image, to_rgb


def _image(mode):
    if mode == "I;16":
        return Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16), mode="I;16")
    if mode == "F":
        return Image.fromarray(np.full((20, 30), 0.5, dtype=np.float32), mode="F")
    base = Image.new("RGB", (30, 20), (200, 30, 30))
    if mode == "P":
        return base.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "RGBA":
        return Image.new("RGBA", (30, 20), (200, 30, 30, 0))  # fully transparent red
    return base.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "L", "1", "I", "I;16", "F", "CMYK", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    rgb = to_rgb(_image(mode))
    assert rgb.mode == "RGB" and rgb.size == (30, 20)


def test_conversions_keep_what_the_image_shows():
    assert to_rgb(_image("RGBA")).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert to_rgb(_image("I;16")).getpixel((0, 0))[0] == round(40000 / 65535 * 255)  # not clipped white
    assert to_rgb(_image("F")).getpixel((0, 0)) == (128, 128, 128)  # a [0, 1] float image: 0.5 is mid-grey
    big = Image.fromarray(np.full((2, 2), 100.0, dtype=np.float32), mode="F")
    assert to_rgb(big).getpixel((0, 0)) == (100, 100, 100)  # floats on an 8-bit scale stay on it
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    # premultiplied grey 100 at alpha 200 is grey 127 (100 * 255 / 200, rounded down by PIL) over white
    assert to_rgb(Image.new("La", (2, 2), (100, 200))).getpixel((0, 0)) == (155, 155, 155)  # was "damaged file"


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (0, 0)])
def test_an_image_without_pixels_is_refused(size):
    with pytest.raises(ImageError, match=rf"^image is {size[0]}x{size[1]} pixels: it has nothing to see$"):
        load_image(np.zeros((size[1], size[0], 3), np.uint8), max_pixels=10**6)  # was a ZeroDivisionError in CLIP's resize


def test_oversize_image_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")
    with pytest.raises(ImageError, match=r"5000x5000 = 25,000,000 pixels, over the limit of 1,000,000"):
        load_image(buf.getvalue(), max_pixels=1_000_000)


def test_damaged_and_missing_files(tmp_path):
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="damaged or truncated"):
        load_image(tmp_path / "cut.jpg", 10**7)
    with pytest.raises(ImageError, match="could not read the image"):
        load_image(tmp_path / "text.jpg", 10**7)
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "none.png", 10**7)


@pytest.mark.parametrize("mode, layer, strategy, shape", [
    ("pooled", -2, "default", (3, 1, 16)),  # pooled ignores the layer and CLS choice
    ("patch", -1, "full", (3, 50, 32)),  # 7x7 patches + CLS, last layer (rounds before the choice existed)
    ("patch", -2, "default", (3, 49, 32)),  # LLaVA's: second-to-last layer, no CLS (new rounds)
])
def test_feature_shapes(tiny_dir, mode, layer, strategy, shape):
    vision = VisionEncoder.from_pretrained(str(tiny_dir / "clip"), mode, 10**7, feature_layer=layer,
                                           select_strategy=strategy)
    images = [_image(m) for m in ("RGB", "P", "I;16")]
    features = vision.encode(images, batch_size=2)
    assert features.shape == shape and not features.requires_grad
    assert vision.num_tokens == shape[1] and vision.feature_dim == shape[2]
    # pooled is exactly get_image_features (transformers 5 returns an output object)
    if mode == "pooled":
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(tiny_dir / "clip")
        with torch.no_grad():
            ref = clip.get_image_features(pixel_values=vision.preprocess(images)).pooler_output
        assert torch.allclose(features[:, 0], ref, atol=1e-6)
    else:  # exactly CLIP's hidden_states[layer], CLS dropped or kept
        with torch.no_grad():
            # encode's own batches (2 + 1): the same matmul shapes, so equal bits on any CPU (MKL's AVX2 path
            # gives a row other bits in a batch of 3 than in one of 2)
            hidden = torch.cat([vision.vision_model(vision.preprocess(batch), output_hidden_states=True)
                                .hidden_states[layer] for batch in (images[:2], images[2:])])
        assert torch.equal(features, hidden[:, 1:] if strategy == "default" else hidden)
    assert all(not p.requires_grad for p in vision.parameters())


def test_a_feature_layer_past_clips_depth_is_refused_at_load(tiny_dir):
    from transformers import CLIPConfig

    states = CLIPConfig.from_pretrained(tiny_dir / "clip").vision_config.num_hidden_layers + 1
    VisionEncoder.from_pretrained(str(tiny_dir / "clip"), "patch", 10**7, feature_layer=-states)  # the embeddings
    for layer in (states, -states - 1, 99):
        with pytest.raises(ValueError, match=f"vit_feature_layer {layer} is out of range for this CLIP"):
            VisionEncoder.from_pretrained(str(tiny_dir / "clip"), "patch", 10**7, feature_layer=layer)
    VisionEncoder.from_pretrained(str(tiny_dir / "clip"), "pooled", 10**7, feature_layer=99)  # pooled ignores it


def test_importing_mmft_leaves_pils_bomb_guard_on():
    import subprocess
    import sys

    code = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS; "
            "import mmft.vision, mmft.data, mmft.loading, mmft.training, mmft.pipeline; "
            "print(before, Image.MAX_IMAGE_PIXELS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] != "None"


def test_image_past_pils_hard_limit_is_one_clear_error(monkeypatch):
    # PIL refuses (DecompressionBombError) past 2x MAX_IMAGE_PIXELS before our own check can run:
    # that is an ImageError too, with what to do. A small limit stands in for PIL's 89M pixels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, "PNG")
    with pytest.raises(ImageError, match="too large to decode safely.*resize it"):
        load_image(buf.getvalue(), max_pixels=10**9)


def test_a_thin_strip_is_cut_to_what_clips_crop_keeps(tiny_dir):
    """CLIP's processor scales the short side up to its input size before its centre crop: a 100,000 x 1
    strip (a few hundred bytes, far under the pixel limit) was scaled to gigabytes first. `load_image`
    keeps the centre 20:1 of such an image, which holds the whole crop: CLIP sees the same pixels.
    (Height 7 on the tiny CLIP's 56 px: a scale of exactly 8, so the crops align to the pixel.)"""
    from mmft.vision import MAX_ASPECT

    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 2000, 3), dtype=np.uint8))  # 286:1
    file = io.BytesIO()
    strip.save(file, "PNG")
    loaded = load_image(file.getvalue(), 10**8)
    assert loaded.size == (MAX_ASPECT * 7, 7)
    vision = VisionEncoder.from_pretrained(str(tiny_dir / "clip"), "patch", 10**8)
    assert torch.equal(vision.preprocess([loaded]), vision.preprocess([strip]))  # [1, 3, 56, 56]
    file = io.BytesIO()
    Image.new("RGB", (100_000, 1), "red").save(file, "PNG")
    assert load_image(file.getvalue(), 10**8).size == (20, 1)
    assert load_image(Image.new("RGB", (400, 20), "blue"), 10**8).size == (400, 20)  # 20:1 and under: as it is


def test_damaged_exif_keeps_the_picture_as_stored():
    """A JPEG whose EXIF block is damaged (bytes changed): PIL's exif_transpose fails re-writing it with
    struct.error, which reached the page as "required argument is not an integer"."""
    from PIL import ImageOps

    path = Path(__file__).parent / "assets" / "damaged_exif.jpg"
    with pytest.raises(Exception) as raised:
        ImageOps.exif_transpose(Image.open(path))
    assert not isinstance(raised.value, OSError)
    image = load_image(path, 10**8)
    assert image.size == (40, 30) and image.mode == "RGB"
