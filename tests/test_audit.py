"""The data audit (vehicle_classifier.audit, in this process): on real ImageNet features
(EfficientNet-Lite0) and real sample photos with planted faults (conftest's `planted_audit`), as
the issue measured it; then its pieces on synthetic images: the near-duplicate check, cleanlab's
ranking, the outlier score and the command line's one-line errors. Whole runs in processes of
their own (train.py on what it flagged, `python -m vehicle_classifier.audit`) are
tests/test_audit_runs.py's."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COPIES, REPO, altered_copy, make_dataset
from PIL import Image

from vehicle_classifier import config
from vehicle_classifier.audit.__main__ import main as audit_main
from vehicle_classifier.audit.duplicates import aligned_correlation, aligned_views, fingerprint, near_duplicate_pairs
from vehicle_classifier.audit.labels import label_issues, outlier_scores

pytestmark = pytest.mark.integration


def test_the_audit_finds_planted_faults_on_real_features(planted_audit):
    _, out, planted, summary = planted_audit
    report = json.loads((out / config.AUDIT_FILE).read_text())
    issues = report["label_issues"]
    assert len(issues) == report["photos"] == 2 * 150 + COPIES
    assert [item["score"] for item in issues] == sorted(item["score"] for item in issues)
    top = [item["path"] for item in issues[:32]]
    assert sum(path in top for path in planted["moved"]) >= 15
    for item in issues[:32]:
        if item["path"] in planted["moved"]:  # filed under the other class: that class suggested
            assert item["suggested"] != item["given"] == Path(item["path"]).parent.name

    pairs = [set(pair["paths"]) for pair in report["near_duplicates"]]
    assert sum(pair in pairs for pair in planted["pairs"]) >= 10
    assert len(pairs) <= 40
    assert all(config.DUPLICATE_MIN_CORRELATION <= p["similarity"] <= 1 for p in report["near_duplicates"])
    assert 0 < len(report["outliers"]) < 0.05 * len(issues)
    with Image.open(out / config.AUDIT_SHEET) as sheet:
        assert sheet.format == "PNG" and min(sheet.size) > 500
    assert summary[0].startswith(f"{len(issues)} photos audited in ") and f"{len(pairs)} near-duplicate pairs" in summary[0]
    assert summary[-1] == f"written: {out / config.AUDIT_FILE}, {out / config.AUDIT_SHEET}"


# --- the pieces, on synthetic images -----------------------------------------------------------
def photo(seed: int, size=(160, 120)) -> Image.Image:
    """A synthetic photo with structure at every scale: blobs of colour over a gradient."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def test_an_altered_copy_is_a_near_duplicate_and_another_photo_is_not(tmp_path):
    rng = random.Random(0)
    for name, image in (("a", photo(1)), ("b", photo(2))):
        image.save(tmp_path / f"{name}.png")
    altered_copy(tmp_path / "a.png", tmp_path / "a_copy.jpg", rng, mirror=True)
    prints = [fingerprint(tmp_path / name) for name in ("a.png", "a_copy.jpg", "b.png")]
    views = [aligned_views(p.thumbnail) for p in prints]
    assert aligned_correlation(views[0], views[1]) >= config.DUPLICATE_MIN_CORRELATION
    assert aligned_correlation(views[0], views[2]) < 0.5
    assert [(a, b) for a, b, _ in near_duplicate_pairs(prints)] == [(0, 1)]
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert fingerprint(tmp_path / "broken.jpg") is None


def test_cleanlab_ranks_the_photos_whose_given_label_is_unlikely_first():
    labels = np.array([0] * 20 + [1] * 20)
    probabilities = np.where(labels[:, None] == np.arange(2), 0.9, 0.1)
    probabilities[[3, 25]] = probabilities[[3, 25], ::-1]  # the other class is likely
    scores, flagged = label_issues(labels, probabilities)
    assert set(np.argsort(scores)[:2]) == {3, 25}
    assert set(np.flatnonzero(flagged)) == {3, 25}


def test_the_outlier_score_leaves_the_photo_and_its_identical_copies_out():
    torch.manual_seed(0)
    cluster = torch.nn.functional.normalize(torch.ones(8, 4) + 0.05 * torch.randn(8, 4), dim=1)
    stranger = torch.tensor([[1.0, -1.0, 0.0, 0.0]])
    features = torch.cat([cluster, stranger, stranger])  # the stranger twice, as the same file
    scores = outlier_scores(features, [f"d{i}" for i in range(8)] + ["same", "same"], k=3)
    assert scores[8] == scores[9] > 0.5 > 0.05 > scores[:8].max()


def test_too_few_photos_and_a_missing_folder_are_one_line_errors(tmp_path, tiny_weights, capsys):
    data = make_dataset(tmp_path / "data", per_class=3)
    args = ["--backbone", "test-tiny", "--weights", str(tiny_weights), "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(tmp_path / "out")]
    assert audit_main(["--data-dir", str(data), *args]) == 2
    err = capsys.readouterr().err.splitlines()  # after the extraction's progress bar
    assert err[-1] + "\n" == f"error: the audit needs at least {config.CALIBRATION_FOLDS} readable photos per class (one per fold); " \
                  "found {'Bike': 3, 'Car': 3}\n"
    assert audit_main(["--data-dir", str(tmp_path / "nowhere"), *args]) == 2
    assert capsys.readouterr().err.startswith(f"error: data directory not found: {tmp_path / 'nowhere'}")
    (tmp_path / "photos.zip").write_bytes(b"PK")  # a path that exists, but as a file
    assert audit_main(["--data-dir", str(tmp_path / "photos.zip"), *args]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'photos.zip'} is a file, not a folder")
    assert not (tmp_path / "out").exists()


def test_extra_copies_keep_one_photo_of_each_group_and_a_bad_audit_is_one_line(tmp_path):
    from vehicle_classifier.data import DataError
    from vehicle_classifier.training.exclude import extra_copies, read_audit

    assert extra_copies([["b", "a"], ["c", "b"], ["x", "y"]]) == {"b", "c", "y"}  # a~b~c: a kept; x~y: x kept
    (tmp_path / "audit.json").write_text('{"label_issues": []}')
    with pytest.raises(DataError, match=r"audit.json: not a readable audit.json \(KeyError") as info:
        read_audit(tmp_path / "audit.json")
    assert info.value.setting == "exclude"  # train.py leads the line with --exclude


def test_the_audit_imports_training_never_serving():
    code = ("import sys, vehicle_classifier.audit.run, vehicle_classifier.audit.__main__; "
            "print(sorted(m for m in sys.modules if m.startswith('vehicle_classifier.serving')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]
