"""The HTTP client and `test.py` against the real service (its Flask app with the tiny model), a
port with nothing listening, a server that never answers and a web server that is not ours."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import synthetic_image
from harness.live import REPO, free_port
from vehicle_classifier.client import PredictionClient, ServiceError

pytestmark = pytest.mark.integration

# "Car (97.1%)", or for a photo out of distribution (the tiny model's synthetic stripes are
# nothing like real photos) "neither a car nor a bike? (out of distribution: ...; closer class Car (97.1%))".
ANSWER_LINE = re.compile(r"^(?P<path>.+): (?P<neither>neither a car nor a bike\? \(out of distribution: "
                         r"distance \d+\.\d\d; closer class )?(?P<label>Bike|Car) \((?P<pct>\d{1,3}\.\d)%\)\)?$")


@pytest.fixture
def dead_url():
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def run_cli(*args, cwd=REPO, url=None):
    command = [sys.executable, str(REPO / "test.py"), *map(str, args)] + (["--url", url] if url else [])
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def direct_answer(url: str, path: Path) -> dict:
    """What the service answers for one photo, asked without the client."""
    response = requests.post(f"{url}/predict", files={"file": (path.name, path.read_bytes())}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


# --- the client -------------------------------------------------------------------------------
def test_ready_and_metadata(service, tiny_model_dir):
    client = PredictionClient(service)
    ready = client.ready()
    metadata = client.metadata()
    assert ready["ready"] is True
    assert metadata["class_names"] == ["Bike", "Car"]
    assert ready["model_version"] == metadata["model_version"]
    assert metadata["metrics"]["test"]["accuracy"] == pytest.approx(
        json.loads((tiny_model_dir / "metrics.json").read_text())["test"]["accuracy"])


def test_predict_one_photo_matches_the_service(service, photos):
    client = PredictionClient(service)
    for path in photos:
        answer = client.predict(path.read_bytes(), filename=path.name)
        expected = direct_answer(service, path)
        assert answer["label"] == expected["label"] and answer["label"] in ("Bike", "Car")
        assert answer["confidence"] == pytest.approx(expected["confidence"], abs=1e-6)
        assert answer["confidence"] == max(answer["probabilities"].values())
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert "attention_png" not in answer


def test_predict_with_attention_returns_a_png_overlay(service, photos):
    answer = PredictionClient(service).predict(photos[0].read_bytes(), photos[0].name, attention=True)
    overlay = Image.open(io.BytesIO(base64.b64decode(answer["attention_png"])))
    assert overlay.format == "PNG" and min(overlay.size) > 1


def test_predict_many_keeps_order_and_agrees_with_single_answers(service, photos):
    client = PredictionClient(service)
    answers = client.predict_many([(p.name, p.read_bytes()) for p in photos])
    assert [a["filename"] for a in answers] == [p.name for p in photos]
    for path, answer in zip(photos, answers):
        assert answer["label"] == direct_answer(service, path)["label"]
    with_attention = client.predict_many([(p.name, p.read_bytes()) for p in photos[:2]], attention=True)
    assert all(base64.b64decode(a["attention_png"])[:8] == b"\x89PNG\r\n\x1a\n" for a in with_attention)
    assert client.predict_many([]) == []


def test_service_error_message_is_passed_on(service):
    with pytest.raises(ServiceError) as caught:
        PredictionClient(service).predict(b"this is not a photo", filename="notes.jpg")
    direct = requests.post(f"{service}/predict", files={"file": ("notes.jpg", b"this is not a photo")}, timeout=30)
    assert 400 <= caught.value.status < 500 and caught.value.status == direct.status_code
    assert str(caught.value) == f"rejected by the service: {direct.json()['error']}"


def test_url_without_scheme_works(service):
    assert PredictionClient(service.removeprefix("http://")).ready()["ready"] is True


def test_connection_refused_is_one_plain_sentence(dead_url):
    with pytest.raises(ServiceError) as caught:
        PredictionClient(dead_url).ready()
    assert caught.value.status is None
    assert str(caught.value) == f"cannot reach the prediction service at {dead_url}: connection refused; is it running?"


def test_a_service_that_never_answers_times_out():
    # A listening socket nobody accepts from: the connection opens (kernel backlog), no answer comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ServiceError) as caught:
            PredictionClient(url, timeout=1.5).predict(b"x", "a.jpg")
    assert caught.value.status is None
    assert "did not answer within 1.5 s" in str(caught.value)


def test_a_web_server_that_is_not_the_service(tmp_path):
    (tmp_path / "index.html").write_text("<html><body>hello</body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(ServiceError) as caught:
            PredictionClient(url).ready()  # a 404 page in HTML
        assert caught.value.status == 404
        assert str(caught.value) == (f"{url} answered HTTP 404 with text/html, not the prediction service's JSON; "
                                     "is the URL right?")
    finally:
        server.shutdown()
        server.server_close()


def test_client_and_cli_do_not_import_torch():
    code = ("import sys, runpy; import vehicle_classifier.client; runpy.run_path('test.py', run_name='imported'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- test.py ----------------------------------------------------------------------------------
def test_cli_prints_label_and_confidence_per_photo(service, photos):
    result = run_cli(*photos, url=service)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(photos)
    for path, line in zip(photos, lines):
        match = ANSWER_LINE.match(line)
        assert match, line
        expected = direct_answer(service, path)
        assert match["path"] == str(path) and match["label"] == expected["label"]
        assert float(match["pct"]) == pytest.approx(100 * expected["confidence"], abs=0.051)
        assert bool(match["neither"]) == (expected["in_distribution"] is False)


def test_cli_takes_a_folder(service, tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "sub").mkdir()
    synthetic_image("Car", rng).save(tmp_path / "a.png")
    synthetic_image("Bike", rng).save(tmp_path / "sub" / "b.webp")
    (tmp_path / "notes.txt").write_text("not a photo, and not an image extension: skipped")
    result = run_cli(tmp_path, url=service)
    assert result.returncode == 0, result.stderr
    assert [ANSWER_LINE.match(line)["path"] for line in result.stdout.splitlines()] == [
        str(tmp_path / "a.png"), str(tmp_path / "sub" / "b.webp")]


def test_cli_uses_a_photo_from_the_data_directory(service, tmp_path):
    data = tmp_path / "data" / "Car-Bike-Dataset"
    (data / "Car").mkdir(parents=True)
    synthetic_image("Car", np.random.default_rng(2)).save(data / "Car" / "x.jpg")
    result = run_cli(cwd=tmp_path, url=service)
    assert result.returncode == 0, result.stderr
    assert ANSWER_LINE.match(result.stdout.strip())["path"] == "data/Car-Bike-Dataset/Car/x.jpg"


def test_cli_without_photos_says_where_to_put_one(tmp_path, dead_url):
    result = run_cli(cwd=tmp_path, url=dead_url)  # says so before it would need the service
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "no image given and none found under data/Car-Bike-Dataset/" in result.stderr


def test_cli_service_down_is_one_line(photos, dead_url):
    result = run_cli(*photos, url=dead_url)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: cannot reach the prediction service at {dead_url}: connection refused; is it running?\n"


def test_cli_reports_bad_files_and_still_answers_the_good_ones(service, photos, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("this is not a photo")
    missing = tmp_path / "missing.jpg"
    result = run_cli(photos[0], notes, missing, url=service)
    assert result.returncode == 1
    assert ANSWER_LINE.match(result.stdout.strip())["path"] == str(photos[0])
    errors = result.stderr.splitlines()
    assert len(errors) == 2 and "Traceback" not in result.stderr
    assert errors[0].startswith(f"{notes}: error: rejected by the service: ")
    assert errors[1] == f"{missing}: error: cannot read it (No such file or directory)"
