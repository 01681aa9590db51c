"""Pretrained weights from the Hugging Face cache and hub, as a user's machine has them: a real
cache layout read offline, a hub that is unreachable or silent (a few seconds, then the line
asking for a weights file: train.py's --weights), and a hub reached through a proxy. The cache
and proxy cases run in a fresh interpreter, as huggingface_hub reads HF_HOME and the proxies
once, at import."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import torch
from safetensors.torch import save

from conftest import REPO, TINY_SPEC
from harness.live import free_port
from vehicle_classifier.backbone import (
    WeightsError, create_backbone, find_pretrained_weights, state_dict_digest,
)
from vehicle_classifier.config import HUB_TIMEOUT, HUB_WEIGHTS_FILE

pytestmark = pytest.mark.integration

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Looks the tiny backbone's weights up as train.py would, then prints what it found as JSON.
LOOKUP = """
import json, sys, time
from vehicle_classifier.backbone import WeightsError, load_backbone, find_pretrained_weights
from vehicle_classifier.registry import BackboneSpec
from vehicle_classifier.training.fingerprint import weights_identity
spec = BackboneSpec({name!r}, {architecture!r}, official_file={official!r}, model_kwargs={kwargs!r})
started = time.monotonic()
try:
    path = find_pretrained_weights(spec)
    model, digest = load_backbone(spec)
    print(json.dumps({{"path": str(path), "digest": digest, "identity": weights_identity(spec, None)}}))
except WeightsError as exc:
    print(json.dumps({{"error": str(exc), "seconds": time.monotonic() - started}}))
"""


def weights_file() -> tuple[bytes, str]:
    """timm-format weights (safetensors) of the tiny backbone, and their digest once loaded."""
    torch.manual_seed(3)
    state = create_backbone(TINY_SPEC.architecture, TINY_SPEC.model_kwargs).state_dict()
    return save(state), state_dict_digest(state)


def lookup(tmp_path, **env) -> dict:
    code = LOOKUP.format(name=TINY_SPEC.name, architecture=TINY_SPEC.architecture,
                         official=TINY_SPEC.official_file, kwargs=TINY_SPEC.model_kwargs)
    clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("HF_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**clean, "HF_HOME": str(tmp_path / "hf"), **env})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_weights_are_found_in_a_real_hugging_face_cache_offline(tmp_path):
    """The layout huggingface_hub itself writes: content-addressed blobs, a snapshot per commit
    linking to them, and refs/main naming the commit."""
    data, digest = weights_file()
    blob = hashlib.sha256(data).hexdigest()
    repo = tmp_path / "hf" / "hub" / f"models--{TINY_SPEC.hub_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / blob).write_bytes(data)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / HUB_WEIGHTS_FILE).symlink_to(f"../../blobs/{blob}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)

    found = lookup(tmp_path, HF_HUB_OFFLINE="1")
    assert found["path"] == str(repo / "snapshots" / COMMIT / HUB_WEIGHTS_FILE)
    assert found["digest"] == digest  # loaded strictly, the very tensors written
    assert found["identity"] == f"hub:{blob}"  # what decides whether a rerun is up to date


def test_an_unreachable_hub_fails_within_seconds(monkeypatch, tmp_path):
    """Nothing listening, or a server that never answers: the line asking for a weights file,
    after at most HUB_TIMEOUT, not the minute of retries hf_hub_download alone would take."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        for port, reason in ((free_port(), "Connect"), (silent.getsockname()[1], "Timeout")):
            # What HF_ENDPOINT=http://127.0.0.1:port sets when huggingface_hub is imported.
            monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
            monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                                f"http://127.0.0.1:{port}/{{repo_id}}/resolve/{{revision}}/{{filename}}")
            started = time.monotonic()
            with pytest.raises(WeightsError, match=rf"is unreachable. Pass a weights file: .*WEIGHTS=path/to/file make run\)\. \(\w*{reason}"):
                find_pretrained_weights(TINY_SPEC)
            # (plus, the first time, a second or two building huggingface_hub's HTTP client)
            assert time.monotonic() - started < HUB_TIMEOUT + 4


class FakeHubProxy(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy in front of a one-file hub: answers requests for absolute URLs on the
    (unresolvable) hub host, which only a client that honours HTTP_PROXY sends here."""

    data = b""
    seen: list[str] = []

    def _answer(self, body: bool):
        self.seen.append(f"{self.command} {self.path}")
        if not self.path.startswith("http://hub.invalid/") or not self.path.endswith(f"/{HUB_WEIGHTS_FILE}"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(self.data).hexdigest()}"')
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        if body:
            self.wfile.write(self.data)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def log_message(self, *args):
        pass


def test_the_hub_is_reached_through_a_proxy(tmp_path):
    """The hub's host does not even resolve here; the proxy in HTTP_PROXY serves it. A raw TCP
    probe of the hub would call it unreachable; huggingface_hub's own client downloads."""
    FakeHubProxy.data, digest = weights_file()
    FakeHubProxy.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHubProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proxy = f"http://127.0.0.1:{server.server_address[1]}"
        found = lookup(tmp_path, HF_ENDPOINT="http://hub.invalid", HTTP_PROXY=proxy, HTTPS_PROXY=proxy)
    finally:
        server.shutdown()
        server.server_close()
    assert found.get("digest") == digest, found
    assert found["path"].startswith(str(tmp_path / "hf" / "hub"))  # into the cache, for next time
    assert any(s.startswith("GET http://hub.invalid/timm/") for s in FakeHubProxy.seen), FakeHubProxy.seen

