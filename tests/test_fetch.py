"""The data set on first run (vehicle_classifier/fetch.py): kagglehub's cache read offline as a
user's machine has it after a download (a stand-in of its layout: datasets/<owner>/<name>/
versions/<n>/ and the <n>.complete marker), laid out as data/Car-Bike-Dataset/{Car,Bike} and
trained on; and, with Kaggle unreachable, train.py stopping within seconds in at most 3 lines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_dataset

import train
from vehicle_classifier import config
from vehicle_classifier.data import DataError
from vehicle_classifier.training.fetch import ensure_dataset, lay_out

pytestmark = pytest.mark.integration

OWNER, NAME = config.KAGGLE_DATASET.split("/")


def kaggle_cache(root: Path, per_class: int = 6) -> Path:
    """A kagglehub cache holding the data set as a finished download does: the archive's
    Car-Bike-Dataset/ folder extracted under versions/<n>/, and the completion marker."""
    dataset = root / "datasets" / OWNER / NAME
    make_dataset(dataset / "versions" / str(config.KAGGLE_VERSION) / "Car-Bike-Dataset", per_class=per_class)
    (dataset / f"{config.KAGGLE_VERSION}.complete").touch()
    return root


def test_a_missing_default_folder_is_fetched_from_the_kaggle_cache_and_trained_on(tmp_path, monkeypatch, tiny_weights):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(kaggle_cache(tmp_path / "kagglehub")))
    monkeypatch.chdir(tmp_path)  # config.DATA_DIR is relative: the folder a fresh clone lacks
    assert ensure_dataset(config.DATA_DIR)
    cached = tmp_path / "kagglehub" / "datasets" / OWNER / NAME / "versions" / "1" / "Car-Bike-Dataset"
    for name in config.KAGGLE_CLASSES:
        fetched = sorted(p.name for p in (config.DATA_DIR / name).iterdir())
        assert fetched == sorted(p.name for p in (cached / name).iterdir()) and len(fetched) == 6
    assert (config.DATA_DIR / "Car" / "Car_0.jpg").read_bytes() == (cached / "Car" / "Car_0.jpg").read_bytes()
    assert not ensure_dataset(config.DATA_DIR)  # there now: nothing to do
    assert not ensure_dataset(tmp_path / "elsewhere")  # not the default: the scan says it is missing

    code = train.main(["--output-dir", "models", "--backbone", "test-tiny", "--weights", str(tiny_weights),
                       "--cache-dir", "cache", "--max-epochs", "2", "--neither-dir", ""])
    assert code == 0 and (tmp_path / "models" / config.ARTIFACT_FILE).is_file()


def test_without_kaggle_train_stops_within_seconds_in_three_lines(tmp_path):
    # Unreachable whatever this machine's network: every request goes to a proxy on a closed port.
    closed = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update(closed, KAGGLEHUB_CACHE=str(tmp_path / "empty-cache"), PYTHONPATH=str(REPO))
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "train.py")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    seconds = time.monotonic() - started
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and seconds < 20, (seconds, lines)
    assert 1 <= len(lines) <= 3, lines
    assert "Kaggle" in lines[-2] and config.KAGGLE_DATASET in lines[-2]
    assert lines[-1] == (f"get it by hand from https://www.kaggle.com/datasets/{config.KAGGLE_DATASET} and put its "
                         f"Bike/ and Car/ folders in {config.DATA_DIR}/")
    assert not (tmp_path / config.DATA_DIR).exists()


def test_a_download_without_the_class_folders_is_one_error(tmp_path, monkeypatch):
    cache = tmp_path / "kagglehub"
    dataset = cache / "datasets" / OWNER / NAME
    (dataset / "versions" / "1" / "something-else").mkdir(parents=True)
    (dataset / "1.complete").touch()
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="has no Bike and Car folders"):
        ensure_dataset(config.DATA_DIR)
    assert not config.DATA_DIR.exists()


def test_an_interrupted_copy_is_redone_and_never_looks_complete(tmp_path):
    source = make_dataset(tmp_path / "download", per_class=2)
    target = tmp_path / "data" / "Car-Bike-Dataset"
    partial = target.with_name(".Car-Bike-Dataset.partial")
    (partial / "Car").mkdir(parents=True)
    (partial / "Car" / "torn.jpg").write_bytes(b"half")  # what a killed copy left
    lay_out(source, target)
    assert sorted(p.name for p in (target / "Car").iterdir()) == ["Car_0.jpg", "Car_1.png"]
    assert not partial.exists()
