"""A new model without a restart: `gunicorn predict:app` under load, a model published into its
MODEL_DIR by training, then SIGHUP to the master (what `make reload` sends): every answer from
then on comes from the new model, and no request fails. A damaged artifact published the same
way is refused in the master before any worker is touched: the old model keeps answering."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from conftest import TINY_SPEC
from harness.live import gunicorn_service
from vehicle_classifier import config
from vehicle_classifier.training.job import Job
from vehicle_classifier.training.run import run_training

pytestmark = pytest.mark.system
CLIENTS = 4


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (120, 90), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


class Load:
    """CLIENTS threads posting photos until stopped; every failure kept, and each version seen."""

    def __init__(self, url: str):
        self.url, self.body, self.failures, self.answers = url, jpeg(), [], 0
        self.versions: list[str] = []
        self.running = True
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        while self.running:
            try:
                reply = requests.post(f"{self.url}/predict", data=self.body,
                                      headers={"Content-Type": "image/jpeg"}, timeout=60)
                if reply.status_code != 200:
                    self.failures.append(f"{reply.status_code}: {reply.text[:200]}")
                else:
                    self.answers += 1
                    self.versions.append(reply.json()["model_version"])
            except requests.RequestException as exc:
                self.failures.append(repr(exc))

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(timeout=90)


def version(url: str) -> str:
    return requests.get(f"{url}/metadata", timeout=30).json()["model_version"]


def hup_and_wait(url: str, pidfile: Path, log: Path, expect: str, timeout: float = 120) -> None:
    """SIGHUP the master; wait until `expect` (a model version, or a line of the log) shows."""
    marker = len(log.read_text(errors="replace"))
    os.kill(int(pidfile.read_text()), signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if version(url) == expect or expect in log.read_text(errors="replace")[marker:]:
            return
        time.sleep(0.5)
    pytest.fail(f"{expect!r} not seen {timeout:g} s after SIGHUP:\n{log.read_text()[-3000:]}")


def test_sighup_serves_the_new_model_and_refuses_a_damaged_one(tmp_path, synthetic_dataset, tiny_weights):
    served, cache, log, pidfile = tmp_path / "models", tmp_path / "cache", tmp_path / "gunicorn.log", tmp_path / "pid"
    train = lambda epochs: run_training(Job(synthetic_dataset, served, config.TrainConfig(  # noqa: E731
        backbone=TINY_SPEC.name, max_epochs=epochs, patience=epochs, neither_dir=""), tiny_weights, cache, spec=TINY_SPEC))
    train(3)
    settings = {"GUNICORN_WORKERS": "2", "GUNICORN_PIDFILE": str(pidfile)}
    with gunicorn_service(served, log, settings) as url, Load(url) as load:
        old = version(url)
        train(4)  # published into the served folder while it answers
        new = config_version(served)
        assert new != old and version(url) == old  # published, not yet served
        hup_and_wait(url, pidfile, log, new)
        answered = load.answers
        damaged = served / config.ARTIFACT_FILE
        damaged.write_bytes(damaged.read_bytes()[:1000])  # truncated
        hup_and_wait(url, pidfile, log, "refused the model")
        time.sleep(3)  # new workers (with the loaded model) replace the old ones meanwhile
        assert requests.get(f"{url}/health", timeout=30).status_code == 200 and version(url) == new
        assert load.answers > answered
    assert load.failures == [], load.failures[:5]
    assert load.versions[-1] == new and set(load.versions) == {old, new}
    assert "SIGHUP: refused the model" in log.read_text() and "Traceback" not in log.read_text()


def config_version(model_dir: Path) -> str:
    from vehicle_classifier.artifact import read_metadata

    return read_metadata(model_dir / config.ARTIFACT_FILE)["model_version"]
