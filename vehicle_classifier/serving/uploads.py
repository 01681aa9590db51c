"""Reading a /predict request: the body, whole and within a deadline; the images in it, in
the three accepted shapes (multipart 'file' parts, a raw image body, JSON with base64); and
decoding them within the pixel budgets of the request and of the worker."""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import heapq
import io
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flask import request
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header
from werkzeug.exceptions import RequestEntityTooLarge

from ..config import ServiceConfig
from .errors import BadRequest, printable
from ..images import ImageError, center_crop, decode, read_header

HOW_TO_SEND = ("send the image as multipart field 'file' (curl -F file=@photo.jpg), as a raw body "
               "with an image/* content type, or as JSON {\"image\": \"<base64>\"}")
# The values of a yes/no query parameter, each list once (the OpenAPI document lists them too).
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
# python-multipart logs a warning for every malformed body before it raises; the client gets a
# 400 naming the fault (form_parts), so the log would only let a client flood it.
logging.getLogger("python_multipart").setLevel(logging.ERROR)
log = logging.getLogger(__name__)
# Multipart parts beyond the files themselves (each part is parsed; a body of thousands
# of tiny parts costs CPU for nothing).
EXTRA_FORM_PARTS = 16


@dataclass
class Upload:
    name: str  # printable: safe to echo in answers and logs
    data: bytes


@dataclass
class Decoded:
    name: str
    tensor: object  # the preprocessed CHW tensor
    crop: object | None  # the centre crop the backbone saw (PIL image), kept for an attention overlay


def max_form_parts(max_files: int) -> int:
    return max_files + EXTRA_FORM_PARTS


# --- the body -------------------------------------------------------------------------------
class Deadlines:
    """`with deadlines.guard(seconds, on_expiry):` calls `on_expiry()` if the block is still
    running `seconds` from now. One thread per process keeps every deadline (started on first
    use, and again in a forked child). A threading.Timer per upload did the same with a thread
    per request: starting one took 0.1 ms on a quiet 2-core machine and several ms under load
    (benchmarks/bench_service.py)."""

    def __init__(self):
        self._sequence = itertools.count()
        self._afresh()
        # A forked child (a gunicorn worker) has none of its parent's threads, and the parent's
        # lock may have been held at the fork: the child starts with its own.
        os.register_at_fork(after_in_child=self._afresh)

    def _afresh(self) -> None:
        self._heap: list[list] = []  # [deadline, sequence, on_expiry or None once the block ended]
        self._changed = threading.Condition()
        self._keeping = False  # the thread runs

    @contextmanager
    def guard(self, seconds: float, on_expiry: Callable[[], None]) -> Iterator[None]:
        entry = [time.monotonic() + seconds, next(self._sequence), on_expiry]
        with self._changed:
            if not self._keeping:
                threading.Thread(target=self._keep, name="upload-deadlines", daemon=True).start()
                self._keeping = True
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:  # the thread sleeps until the earliest deadline: now this one
                self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                entry[2] = None

    def _keep(self) -> None:
        changed = self._changed  # this process's, for good
        while True:
            with changed:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)  # ended in time
                wait = self._heap[0][0] - time.monotonic() if self._heap else None
                if wait is None or wait > 0:
                    changed.wait(wait)
                    continue
                on_expiry = heapq.heappop(self._heap)[2]
            try:
                on_expiry()
            except Exception:  # the thread keeps every other deadline: it must outlive a failing one
                log.exception("an upload deadline's action failed")


_deadlines = Deadlines()


def receive_body(max_bytes: int, timeout: float) -> None:
    """Under gunicorn, read the whole body now, within `timeout` seconds: when the deadline
    passes, the socket's read side is shut, which ends a blocked read at once, whether the client
    trickles a byte at a time or sends nothing more. The rest of the request reads from memory.
    (Flask's test client has no socket and nothing slow to guard against.)"""
    sock = request.environ.get("gunicorn.socket")
    length = request.content_length
    if sock is None or (length is None and not request.headers.get("Transfer-Encoding")):
        return
    if length is not None and length > max_bytes:
        raise RequestEntityTooLarge()
    expired = threading.Event()

    def cut_off():
        expired.set()
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    with _deadlines.guard(timeout, cut_off):
        try:
            body = _read(request.environ["wsgi.input"], length if length is not None else max_bytes + 1)
        except BadRequest:
            if not expired.is_set():
                raise
            body = b""  # cut off by the deadline: the 408 below says so
    if expired.is_set():
        raise BadRequest(f"the upload did not arrive within {timeout:g} s", status=408)
    if len(body) > max_bytes:
        raise RequestEntityTooLarge()
    if length is not None and len(body) < length:
        raise BadRequest(f"the upload ended after {len(body)} of its {length} bytes")
    request.environ["wsgi.input"] = io.BytesIO(body)


def _read(stream, size: int) -> bytes:
    """The body; a body that cannot be read is the client's fault (gunicorn's parser errors
    are its own exception classes: InvalidChunkSize, ChunkMissingTerminator, NoMoreData, ...)."""
    try:
        return stream.read(size)
    except Exception as exc:
        if "chunk" in type(exc).__name__.lower():
            raise BadRequest("malformed chunked body (Transfer-Encoding: chunked)") from None
        raise BadRequest("the upload ended before the whole body arrived") from None


# --- the images in it -----------------------------------------------------------------------
def read_uploads(max_files: int) -> list[Upload]:
    """The images in the request, in the three accepted shapes."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        return _multipart(max_files)
    if mimetype == "application/json":
        return [_json_upload()]
    if mimetype.startswith("image/"):
        data = request.get_data(cache=False)
        if not data:
            raise BadRequest("the request body is empty; " + HOW_TO_SEND)
        return [Upload("image", data)]
    if not mimetype and not request.content_length and not request.headers.get("Transfer-Encoding"):
        raise BadRequest("no image in the request; " + HOW_TO_SEND)
    raise BadRequest(f"unsupported content type {printable(mimetype, 100) or '(none)'!r}; " + HOW_TO_SEND, status=415)


def _multipart(max_files: int) -> list[Upload]:
    """The 'file' parts of a multipart body, parsed from memory by python-multipart: werkzeug's
    parser, behind request.files, takes several times longer (benchmarks/bench_service.py)."""
    body = request.get_data(cache=True)
    boundary = request.mimetype_params.get("boundary", "").encode("latin-1", "replace")
    if not boundary:
        raise BadRequest("multipart body without a boundary in its Content-Type; " + HOW_TO_SEND)
    parts = body.count(b"--" + boundary) - 1
    if parts > max_form_parts(max_files):
        raise BadRequest(f"{parts} parts in the multipart body; the limit is {max_form_parts(max_files)} "
                         f"(at most {max_files} files per request)", status=413)
    file_parts, fields = form_parts(body, boundary)
    files = [(filename, data) for field, filename, data in file_parts if field == "file"]
    if not files:
        if "file" in fields:  # no filename: a text field (or a filename that could not be parsed)
            raise BadRequest("multipart field 'file' came as a text field, not a file: send it as a file "
                             "part with a plain filename (curl -F file=@photo.jpg)")
        others = sorted({printable(name, 40) for name in [*(field for field, _, _ in file_parts), *fields]} - {""})
        got = f" (got field{'s' if len(others) > 1 else ''}: {', '.join(others[:5])})" if others else ""
        raise BadRequest(f"no multipart field 'file'{got}; " + HOW_TO_SEND)
    if len(files) > max_files:
        raise BadRequest(f"{len(files)} files in one request; the limit is {max_files}")
    uploads = []
    for i, (filename, data) in enumerate(files):
        name = printable(filename.replace("\\", "/").rsplit("/", 1)[-1], 120)
        if not data:
            raise BadRequest(f"{name}: the uploaded file is empty" if name else "no file was uploaded in field 'file'")
        uploads.append(Upload(name or f"file {i + 1}", data))
    return uploads


def form_parts(body: bytes, boundary: bytes) -> tuple[list[tuple[str, str, bytes]], list[str]]:
    """(field name, filename, bytes) of each file part, and the names of the text fields (parts
    without a filename). python-multipart's streaming parser reads the body in place; its
    FormParser would copy every file into a BytesIO first (1.5 ms more for 3 MB)."""
    files, fields, part = [], [], {}

    def on_part_begin():
        part.update(headers={}, field=b"", value=b"", data=[])

    def on_header_end():
        part["headers"][part["field"].lower()] = part["value"]
        part.update(field=b"", value=b"")

    def on_part_end():
        _, options = parse_options_header(part["headers"].get(b"content-disposition"))
        name, filename = _text(options.get(b"name")), options.get(b"filename")
        if filename is None:
            fields.append(name)
        else:
            files.append((name, _text(filename), b"".join(part["data"])))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_end": on_header_end, "on_part_end": on_part_end,
        "on_header_field": lambda data, start, end: part.update(field=part["field"] + data[start:end]),
        "on_header_value": lambda data, start, end: part.update(value=part["value"] + data[start:end]),
        "on_part_data": lambda data, start, end: part["data"].append(data[start:end]),
    })
    try:
        parser.write(body)
        parser.finalize()
    except ValueError as exc:  # python-multipart's parse errors are ValueErrors
        reason = printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 80)
        raise BadRequest(f"malformed multipart body: {reason}; " + HOW_TO_SEND) from None
    return files, fields


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", "replace")


def _json_upload() -> Upload:
    try:
        body = json.loads(request.get_data(cache=False))
    except RecursionError:  # [[[[... 100,000 deep: the parser gives up, and so do we
        raise BadRequest("JSON nested too deeply; expected {\"image\": \"<base64>\"}") from None
    except ValueError:
        raise BadRequest("malformed JSON body; expected {\"image\": \"<base64>\"}") from None
    if not isinstance(body, dict) or "image" not in body:
        raise BadRequest("JSON body must be an object with an \"image\" field holding base64 image bytes")
    name = body.get("filename")
    return Upload(printable(name, 120) if isinstance(name, str) and name.strip() else "image",
                  _decode_base64(body["image"]))


def _decode_base64(value) -> bytes:
    if not isinstance(value, str):
        raise BadRequest("\"image\" must be a base64 string")
    if value.startswith("data:") and "," in value:  # a data URL pasted from a browser
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("\"image\" is not valid base64") from None
    if not data:
        raise BadRequest("\"image\" is empty")
    return data


def flag(name: str) -> bool:
    """A yes/no query parameter, one of TRUE_WORDS or FALSE_WORDS exactly."""
    value = request.args.get(name, "")
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise BadRequest(f"query parameter {name!r} must be one of {', '.join(TRUE_WORDS + FALSE_WORDS[:-1])}, "
                     f"not {printable(value, 40)!r}")


# --- decoding within the budgets ------------------------------------------------------------
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


def decode_uploads(uploads: list[Upload], predictor, settings: ServiceConfig, budget: PixelBudget,
                   keep_crops: bool) -> tuple[list[Decoded], int]:
    """Each upload decoded and preprocessed, one at a time, each full-size image dropped once
    it is a tensor; and the decoded pixel count of the request. Every header is read (and the
    request's total checked) before anything is decoded."""
    preprocessing = predictor.model.preprocessing
    headers = []
    for upload in uploads:
        with _named(upload.name, len(uploads) > 1):
            headers.append(read_header(upload.data, preprocessing["resize_size"], settings.max_image_pixels))
    total = sum(header.width * header.height for header in headers)
    if total > settings.max_request_pixels:
        raise BadRequest(f"the images in this request decode to {total:,} pixels, over the limit of "
                         f"{settings.max_request_pixels:,} per request; send fewer or smaller images", status=413)
    decoded = []
    for upload in uploads:
        header = headers.pop(0)
        with _named(upload.name, len(uploads) > 1), budget.reserve(header.width * header.height):
            image = decode(header, preprocessing["resize_size"])
            crop = center_crop(image, preprocessing) if keep_crops else None
            decoded.append(Decoded(upload.name, predictor.to_tensor(image), crop))
            header.close()
            del image, header  # the full-size pixels go now, not when the request ends
    return decoded, total


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
