"""train.py run whole, as a user runs it, in a process of its own: the real ViT-S/16 architecture
(random weights in the official DINO format) on real photos, then reruns (up to date, --force,
a changed setting). Whole training runs in subprocesses: the system tier (tests/test_train_cli.py
has the short runs: --help and one-line errors)."""

import json

import pytest

from test_train_cli import photo_folder, vits16_weights  # noqa: F401 (fixtures)
from test_train_cli import run_train
from vehicle_classifier import config

pytestmark = pytest.mark.system


def test_train_writes_artifact_metrics_and_plots_then_reruns_from_cache(tmp_path, photo_folder, vits16_weights):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--data-dir", photo_folder, "--weights", vits16_weights, "--output-dir", out, "--cache-dir", cache]
    first = run_train(*args)
    assert first.returncode == 0, first.stderr
    assert "extracting features" in first.stderr
    assert "model written to" in first.stdout
    for name in (config.ARTIFACT_FILE, config.METRICS_FILE, config.SPLIT_FILE, config.HISTORY_PLOT,
                 config.CONFUSION_PLOT):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / config.METRICS_FILE).read_text())
    assert metrics["summary"]["images_found"] == 28 and metrics["summary"]["images_skipped"] == 0
    assert {"accuracy", "roc_auc", "per_class", "confusion_matrix"} <= set(metrics["test"])
    stamp = (out / config.ARTIFACT_FILE).stat().st_mtime_ns

    # Same inputs: nothing to do, and the artifact is left alone.
    again = run_train(*args)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert (out / config.ARTIFACT_FILE).stat().st_mtime_ns == stamp

    # --force retrains the head from cached features: the backbone does not run.
    forced = run_train(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "extracting features" not in forced.stderr
    assert (out / config.ARTIFACT_FILE).stat().st_mtime_ns != stamp

    # A changed setting is not "up to date".
    changed = run_train(*args, "--hidden-dim", "64")
    assert changed.returncode == 0 and "up to date" not in changed.stdout
    assert "extracting features" not in changed.stderr
