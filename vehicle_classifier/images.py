"""Decoding any photo a user may have into RGB, and the backbone's eval crop.

Shared by training, batch prediction and serving, so all see exactly the same pixels; the
normalisation after the crop is part of the forward (backbone.OnCrops).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import UserError
from .config import MAX_IMAGE_PIXELS

Image.MAX_IMAGE_PIXELS = None  # we check the pixel count ourselves, before decoding
# Bumped whenever decoding changes the pixels it produces: part of the feature cache's key.
DECODER_VERSION = 3  # 2: formats other than JPEG box-reduced before the resize (_reduced); 3: uint8 crops
# normalised inside the forward (backbone.OnCrops), as the service feeds them
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
CROP_MODES = ("center", "squash")  # timm's eval crops this code draws (timm's "border" pads instead)


class ImageError(UserError, ValueError):
    """The input is not a usable image; the message is safe to show to the user."""


def open_image(source: bytes | str | Path, draft_size: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `source` (bytes or a path) into an RGB image, EXIF orientation applied, at a
    reduced scale that keeps the shorter side >= `draft_size` (0: full size)."""
    return decode(read_header(source, draft_size, max_pixels), draft_size)


def read_header(source: bytes | str | Path, draft_size: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image opened but not decoded, its pixel count checked against `max_pixels`; its
    `size` is what `decode` will produce before the EXIF rotation.

    JPEGs are set to decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the shorter
    side >= `draft_size` (PIL draft mode), which makes large photos several times cheaper in
    time and memory; the draft comes before the EXIF transposition, which would otherwise
    decode the full-size image."""
    with _image_errors():
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageError("image has no pixels")
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels")
        if image.format == "JPEG":
            _check_jpeg_length(source, width, height)
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        return image


# Arithmetic-coded frames (SOF9-11, SOF13-15) can code a flat block in well under one bit.
_ARITHMETIC_SOF = tuple(bytes((0xFF, marker)) for marker in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _check_jpeg_length(source: bytes | str | Path, width: int, height: int) -> None:
    """A JPEG whose data ends long before the size its header claims is damaged: libjpeg fills
    the missing blocks with grey and only warns (hit a marker), so Pillow decodes it without an
    error, at full size and in draft mode alike. Huffman coding spends at least one bit on each
    8x8 luma block's DC value, so fewer bytes than (blocks / 8) cannot be a whole image."""
    length = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    blocks = -(-width // 8) * -(-height // 8)
    if length * 8 >= blocks:
        return
    data = source if isinstance(source, bytes) else Path(source).read_bytes()  # small: under blocks / 8 bytes
    if any(marker in data for marker in _ARITHMETIC_SOF):
        return
    raise ImageError(f"damaged or truncated image: {length:,} bytes cannot hold the {width}x{height} pixels "
                     f"its JPEG header claims")


def decode(image: Image.Image, draft_size: int = 0) -> Image.Image:
    """The pixels of an image from `read_header`, as RGB: the first frame of a GIF or a
    multi-page TIFF, reduced (see `_reduced`), EXIF orientation applied."""
    with _image_errors():
        image.seek(0)
        image.load()
        image = _reduced(image, draft_size)
        try:  # in place: otherwise an upright photo (most) is copied whole for nothing
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:  # a damaged EXIF block: keep the pixels as stored
            pass
        return to_rgb(image)


def _reduced(image: Image.Image, min_side: int) -> Image.Image:
    """Formats without JPEG's DCT scaling (PNG, WebP, TIFF, ...) decode at full size; a box
    reduction by the largest whole factor that keeps the shorter side >= `min_side` makes the
    conversions and the resize after it cheap in time and memory (a 64 MP RGBA PNG: ~1.4 GB
    of intermediates without it). The counterpart of JPEG's draft mode, for the other formats."""
    factor = min(image.size) // min_side if min_side and image.format != "JPEG" else 1
    if factor < 2:
        return image
    try:
        return image.reduce(factor)
    except (ValueError, NotImplementedError):  # a mode reduce() does not handle (palette, 1-bit, ...)
        return image


@contextlib.contextmanager
def _image_errors():
    """Whatever Pillow raises on a bad file, as an ImageError with a message for the user."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's chatter about EXIF and palettes
            yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image, or an image format that is not supported") from None
    except Image.DecompressionBombError:
        raise ImageError("image is too large (decompression bomb protection)") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, MemoryError, IndexError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"damaged or truncated image: {reason}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode: transparency goes onto white, 16-bit and float scale to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float32)
        peak = float(array.max()) if array.size else 0.0
        if image.mode == "F" and peak <= 1.0:
            array = array * 255.0  # float images in [0, 1]
        elif peak > 255:
            array = array / 257.0  # 16-bit range onto 8 bits
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageError(f"unsupported colour mode {image.mode}") from None


def center_crop(image: Image.Image, preprocessing: dict) -> Image.Image:
    """What the backbone sees, in RGB: the shorter side resized to `resize_size`, then the centre
    `input_size` square (crop mode "squash": each side resized to `resize_size` on its own, then
    the centre square). Done as one resize of the crop box in original coordinates, which is
    the same geometry but never builds a huge intermediate for very wide or tall images."""
    resize, crop = preprocessing["resize_size"], preprocessing["input_size"]
    width, height = image.size
    if preprocessing.get("crop_mode", "center") == "squash":
        box_width, box_height = width * crop / resize, height * crop / resize
    else:
        box_width = box_height = min(width, height) * crop / resize
    left, top = (width - box_width) / 2, (height - box_height) / 2
    cropped = image.resize(
        (crop, crop), RESAMPLING[preprocessing["interpolation"]], box=(left, top, left + box_width, top + box_height)
    )
    return cropped if cropped.mode == "RGB" else cropped.convert("RGB")  # decoded photos are RGB already


def load_crop(source: bytes | str | Path, preprocessing: dict, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """What every path feeds the backbone (backbone.OnCrops) for a file: decoded at the reduced
    size that still covers the crop, centre-cropped, as a uint8 (H, W, 3) array."""
    return np.asarray(center_crop(open_image(source, preprocessing["resize_size"], max_pixels), preprocessing))


def attention_overlay_png(crop: Image.Image, attention: np.ndarray) -> bytes:
    """An attention map (grid_h, grid_w) as a heat overlay on `crop` (the centre crop the
    backbone saw: center_crop), as PNG bytes."""
    from matplotlib import colormaps  # here: only attention answers and figures draw

    size = crop.size
    heat = attention - attention.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    heat_image = Image.fromarray((heat * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    colored = (colormaps["inferno"](np.asarray(heat_image) / 255.0)[..., :3] * 255).astype(np.uint8)
    blended = Image.blend(crop.convert("RGB"), Image.fromarray(colored), alpha=0.55)
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG")
    return buffer.getvalue()
