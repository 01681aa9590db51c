"""The service as an attacker or a fuzzer meets it: `gunicorn predict:app` on a free loopback
port, schemathesis with every check against its own /openapi.json, and the crafted requests a
test client cannot send (malformed chunked bodies, 100,000-deep JSON, 10,000 multipart parts,
odd filenames). Each is a 4xx JSON answer; nothing writes a traceback to the log."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image

from harness.live import gunicorn_service

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
SCHEMATHESIS_EXAMPLES = 25  # per operation: the suite's time budget (~30 s for all checks)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    with gunicorn_service(tiny_model_dir, log) as url:
        yield url, log


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, dict, dict]:
    """Send bytes as they are (no client library tidies them up); (status, headers, JSON)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    header_block, _, content = reply.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(content)


def test_schemathesis_every_check_passes(served, tmp_path):
    url, log = served
    args = [str(Path(sys.executable).parent / "schemathesis"), "--no-color", "--config-file", str(REPO / "tests" / "schemathesis.toml"),
            "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", str(SCHEMATHESIS_EXAMPLES),
            "--seed", "1", "--report-dir", str(tmp_path)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    assert "Traceback" not in log.read_text()


def test_malformed_chunked_body_is_400(served):
    url, log = served
    head = "POST /predict HTTP/1.1\nHost: x\nContent-Type: image/jpeg\nTransfer-Encoding: chunked\nConnection: close\n"
    status, _, answer = raw_request(url, head, b"zz\r\nabc\r\n0\r\n\r\n")
    assert status == 400 and "chunked" in answer["error"]
    data = jpeg()
    good = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
    status, _, answer = raw_request(url, head, good)  # a well-formed chunked upload is read whole
    assert status == 200 and answer["label"] in ("Bike", "Car")


def test_deeply_nested_json_is_400(served):
    url, _ = served
    body = b"[" * 100_000 + b"]" * 100_000
    response = requests.post(f"{url}/predict", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]


def test_ten_thousand_parts_are_413_and_say_so(served):
    url, _ = served
    files = [("field", (None, "x"))] * 10_000
    response = requests.post(f"{url}/predict", files=files, timeout=60)
    assert response.status_code == 413
    assert "10000 parts in the multipart body; the limit is" in response.json()["error"]


def test_filename_with_a_newline_gets_a_message_that_fits(served):
    url, _ = served
    data = jpeg()
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\nb.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; boundary={boundary}\n"
            f"Content-Length: {len(body)}\nConnection: close\n")
    status, _, answer = raw_request(url, head, body)
    assert status in (200, 400), answer
    if status == 400:
        assert "(got field: file)" not in answer["error"] and "file" in answer["error"]


def test_control_and_bidi_characters_are_not_echoed(served):
    url, _ = served
    name = "car\u202egpj.exe\x1b[31m\u200b.jpg"
    files = [("file", (name, jpeg())), ("file", (name, b"not an image"))]
    response = requests.post(f"{url}/predict", files=files, timeout=30)
    assert response.status_code == 400
    message = response.json()["error"]
    assert message.startswith("cargpj.exe[31m.jpg: ") and not any(c in message for c in "\u202e\x1b\u200b")


@pytest.mark.parametrize("method, path, allowed", [("GET", "/predict", {"POST"}), ("DELETE", "/health", {"GET", "HEAD"})])
def test_405_names_the_allowed_methods(served, method, path, allowed):
    url, _ = served
    response = requests.request(method, f"{url}{path}", timeout=10)
    assert response.status_code == 405
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}
    assert "allowed: " in response.json()["error"]


def test_no_bad_request_wrote_a_traceback(served):
    _, log = served
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("image", ["    ", "\n\t  \n", "data:image/png;base64,    "])
def test_a_blank_base64_image_is_outside_the_schema_as_the_service_refuses_it(image):
    """What schemathesis once found (ST202): a blank string matched the documented pattern."""
    import pydantic

    from vehicle_classifier.serving.schemas import PredictJSON

    with pytest.raises(pydantic.ValidationError):
        PredictJSON(image=image)
    assert PredictJSON(image="AAAA").image == "AAAA"
