"""Batch prediction (`python -m vehicle_classifier.offline.batch`): the same answers as the Predictor,
CSV and JSON lines, unreadable files reported per row, resumable after a kill, and one-line
errors; the device-fitted extraction settings it shares with training."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, lying_header_jpeg, make_dataset
from vehicle_classifier import config, extraction as features
from vehicle_classifier.offline import batch
from vehicle_classifier.model.predictor import Predictor

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
    """Synthetic photos in nested folders, a damaged one, and a text file the folder scan skips."""
    root = make_dataset(tmp_path_factory.mktemp("batch") / "photos", per_class=5, seed=7)
    (root / "Car" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_has_a_row_per_image_with_the_predictors_answer(tiny_model_dir, photos_dir, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    code = batch.main([str(photos_dir), "--model-dir", str(tiny_model_dir), "--output", str(out)])
    assert code == 1  # one file was unreadable
    predictor = Predictor.from_dir(tiny_model_dir)
    names = predictor.model.class_names
    rows = read_csv(out)
    # then what else the Predictor reports (the 'neither' check), then the error
    assert list(rows[0]) == ["path", "label", "confidence", *names, "in_distribution", "ood_score", "error"]
    images = sorted(p for p in photos_dir.rglob("*") if p.is_file() and p.suffix != ".txt")
    assert sorted(r["path"] for r in rows) == sorted(map(str, images))  # notes.txt is not an image
    (broken,) = [r for r in rows if r["error"]]
    assert broken["path"].endswith("broken.jpg") and "damaged" in broken["error"]
    assert broken["label"] == broken["confidence"] == ""
    good = [r for r in rows if not r["error"]]
    expected = predictor.predict([predictor.load_image(r["path"]) for r in good])
    for row, want in zip(good, expected):
        assert row["label"] == want.label
        assert abs(float(row["confidence"]) - want.confidence) < 1e-4  # the service's own forward and head
        assert sum(float(row[n]) for n in names) == pytest.approx(1.0, abs=1e-5)
        assert float(row["confidence"]) == max(float(row[n]) for n in names)
    assert "10 classified, 1 unreadable" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_each_precision_answers_as_the_service_does(tiny_model_dir, photos_dir, tmp_path, precision):
    """--precision int8 runs the int8 graph training published (not the float one under an int8
    label): the probabilities are the service's in the same precision, to 1e-4."""
    out = tmp_path / "p.csv"
    assert batch.main([str(photos_dir), "--model-dir", str(tiny_model_dir), "--output", str(out),
                       "--precision", precision]) == 1  # broken.jpg
    predictor = Predictor.from_dir(tiny_model_dir, precision=precision)
    good = [r for r in read_csv(out) if not r["error"]]
    for row, want in zip(good, predictor.predict([predictor.load_image(r["path"]) for r in good])):
        assert max(abs(float(row[n]) - p) for n, p in want.probabilities.items()) < 1e-4


def test_int8_without_the_int8_graph_is_refused_in_one_line(tiny_model_dir, photos_dir, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for name in config.SERVED_FILES:  # no backbone-int8.xml
        shutil.copy(tiny_model_dir / name, model / name)
    code = batch.main([str(photos_dir), "--model-dir", str(model), "--output", str(tmp_path / "p.csv"),
                       "--precision", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: precision int8 needs backbone-int8.xml") and err.count("\n") == 1


def test_rerun_skips_written_rows_and_mends_a_torn_last_row(tiny_model_dir, photos_dir, tmp_path, capsys):
    out = tmp_path / "p.csv"
    args = [str(photos_dir / "Car"), str(photos_dir / "Bike" / "Bike_0.jpg"), "--model-dir", str(tiny_model_dir),
            "--output", str(out)]
    batch.main(args)
    complete = out.read_bytes()
    lines = complete.splitlines(keepends=True)
    assert len(lines) == 1 + 7  # header; Car's 5 photos, broken.jpg, Bike_0.jpg
    # A kill in the middle of writing the last two rows: one row lost, the one before it torn.
    out.write_bytes(b"".join(lines[:-2]) + lines[-2][:15])
    lost_unreadable = sum(b"damaged" in line for line in lines[-2:])
    capsys.readouterr()
    assert batch.main(args) == 1  # broken.jpg's error row is in the file, from either run
    said = capsys.readouterr().out
    assert said.startswith(f"{2 - lost_unreadable} classified, {lost_unreadable} unreadable"), said
    assert "5 already in" in said
    rows = read_csv(out)
    assert len(rows) == len({r["path"] for r in rows}) == 7  # no duplicate, no torn row
    before = {row["path"]: row for row in csv.DictReader(io.StringIO(complete.decode()))}
    assert {r["path"] for r in rows} == before.keys()
    for row in rows:  # the two redone rows as before (a batch of 2 instead of 7: bf16 may differ in the 7th digit)
        assert row["label"] == before[row["path"]]["label"] and row["error"] == before[row["path"]]["error"]
        if row["confidence"]:
            assert abs(float(row["confidence"]) - float(before[row["path"]]["confidence"])) < 1e-4
    mended = out.read_bytes()
    assert batch.main(args) == 1  # nothing left to do, but the output still holds broken.jpg's error row
    said = capsys.readouterr().out
    assert said.startswith("0 classified, 0 unreadable (see the error column), 7 already in"), said
    assert "(1 of this run's inputs have an error row there)" in said
    assert out.read_bytes() == mended


def test_jsonl_output_and_the_same_answers_as_csv(tiny_model_dir, photos_dir, tmp_path):
    args = [str(photos_dir / "Bike"), "--model-dir", str(tiny_model_dir)]
    assert batch.main([*args, "--output", str(tmp_path / "p.jsonl")]) == 0
    assert batch.main([*args, "--output", str(tmp_path / "p.csv"), "--batch-size", "2", "--workers", "0"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    by_csv = {r["path"]: r for r in read_csv(tmp_path / "p.csv")}
    assert len(rows) == len(by_csv) == 5
    for row in rows:
        assert row["error"] is None and isinstance(row["confidence"], float)
        assert row["label"] == by_csv[row["path"]]["label"]
        assert abs(row["confidence"] - float(by_csv[row["path"]]["confidence"])) < 2e-3


@pytest.mark.parametrize("name, text", [
    ("other.csv", "path,label,score\na.jpg,Car,0.9\n"),
    ("other.jsonl", '{"path": "a.jpg", "label": "Car", "score": 0.9}\n'),
])
def test_an_output_of_other_columns_is_refused_untouched(tiny_model_dir, photos_dir, tmp_path, capsys, name, text):
    out = tmp_path / name
    out.write_text(text)
    assert batch.main([str(photos_dir / "Bike"), "--model-dir", str(tiny_model_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "other columns" in err and "\n" not in err
    assert out.read_text() == text


@pytest.mark.parametrize("case, message", [
    ("no images", "no image files in"),
    ("bad suffix", "--output must end in .csv or .jsonl"),
])
def test_bad_arguments_get_one_line(tiny_model_dir, photos_dir, tmp_path, capsys, case, message):
    inputs, output = str(photos_dir), str(tmp_path / "p.csv")
    if case == "no images":
        inputs = str(tmp_path)
    else:
        output = str(tmp_path / "p.xlsx")
    assert batch.main([inputs, "--model-dir", str(tiny_model_dir), "--output", output]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_every_named_input_gets_a_row_and_a_rerun_still_exits_1(tiny_model_dir, photos_dir, tmp_path, capsys):
    """Special files named on the command line are never opened (a FIFO would block) but get an
    error row saying what they are; the good photo beside them is classified."""
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "notimage.jpg").write_text("not an image")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "folder.jpg").mkdir()
    names = ["fifo.jpg", "notimage.jpg", "dangling.jpg", "folder.jpg", "nowhere.jpg"]
    out = tmp_path / "p.csv"
    args = [*(str(tmp_path / n) for n in names), str(photos_dir / "Bike" / "Bike_0.jpg"),
            "--model-dir", str(tiny_model_dir), "--output", str(out)]
    assert batch.main(args) == 1
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert len(rows) == 6 and rows["Bike_0.jpg"]["label"] and not rows["Bike_0.jpg"]["error"]
    assert "FIFO" in rows["fifo.jpg"]["error"] and "dangling link" in rows["dangling.jpg"]["error"]
    assert "not an image" in rows["notimage.jpg"]["error"] and "a folder" in rows["folder.jpg"]["error"]
    assert "no such file" in rows["nowhere.jpg"]["error"]
    assert capsys.readouterr().out.startswith("1 classified, 5 unreadable")
    written = out.read_bytes()
    assert batch.main(args) == 1  # the resumed run: nothing to do, but the errors are in the output
    assert capsys.readouterr().out.startswith("0 classified, 0 unreadable (see the error column), 6 already in")
    assert out.read_bytes() == written


def test_a_jpeg_with_a_lying_header_gets_an_error_row(tiny_model_dir, photos_dir, tmp_path):
    (tmp_path / "lying.jpg").write_bytes(lying_header_jpeg())
    out = tmp_path / "p.csv"
    args = [str(tmp_path / "lying.jpg"), str(photos_dir / "Bike" / "Bike_0.jpg")]
    assert batch.main([*args, "--model-dir", str(tiny_model_dir), "--output", str(out)]) == 1
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert "damaged or truncated" in rows["lying.jpg"]["error"] and rows["lying.jpg"]["label"] == ""
    assert rows["Bike_0.jpg"]["label"] and not rows["Bike_0.jpg"]["error"]


def test_a_folders_skipped_entries_are_counted(tiny_model_dir, photos_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(photos_dir / "Car" / "Car_0.jpg").save(folder / "car.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "album.jpg").mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_text("left out, as hidden files are")
    out = tmp_path / "p.csv"
    assert batch.main([str(folder), "--model-dir", str(tiny_model_dir), "--output", str(out)]) == 0
    assert [Path(r["path"]).name for r in read_csv(out)] == ["car.jpg"]
    said = capsys.readouterr().out
    assert ("skipped in folders: 1 FIFO (named pipe), 1 dangling link (its target does not exist), "
            "1 folder named like an image (searched as a folder), 1 not an image file") in said, said


def test_the_command_without_a_model_says_so_in_one_line(photos_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "vehicle_classifier.offline.batch", str(photos_dir), "--model-dir",
                             str(tmp_path), "--output", str(tmp_path / "p.csv")], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no model artifact at ") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "p.csv").exists()


def test_decode_workers_follow_the_cpu_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert features.decode_workers(torch.device("cuda")) == 15  # every core but the one feeding the GPU
    assert features.decode_workers(torch.device("cpu")) == 2  # the backbone needs the cores on CPU
    assert features.decode_workers(torch.device("cuda"), processes=4) == 3  # four ranks share the 16 cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert features.decode_workers(torch.device("cpu")) == 1


def test_image_batches_on_a_failing_file(tmp_path):
    """A batch of only unreadable files still reports them (and carries no tensor)."""
    (tmp_path / "bad.png").write_bytes(b"nope")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "good.png")
    preprocessing = {"resize_size": 36, "input_size": 32, "interpolation": "bicubic", "mean": [0.5] * 3,
                     "std": [0.5] * 3}
    loader = features.image_batches([tmp_path / "bad.png", tmp_path / "good.png"], preprocessing,
                                    torch.device("cpu"), batch_size=1, num_workers=0)
    got = list(loader)
    assert got[0][0] == [] and got[0][1] is None and got[0][2][0][0] == 0
    assert got[1][0] == [1] and got[1][1].shape == (1, 32, 32, 3) and got[1][1].dtype == torch.uint8
    assert got[1][2] == []


