"""The data audit's whole runs, each in a process of its own as a user runs them: train.py
leaving out what the audit of real sample photos with planted faults flagged (conftest's
`planted_audit`, shared with tests/test_audit.py), and `python -m vehicle_classifier.audit` on a
synthetic folder. Whole runs in subprocesses: the system tier."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import LITE0_BACKBONE, REPO, make_dataset, synthetic_image

from vehicle_classifier import config

pytestmark = pytest.mark.system


def test_training_leaves_out_what_the_audit_flagged(planted_audit, tmp_path, lite0_weights, real_feature_cache):
    data, out, planted, _ = planted_audit
    report = json.loads((out / config.AUDIT_FILE).read_text())
    # A process of its own, as a user runs it (in this one, the next plant's extraction once hung
    # in a forked decoding worker).
    result = subprocess.run([sys.executable, "train.py", "--data-dir", str(data), "--output-dir", str(tmp_path / "model"),
                             "--backbone", LITE0_BACKBONE, "--weights", str(lite0_weights), "--cache-dir",
                             str(real_feature_cache), "--neither-dir", "", "--exclude", str(out / config.AUDIT_FILE)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"audit {out / config.AUDIT_FILE}: left out" in result.stderr
    metrics = json.loads((tmp_path / "model" / config.METRICS_FILE).read_text())
    excluded = metrics["summary"]["excluded"]
    flagged = [item["path"] for item in report["label_issues"] if item["issue"]]
    assert excluded["label_issues"] == len(flagged) and sum(p in flagged for p in planted["moved"]) >= 14
    assert excluded["near_duplicate_copies"] >= 10 and excluded["not_found"] == 0
    # The split the run would have made is the one the audit reported crossings of.
    assert excluded["pairs_across_split_without_exclusion"] == sum(p["crosses_split"] for p in report["near_duplicates"])
    split = json.loads((tmp_path / "model" / config.SPLIT_FILE).read_text())
    used = set(split["train"] + split["val"] + split["test"])
    assert not used & set(flagged)
    assert all(not set(p["paths"]) <= used for p in report["near_duplicates"])  # one photo of each pair at most
    assert metrics["summary"]["images_found"] - len(used) >= excluded["label_issues"] + excluded["near_duplicate_copies"]


def test_the_audit_runs_as_a_module_on_a_synthetic_folder(tmp_path, lite0_weights):
    data = make_dataset(tmp_path / "data", per_class=12)
    synthetic_image("Car", np.random.default_rng(5)).save(data / "Bike" / "filed_wrong.png")
    result = subprocess.run([sys.executable, "-m", "vehicle_classifier.audit", "--data-dir", str(data), "--output-dir",
                             str(tmp_path / "out"), "--backbone", LITE0_BACKBONE, "--weights", str(lite0_weights),
                             "--cache-dir", str(tmp_path / "cache")], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / config.AUDIT_FILE).read_text())
    assert report["label_issues"][0]["path"] == "Bike/filed_wrong.png"
    assert report["label_issues"][0]["suggested"] == "Car"
    assert "hashing photos" in result.stderr  # progress
