"""Decoding a request's images within the pixel budgets of the request and of the worker, each
into the centre crop the backbone sees, one at a time: a full-size photo is dropped as soon as
its crop exists. And handing the freed memory back afterwards.

The crop is images.center_crop with the model's preprocessing, as training's (images.py): the
serving layer stands on the model layer's data and never hands the predictor's own methods
back down to be called from here."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from ..config import ServiceConfig
from ..images import ImageError, center_crop, decode, read_header
from .errors import BadRequest
from .uploads import Upload


class PixelBudget:
    """The decoded pixels a worker holds at once: `with budget.reserve(n):` waits while the
    images other threads are decoding leave less than `n` of `capacity` (a request larger than
    the whole capacity waits until it is alone). This bounds a worker's decoding memory under
    any mix of requests."""

    def __init__(self, capacity: int):
        self.capacity, self.in_use = capacity, 0
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + pixels <= self.capacity)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= pixels
                self._changed.notify_all()


def decode_uploads(uploads: list[Upload], settings: ServiceConfig, budget: PixelBudget, preprocessing: dict,
                   draft_size: int) -> tuple[list[Image.Image], int]:
    """Each upload decoded (at `draft_size` or above: the predictor's) and centre-cropped with
    the model's `preprocessing`, one at a time, each full-size image dropped once its crop
    exists; and the decoded pixel count of the request. Every header is read (and the
    request's total checked) before anything is decoded."""
    headers = []
    for upload in uploads:
        with _named(upload.name, len(uploads) > 1):
            headers.append(read_header(upload.data, draft_size, settings.max_image_pixels))
    total = sum(header.width * header.height for header in headers)
    if total > settings.max_request_pixels:
        raise BadRequest(f"the images in this request decode to {total:,} pixels, over the limit of "
                         f"{settings.max_request_pixels:,} per request; send fewer or smaller images", status=413)
    crops = []
    for upload in uploads:
        header = headers.pop(0)
        with _named(upload.name, len(uploads) > 1), budget.reserve(header.width * header.height):
            image = decode(header, draft_size)
            crops.append(center_crop(image, preprocessing))
            header.close()
            del image, header  # the full-size pixels go now, not when the request ends
    return crops, total


@contextmanager
def _named(name: str, several: bool) -> Iterator[None]:
    """An image error names its file when the request holds several."""
    try:
        yield
    except ImageError as exc:
        if not several:
            raise
        raise ImageError(f"{name}: {exc}") from None


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only


def release_memory() -> None:
    """Hand freed heap memory back to the system. A large image is freed in blocks that glibc
    keeps for reuse in the heap of the thread that decoded it (one heap per thread): without
    this a worker stays at its largest request's peak."""
    if _malloc_trim is not None:
        _malloc_trim(0)
