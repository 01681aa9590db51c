"""Batch prediction on Ray (`--ray`): on a real two-node cluster in a loopback-only network
namespace, each photo exactly once with the local run's answers, also when the worker node's
raylet is killed mid-run; --features on both paths; the Parquet output's resume journal."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, sample_photos
from vehicle_classifier.offline import batch, ray_batch

pytest.importorskip("ray.data", reason="the cluster extra (ray[data]) is not installed")

pytestmark = pytest.mark.system


def unshare_allowed() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def read_rows(path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def assert_same_answers(rows: list[dict], local: dict, classes: list[str]) -> None:
    """Each path of `local` once in `rows`, with its label, probabilities and features."""
    paths = [row["path"] for row in rows]
    assert sorted(paths) == sorted(local) and len(set(paths)) == len(paths)
    for row in rows:
        expected = local[row["path"]]
        assert bool(row["error"]) == bool(expected["error"]) and row["label"] == expected["label"]
        if not expected["error"]:
            assert max(abs(row[c] - expected[c]) for c in classes) <= 1e-4
            assert np.allclose(row["features"], expected["features"], atol=1e-4)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """200 real photos (100 a class) and a damaged one, listed in a text file; the list."""
    photos = sample_photos("Car")[:100] + sample_photos("Bike")[:100]
    broken = tmp_path_factory.mktemp("fleet") / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    listing = broken.with_name("fleet.txt")
    listing.write_text("".join(f"{p}\n" for p in [*photos, broken]))
    return listing


@pytest.fixture(scope="module")
def local_answers(fleet, tiny_model_dir, tmp_path_factory) -> dict:
    """The local path's rows, with --features, by path."""
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    paths = [str(p) for p in ray_batch.list_inputs([fleet])]
    assert batch.main([*paths, "--model-dir", str(tiny_model_dir), "--features", "--output", str(out)]) == 1
    return {row["path"]: row for row in map(json.loads, out.read_text().splitlines())}


@pytest.mark.skipif(not unshare_allowed(), reason="`unshare -n` is not permitted here (needs root or user namespaces)")
def test_two_node_cluster_answers_each_photo_once_also_when_a_node_dies(fleet, tiny_model_dir, local_answers, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"inputs": [str(fleet)], "model_dir": str(tiny_model_dir), "out": str(tmp_path)}))
    job = subprocess.run(["unshare", "-n", sys.executable, str(REPO / "harness" / "ray_cluster.py"), str(spec)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    codes = json.loads(job.stdout.strip().splitlines()[-1])
    logs = {name: (tmp_path / f"{name}.log").read_text()[-2000:] for name in ("plain", "killed")}
    assert codes["plain"] == 1, logs["plain"]  # 1: the damaged photo, reported in its row
    assert len(codes["killed"]) <= 2 and codes["killed"][-1] == 1, logs["killed"]
    classes = ["Car", "Bike"]
    for name in ("plain", "killed"):
        rows = read_rows(tmp_path / f"{name}.parquet")
        assert_same_answers(rows, local_answers, classes)
        width = {len(row["features"]) for row in rows if not row["error"]}
        assert width == {len(next(r for r in local_answers.values() if not r["error"])["features"])} == {48}
        assert all(row["ood_score"] is not None for row in rows if not row["error"])


def test_features_in_csv_are_a_json_array_of_the_backbones_width(fleet, tiny_model_dir, tmp_path):
    out = tmp_path / "out.csv"
    photos = [str(p) for p in ray_batch.list_inputs([fleet])[:3]]
    assert batch.main([*photos, "--model-dir", str(tiny_model_dir), "--features", "--output", str(out)]) == 0
    rows = batch.ResultsFile(out, batch.result_columns(batch_predictor(tiny_model_dir), True)).rows
    assert [len(json.loads(row["features"])) for row in rows] == [48] * 3  # TINY_SPEC's embed_dim


def batch_predictor(model_dir):
    from vehicle_classifier import config
    from vehicle_classifier.model.predictor import Predictor, ServedModel

    return Predictor(ServedModel.read(model_dir / config.ARTIFACT_FILE))


@pytest.mark.parametrize("name", ["out.parquet", "parts"])
def test_parquet_output_resumes_from_its_journal_and_never_repeats_a_path(tmp_path, name):
    columns = ["path", "label", "features", "error"]
    first = ray_batch.RayOutput(tmp_path / name, columns)
    assert first.append([{"path": "a", "label": "Car", "features": [0.5]}, {"path": "b", "error": "damaged"}])
    first.results.close()  # a run killed here: its rows are in the journal only
    second = ray_batch.RayOutput(tmp_path / name, columns)
    assert second.done == {"a", "b"}
    assert [r["path"] for r in second.append([{"path": "a", "label": "Car"}, {"path": "c", "label": "Bike"}])] == ["c"]
    second.finish()
    third = ray_batch.RayOutput(tmp_path / name, columns)
    third.append([{"path": "d", "label": "Car", "features": [1.0]}])
    third.finish()
    files = [tmp_path / name] if name.endswith(".parquet") else sorted((tmp_path / name).glob("*.parquet"))
    rows = [row for f in files for row in read_rows(f)]
    assert [r["path"] for r in rows] == ["a", "b", "c", "d"] and rows[0]["features"] == [0.5]
    assert not list(tmp_path.glob(".*journal*"))


def test_a_bad_ray_output_is_one_line(tiny_model_dir, fleet, tmp_path, capsys):
    code = batch.main([str(fleet), "--model-dir", str(tiny_model_dir), "--ray", "--output", str(tmp_path / "x.tsv")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--output must end in .csv, .jsonl or .parquet" in err


def test_an_address_nobody_answers_on_is_one_line_at_once(tiny_model_dir, fleet, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port bound but not listening: refused at once
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        code = batch.main([str(fleet), "--model-dir", str(tiny_model_dir), "--ray", address,
                           "--output", str(tmp_path / "out.parquet")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"no Ray cluster answers at {address}" in err
