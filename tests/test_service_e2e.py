"""The service as deployed: `gunicorn predict:app` (gunicorn.conf.py included) on a free
localhost port, real photos from ../shared, two workers sharing the Prometheus counts, a clean
shutdown; and a missing or damaged artifact stopping gunicorn with one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import REPO, sample_photos
from harness.live import free_port, start_gunicorn
from harness.live import stop as stop_group
from vehicle_classifier import config

pytestmark = pytest.mark.system


def gunicorn(model_dir: Path, port: int, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "predict:app"],
        cwd=REPO, env={**os.environ, "MODEL_DIR": str(model_dir), **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()


def pick_photos() -> list[Path]:
    """A few real photos of each class and of every file type in the sample."""
    photos, seen = [], set()
    for path in sample_photos():
        key = (path.parent.name, path.suffix.lower())
        if key not in seen or len(photos) < 6:
            seen.add(key)
            photos.append(path)
    return photos


def test_gunicorn_serves_real_photos(tiny_model_dir, tmp_path):
    photos = pick_photos()
    log = tmp_path / "gunicorn.log"
    proc, url, _ = start_gunicorn(tiny_model_dir, log, {"GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "2"})
    try:
        session = requests.Session()
        for photo in photos:
            with open(photo, "rb") as f:
                response = session.post(f"{url}/predict", files={"file": (photo.name, f)}, timeout=30)
            assert response.status_code == 200, (photo.name, response.text)
            answer = response.json()
            assert answer["label"] in ("Bike", "Car")
            assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

        batch = [("file", (p.name, p.read_bytes())) for p in photos[:3]]
        answer = session.post(f"{url}/predict?attention=1", files=batch, timeout=30).json()
        assert [p["filename"] for p in answer["predictions"]] == [p.name for p in photos[:3]]
        assert all(p["attention_png"] for p in answer["predictions"])

        raw = session.post(f"{url}/predict", data=photos[0].read_bytes(), headers={"Content-Type": "image/jpeg"},
                           timeout=30)
        assert raw.status_code == 200

        bad = session.post(f"{url}/predict", files={"file": ("x.jpg", photos[0].read_bytes()[:500])}, timeout=30)
        assert bad.status_code == 400 and "error" in bad.json()

        meta = session.get(f"{url}/metadata", timeout=10).json()
        assert meta["class_names"] == ["Bike", "Car"]
        # Counts summed over both workers (Prometheus multiprocess mode), not one worker's share.
        ok_requests = len(photos) + 2
        metrics = session.get(f"{url}/metrics", timeout=10).text
        assert f'http_requests_total{{endpoint="/predict",method="POST",status="200"}} {ok_requests:.1f}' in metrics
        assert 'http_requests_total{endpoint="/predict",method="POST",status="400"} 1.0' in metrics
    finally:
        stop_group(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("damage", ["missing", "truncated", "not an artifact"])
def test_bad_artifact_stops_gunicorn_with_one_line(tiny_model_dir, tmp_path, damage):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    artifact = tiny_model_dir / "model.safetensors"
    if damage == "truncated":
        (model_dir / "model.safetensors").write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    elif damage == "not an artifact":
        shutil.copy(REPO / "pyproject.toml", model_dir / "model.safetensors")
    line = failed_start(model_dir)
    assert line.startswith("error: ") and "model.safetensors" in line


def failed_start(model_dir, **env) -> str:
    """gunicorn started with `env`, which must exit non-zero with one line on stderr: that line."""
    proc = gunicorn(model_dir, free_port(), **env)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("name, value, message", [
    ("MAX_UPLOAD_MB", "lots", "MAX_UPLOAD_MB must be a whole number, not 'lots'"),
    ("PRECISION", "fp16", f"PRECISION must be one of {', '.join(config.PRECISIONS)}, not 'fp16'"),
    ("RUNTIME", "tensorrt", "RUNTIME must be one of auto, openvino, torch, not 'tensorrt'"),
    ("OPENVINO_MODE", "fast", "OPENVINO_MODE must be one of adaptive, throughput, latency, not 'fast'"),
    ("DEVICE", "gpu", "DEVICE must be one of cpu, cuda, not 'gpu'"),
    ("GUNICORN_THREADS", "zero", "GUNICORN_THREADS must be a whole number, not 'zero'"),
    ("MAX_REQUEST_PIXELS", "0", "MAX_REQUEST_PIXELS must be at least 1, not 0"),
])
def test_bad_setting_stops_with_one_line(tiny_model_dir, name, value, message):
    env = {**os.environ, "MODEL_DIR": str(tiny_model_dir), name: value}
    out = subprocess.run([sys.executable, "-c", "import predict"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip() == f"error: {message}"


def test_bad_gunicorn_setting_stops_gunicorn_with_one_line(tiny_model_dir):
    line = failed_start(tiny_model_dir, GUNICORN_THREADS="zero")  # read in gunicorn.conf.py
    assert line == "error: GUNICORN_THREADS must be a whole number, not 'zero'"


def test_cuda_without_a_gpu_stops_gunicorn_with_one_line(tiny_model_dir):
    # CUDA_VISIBLE_DEVICES hides any GPU, so this holds on a machine that has one too.
    line = failed_start(tiny_model_dir, DEVICE="cuda", CUDA_VISIBLE_DEVICES="")
    assert line.startswith("error: cuda asked for, but torch (") and "finds no CUDA device here" in line
