"""A /predict request's body, read whole and within a deadline: a trickling or stalled client is
cut off (408) instead of holding a request thread, and everything after reads from memory."""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import BadRequest

log = logging.getLogger(__name__)


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


def receive_body(max_bytes: int, timeout: float) -> bytes:
    """The request's whole body, read once. Under gunicorn within `timeout` seconds: when the
    deadline passes, the socket's read side is shut, which ends a blocked read at once, whether
    the client trickles a byte at a time or sends nothing more. (Flask's test client has no
    socket and nothing slow to guard against: werkzeug reads it, within MAX_CONTENT_LENGTH.)"""
    sock = request.environ.get("gunicorn.socket")
    length = request.content_length
    if sock is None or (length is None and not request.headers.get("Transfer-Encoding")):
        return request.get_data(cache=False)
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
    return body


def _read(stream, size: int) -> bytes:
    """The body; a body that cannot be read is the client's fault (gunicorn's parser errors
    are its own exception classes: InvalidChunkSize, ChunkMissingTerminator, NoMoreData, ...)."""
    try:
        return stream.read(size)
    except Exception as exc:
        if "chunk" in type(exc).__name__.lower():
            raise BadRequest("malformed chunked body (Transfer-Encoding: chunked)") from None
        raise BadRequest("the upload ended before the whole body arrived") from None
