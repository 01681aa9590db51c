"""The images in a /predict request, in the three accepted shapes: multipart 'file' parts, a
raw image body, or JSON with base64; and the request's yes/no flags."""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
from dataclasses import dataclass

from flask import request
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from .errors import BadRequest, printable

HOW_TO_SEND = ("send the image as multipart field 'file' (curl -F file=@photo.jpg), as a raw body "
               "with an image/* content type, or as JSON {\"image\": \"<base64>\"}")
# The values of a yes/no query parameter, each list once (the OpenAPI document lists them too).
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
# python-multipart logs a warning for every malformed body before it raises; the client gets a
# 400 naming the fault (form_parts), so the log would only let a client flood it.
logging.getLogger("python_multipart").setLevel(logging.ERROR)
# Multipart parts beyond the files themselves (each part is parsed; a body of thousands
# of tiny parts costs CPU for nothing).
EXTRA_FORM_PARTS = 16


@dataclass
class Upload:
    name: str  # printable: safe to echo in answers and logs
    data: bytes


def max_form_parts(max_files: int) -> int:
    return max_files + EXTRA_FORM_PARTS


# --- the images in it -----------------------------------------------------------------------
def read_uploads(body: bytes, max_files: int) -> list[Upload]:
    """The images in the request's `body` (body.receive_body), in the three accepted shapes."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        return _multipart(body, max_files)
    if mimetype == "application/json":
        return [_json_upload(body)]
    if mimetype.startswith("image/"):
        data = body
        if not data:
            raise BadRequest("the request body is empty; " + HOW_TO_SEND)
        return [Upload("image", data)]
    if not mimetype and not request.content_length and not request.headers.get("Transfer-Encoding"):
        raise BadRequest("no image in the request; " + HOW_TO_SEND)
    raise BadRequest(f"unsupported content type {printable(mimetype, 100) or '(none)'!r}; " + HOW_TO_SEND, status=415)


def _multipart(body: bytes, max_files: int) -> list[Upload]:
    """The 'file' parts of a multipart body, parsed from memory by python-multipart: werkzeug's
    parser, behind request.files, takes several times longer (benchmarks/bench_service.py)."""
    boundary = request.mimetype_params.get("boundary", "").encode("latin-1", "replace")
    if not boundary:
        raise BadRequest("multipart body without a boundary in its Content-Type; " + HOW_TO_SEND)
    try:
        file_parts, fields = form_parts(body, boundary, max_form_parts(max_files))
    except TooManyParts:  # only now is the whole body counted, for the message
        raise BadRequest(f"{body.count(b'--' + boundary) - 1} parts in the multipart body; the limit is "
                         f"{max_form_parts(max_files)} (at most {max_files} files per request)", status=413) from None
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


class TooManyParts(Exception):
    """Raised by form_parts as soon as a body's parts pass the limit: the rest is not parsed."""


def form_parts(body: bytes, boundary: bytes, max_parts: int | None = None) -> tuple[list[tuple[str, str, bytes]],
                                                                                   list[str]]:
    """(field name, filename, bytes) of each file part, and the names of the text fields (parts
    without a filename); TooManyParts once more than `max_parts` begin. python-multipart's
    streaming parser reads the body in place; its FormParser would copy every file into a
    BytesIO first (1.5 ms more for 3 MB). Counting the parts as they begin, rather than the
    boundaries in the whole body first, saves a pass over the body (0.05 ms for 416 KB)."""
    files, fields, part = [], [], {}
    begun = itertools.count(1)

    def on_part_begin():
        if max_parts is not None and next(begun) > max_parts:
            raise TooManyParts()
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


def _json_upload(data: bytes) -> Upload:
    try:
        body = json.loads(data)
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
