"""The service's error answers: every failure is JSON `{"error": "<message>"}`.

Bad input of any kind is a 4xx whose message says what to fix; a 500 means a bug in this code.
A bug's traceback is logged in full the first time it is seen at its place in the code, and in
one line after that: a client repeating a request that trips it cannot flood the log.
"""

from __future__ import annotations

import logging
import threading
import traceback

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .. import UserError

log = logging.getLogger(__name__)


class BadRequest(UserError):
    """A request the client must fix; `status` is the 4xx to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def printable(text: str, limit: int = 200) -> str:
    """`text` fit to echo in a message or a log line: no control, format (bidi overrides,
    zero-width) or unassigned characters, whitespace runs as one space, at most `limit` long."""
    import unicodedata

    kept = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch in "\t\n\r")
    kept = " ".join(kept.split())
    return kept if len(kept) <= limit else kept[: limit - 1] + "…"


def error_response(message: str, status: int, headers: dict | None = None):
    return jsonify(error=message), status, headers or {}


def init_app(app: Flask, max_upload_bytes: int) -> None:
    """Every error of `app` as JSON: the client's faults as their 4xx, bugs as a logged 500."""
    seen_bugs: dict[tuple, int] = {}
    lock = threading.Lock()

    @app.errorhandler(UserError)
    def _bad_request(exc: UserError):  # BadRequest, a bad image, attention of a CNN, ...
        return error_response(str(exc), getattr(exc, "status", 400))

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc):
        return error_response(f"upload is larger than the limit of {max_upload_bytes / 1024 / 1024:g} MB", 413)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        if exc.code == 405:  # RFC 9110: a 405 names the methods that are allowed
            allowed = sorted(getattr(exc, "valid_methods", None) or [])
            return error_response(f"{request.method} is not allowed on {printable(request.path)}; "
                                  f"allowed: {', '.join(allowed)}", 405, {"Allow": ", ".join(allowed)})
        if exc.code == 404:
            return error_response(f"no such endpoint: {printable(request.path)}; see /openapi.json or /docs", 404)
        return error_response(exc.description or exc.name, exc.code or 500)

    @app.errorhandler(Exception)
    def _bug(exc: Exception):
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = (type(exc).__name__, frame.filename if frame else "", frame.lineno if frame else 0)
        with lock:
            count = seen_bugs[where] = seen_bugs.get(where, 0) + 1
            if len(seen_bugs) > 1000:  # bounded: forget the oldest
                seen_bugs.pop(next(iter(seen_bugs)))
        if count == 1:
            log.exception("unhandled error on %s %s", request.method, printable(request.path))
        else:
            log.error("unhandled error on %s %s: %s at %s:%s (seen %d times; traceback logged the first time)",
                      request.method, printable(request.path), *where, count)
        return error_response("internal error: the service failed on this request; it has been logged", 500)
