"""Data-parallel extraction and batch prediction under torchrun, with two CPU processes (gloo
over loopback): files sharded by rank, parts merged by rank 0, the same results as one process."""

import csv
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_SPEC, make_dataset
from harness.live import free_port
from vehicle_classifier import config
from vehicle_classifier.offline import batch
from vehicle_classifier.training.job import Job
from vehicle_classifier.training.run import run_training
from vehicle_classifier.training.features import FeatureCache

pytestmark = pytest.mark.system


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *map(str, args)]
    # gloo over loopback only; one thread per process, as torchrun would set anyway.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def cached_features(folder):
    with FeatureCache(folder.parent, folder.name) as cache:
        return dict(cache.features)


def read_rows(path):
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def test_two_ranks_extract_train_and_predict_as_one_process_does(tiny_weights, tmp_path):
    photos = make_dataset(tmp_path / "photos", per_class=5, seed=11)
    out, cache, predictions = tmp_path / "out", tmp_path / "cache", tmp_path / "predicted" / "p.csv"
    result = torchrun("tests/torchrun_job.py", photos, tiny_weights, out, cache, predictions)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 of 2: trained" in result.stdout and "rank 1 of 2: extracted its shard" in result.stdout
    assert (out / config.ARTIFACT_FILE).is_file()
    # Extraction: one cache folder, the parts merged into it and removed, each rank did half.
    (merged,) = [p for p in cache.iterdir() if p.is_dir()]
    assert ".part" not in merged.name
    shared = cached_features(merged)
    assert len(shared) == 10
    totals = set(re.findall(r"(extracting features|predicting): +\d+%\|[^|]*\| \d+/(\d+)", result.stderr))
    assert totals == {("extracting features", "5"), ("predicting", "5")}  # each rank's bar: half the photos
    # Batch prediction: one results file, every photo once, the parts removed.
    assert "10 classified, 0 unreadable" in result.stdout
    assert [p.name for p in predictions.parent.iterdir()] == ["p.csv"]
    together = read_rows(predictions)

    # One process, the same inputs: the same features and the same answers.
    single = tmp_path / "single-cache"
    cfg = config.TrainConfig(backbone=TINY_SPEC.name, max_epochs=5, neither_dir="")
    run_training(Job(photos, tmp_path / "single-out", cfg, tiny_weights, single, device="cpu", spec=TINY_SPEC))
    (alone,) = [p for p in single.iterdir() if p.is_dir()]
    assert alone.name == merged.name
    for digest, feature in cached_features(alone).items():
        assert torch.nn.functional.cosine_similarity(feature, shared[digest], dim=0) > 0.999
    assert batch.main([str(photos), "--model-dir", str(out), "--output", str(tmp_path / "one.csv")]) == 0
    alone_rows = read_rows(tmp_path / "one.csv")
    assert together.keys() == alone_rows.keys() and len(together) == 10
    for path, row in alone_rows.items():
        assert together[path]["label"] == row["label"]
        assert abs(float(together[path]["confidence"]) - float(row["confidence"])) < 5e-3
