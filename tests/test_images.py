"""Decoding photos as users have them, and the shared preprocessing."""

import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import lying_header_jpeg
from vehicle_classifier.backbone import OnCrops
from vehicle_classifier.images import ImageError, center_crop, load_crop, open_image

pytestmark = pytest.mark.unit

PREP = {"input_size": 224, "resize_size": 248, "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def encode(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(width, height):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (height, width, 1)),
                                           np.broadcast_to(y, (height, width, 1)),
                                           np.full((height, width, 1), 128, np.float32)], 2).astype(np.uint8))


def test_large_jpeg_is_decoded_at_reduced_size_but_never_below_the_resize():
    blob = encode(gradient(4000, 3000), "JPEG", quality=90)
    image = open_image(blob, draft_size=248)
    assert image.size == (500, 375)  # 1/8 scale: still >= 248 on the shorter side
    full = open_image(blob)
    assert full.size == (4000, 3000)
    # Same picture either way, after the shared crop.
    small, large = (np.asarray(center_crop(i, PREP), np.float32).ravel() for i in (image, full))
    assert np.corrcoef(small, large)[0, 1] > 0.999


def test_exif_orientation_is_applied_after_the_draft():
    image = gradient(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = open_image(encode(image, "JPEG", exif=exif.tobytes()), draft_size=64)
    assert decoded.size[0] < decoded.size[1]  # portrait, as shown on a phone


@pytest.mark.parametrize("make", [
    lambda: encode(gradient(80, 60).convert("CMYK"), "JPEG"),
    lambda: encode(gradient(80, 60).convert("L"), "PNG"),
    lambda: encode(gradient(80, 60).convert("P"), "PNG"),
    lambda: encode(gradient(80, 60).convert("RGBA"), "PNG"),
    lambda: encode(Image.fromarray(np.full((30, 30), 40000, np.uint16)), "PNG"),
    lambda: encode(gradient(80, 60), "WEBP"),
    lambda: encode(gradient(80, 60), "GIF"),
    lambda: encode(gradient(80, 60), "TIFF"),
    lambda: encode(gradient(80, 60), "BMP"),
    lambda: encode(gradient(1, 1), "PNG"),
    lambda: encode(gradient(3000, 2), "PNG"),
])
def test_unusual_images_decode_to_rgb_crops(make):
    crop = load_crop(make(), PREP)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8


def test_transparent_pixels_become_white_and_16bit_keeps_its_brightness():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert open_image(encode(rgba, "PNG")).getpixel((5, 5)) == (255, 255, 255)
    gray16 = Image.fromarray(np.full((10, 10), 32896, np.uint16))  # mid-grey in 16 bits
    assert open_image(encode(gray16, "PNG")).getpixel((5, 5)) == (128, 128, 128)


def test_pixel_limit_is_checked_before_decoding():
    # A tiny PNG that claims 100000 x 100000 pixels: refused from its header.
    blob = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = b"IHDR" + (100000).to_bytes(4, "big") * 2 + blob[24:29]
    bomb = blob[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + blob[33:]
    with pytest.raises(ImageError, match="over the limit"):
        open_image(bomb)
    with pytest.raises(ImageError, match="over the limit"):
        open_image(encode(gradient(100, 100), "PNG"), max_pixels=5000)


@pytest.mark.parametrize("blob, words", [
    (b"", "not an image"),
    (b"hello", "not an image"),
    (encode(gradient(64, 64), "JPEG")[:200], "damaged or truncated"),
    (encode(gradient(64, 64), "PNG")[:100], "damaged or truncated"),
])
def test_bad_bytes_raise_image_error(blob, words):
    with pytest.raises(ImageError, match=words):
        open_image(blob)


@pytest.mark.parametrize("draft_size", [0, 256])
def test_a_jpeg_header_claiming_more_pixels_than_its_data_holds_is_damaged(draft_size):
    """libjpeg fills the missing blocks and only warns: without the length check the draft decode
    (and the full one) answers a grey 7900x7900 image."""
    with pytest.raises(ImageError, match="damaged or truncated.*7900x7900"):
        open_image(lying_header_jpeg(), draft_size)
    assert open_image(lying_header_jpeg(64, 48), draft_size).size == (64, 48)  # the same file, honest header


def test_a_large_flat_jpeg_is_not_mistaken_for_a_damaged_one():
    flat = Image.new("RGB", (4000, 4000), (128, 128, 128))
    for options in ({"optimize": True}, {"optimize": True, "progressive": True}):
        assert open_image(encode(flat, "JPEG", **options), 256).size[0] >= 256


def test_very_wide_images_are_cropped_before_resizing():
    wide = gradient(20000, 10)
    crop = center_crop(wide, PREP)
    assert crop.size == (224, 224)
    # The centre of the gradient: red channel around mid-scale.
    assert 100 < np.asarray(crop)[:, :, 0].mean() < 155


def test_the_forward_normalises_crops_with_the_usual_formula():
    """The one normalisation (backbone.OnCrops, traced into the exported graph): a uint8 crop
    batch becomes (x / 255 - mean) / std, channels first, to float rounding."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    crop = np.array(center_crop(image, PREP))
    expected = (crop / np.float32(255) - np.asarray(PREP["mean"], np.float32)) / np.asarray(PREP["std"], np.float32)
    with torch.no_grad():
        images = OnCrops(torch.nn.Identity(), PREP)(torch.from_numpy(crop[None]))
    assert images.dtype == torch.float32 and images.shape == (1, 3, *crop.shape[:2])
    assert torch.allclose(images[0], torch.from_numpy(expected.transpose(2, 0, 1).copy()), atol=1e-5)
