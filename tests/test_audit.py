"""The data audit (python -m vehicle_classifier.audit): on real ImageNet features
(EfficientNet-Lite0) and real sample photos with planted faults, as the issue measured it; then
its pieces on synthetic images: the near-duplicate check, cleanlab's ranking, the outlier score
and the command line's one-line errors."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LITE0_BACKBONE, REPO, make_dataset, sample_photos, synthetic_image
from PIL import Image, ImageOps

from vehicle_classifier import config
from vehicle_classifier.audit.__main__ import main as audit_main
from vehicle_classifier.audit.duplicates import aligned_correlation, aligned_views, fingerprint, near_duplicate_pairs
from vehicle_classifier.audit.labels import label_issues, outlier_scores

pytestmark = pytest.mark.integration

MOVED, COPIES = 16, 12


def altered_copy(source: Path, target: Path, rng: random.Random, mirror: bool) -> None:
    """What the issue planted: a 4% crop (split at random between the edges), 0.7x the size,
    JPEG quality 60, mirrored or not."""
    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    cut_x, cut_y = int(image.width * 0.04), int(image.height * 0.04)
    left, top = rng.randint(0, cut_x), rng.randint(0, cut_y)
    image = image.crop((left, top, image.width - cut_x + left, image.height - cut_y + top))
    image = image.resize((int(image.width * 0.7), int(image.height * 0.7)), Image.Resampling.BICUBIC)
    (ImageOps.mirror(image) if mirror else image).save(target, "JPEG", quality=60)


def plant_faults(root: Path, seed: int, per_class: int = 150) -> dict:
    """`per_class` sample photos of each class copied into `root`, MOVED of them into the other
    class's folder and COPIES altered copies added beside their originals; what was planted."""
    rng = random.Random(seed)
    chosen = {label: rng.sample(sample_photos(label), per_class) for label in ("Car", "Bike")}
    other = {"Car": "Bike", "Bike": "Car"}
    planted = {"moved": [], "pairs": []}
    for label, photos in chosen.items():
        movers = set(rng.sample(range(per_class), MOVED // 2))
        for i, photo in enumerate(photos):
            folder = other[label] if i in movers else label
            (root / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, root / folder / photo.name)
            if i in movers:
                planted["moved"].append(f"{folder}/{photo.name}")
    originals = rng.sample(sorted(str(p.relative_to(root)) for p in root.rglob("*.*")), COPIES)
    for k, original in enumerate(originals):
        copy = Path(original).parent / f"copy_{k}_{Path(original).stem}.jpg"
        altered_copy(root / original, root / copy, rng, mirror=k % 2 == 0)
        planted["pairs"].append({original, str(copy)})
    return planted


@pytest.fixture(scope="module", params=[1, 2], ids=["plant1", "plant2"])
def planted_audit(request, tmp_path_factory, lite0_weights, real_feature_cache):
    """An audit, as a user runs it, of ~300 sample photos with faults planted (seeded: two
    different draws): (data folder, output folder, what was planted, the terminal's lines)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp(f"planted{request.param}")
    planted = plant_faults(root / "data", request.param)
    out = root / "audit"
    terminal = io.StringIO()
    with contextlib.redirect_stdout(terminal):
        code = audit_main(["--data-dir", str(root / "data"), "--output-dir", str(out), "--backbone", LITE0_BACKBONE,
                           "--weights", str(lite0_weights), "--cache-dir", str(real_feature_cache)])
    assert code == 0
    return root / "data", out, planted, terminal.getvalue().splitlines()


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
