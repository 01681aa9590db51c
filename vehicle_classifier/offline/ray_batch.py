"""Batch prediction on a Ray cluster (`--ray [ADDRESS]`): the same answers as the local path,
from actors that each hold the model once.

    paths (expanded on the driver) -> ray.data.from_items -> map_batches(_Classifier) -> driver writes

Every node must read the input paths and the model folder at the same names (a shared
filesystem). Each actor builds what the local path builds (batch.py: the Predictor, its forward
and head, in the --precision asked for; a GPU per actor with --device cuda) so answers agree
with a local run.
Results stream back to the driver, which writes them: .csv/.jsonl as locally, .parquet as one
file, or a folder (no suffix) that gets one part file per run. Rows are kept in a JSON-lines
journal beside a Parquet output until the run ends, so a rerun of the same command skips what
any earlier run finished, and the driver drops a path it already has: each path at most once.
Ray's task retries and actor restarts make it at least once when a node dies mid-run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from .. import config
from . import batch

PARQUET = ".parquet"


class _Classifier:
    """One Ray actor's model: loaded once, then called on batches of paths."""

    def __init__(self, model_dir: str, precision: str, device: str, threads: int, features: bool):
        from ..model.predictor import Predictor

        # The local path's predictor (batch.run): the same forward and head, so the same answers.
        self.predictor = Predictor.from_dir(Path(model_dir), precision, device, openvino_mode="throughput",
                                            threads=max(1, threads))
        self.preprocessing = self.predictor.model.preprocessing
        self.columns, self.features = batch.result_columns(self.predictor, features), features

    def __call__(self, rows):
        from ..images import ImageError, load_crop

        crops, out = [], []
        for path in rows.column("path").to_pylist():
            try:
                crops.append((path, load_crop(path, self.preprocessing)))
            except (ImageError, OSError) as exc:
                out.append({"path": path, "error": str(exc)})
        if crops:
            features, _ = self.predictor.forward(np.stack([c for _, c in crops]))
            predictions = self.predictor.predict_features(features)
            out += [batch.answer_row(path, p, f if self.features else None)
                    for (path, _), p, f in zip(crops, predictions, features)]
        import pyarrow as pa

        return pa.Table.from_pylist([{c: row.get(c) for c in self.columns} for row in out])


def list_inputs(inputs: list[Path]) -> list[Path]:
    """The inputs, with each .txt file replaced by the paths it lists (one a line; blank lines
    and #-comments left out): a fleet's file list, written where every node reads the same names."""
    found: list[Path] = []
    for item in inputs:
        if item.suffix.lower() == ".txt" and item.is_file():
            lines = (line.strip() for line in item.read_text(encoding="utf-8").splitlines())
            found += [Path(line) for line in lines if line and not line.startswith("#")]
        else:
            found.append(item)
    return found


def check_reachable(address: str | None) -> None:
    """A host:port that nobody answers on is one line now: ray.init would retry for minutes."""
    import socket

    host, _, port = (address or "").rpartition(":")
    if "://" in (address or "") or not host or not port.isdigit():
        return  # ray://, auto, local: left to ray.init
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise batch.BatchError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): is `ray start` running there?")


def run(args: argparse.Namespace) -> "batch.Summary":
    """Classify every input not yet in --output on the cluster; what the run did."""
    found = batch.find_images(list_inputs(args.inputs))
    images = [str(p) for p in found.images]
    if not images and not found.rejected:
        raise batch.BatchError(f"no image files in {', '.join(map(str, args.inputs))}")
    if not (args.model_dir / config.ARTIFACT_FILE).is_file():
        raise batch.BatchError(f"no {config.ARTIFACT_FILE} in {args.model_dir}: train a model first")
    output = RayOutput(args.output, _columns(args))
    rejected = [{"path": str(p), "error": why} for p, why in found.rejected.items() if str(p) not in output.done]
    output.append(rejected)
    todo = [p for p in images if p not in output.done]
    address = args.ray or os.environ.get("RAY_ADDRESS") or None
    check_reachable(address)
    classified, unreadable = _run_on_cluster(todo, args, address, output)
    output.finish()
    return batch.Summary(classified, unreadable + len(rejected), len(images) - len(todo),
                         unreadable + len(rejected), found.skipped)


def _run_on_cluster(todo: list[str], args: argparse.Namespace, address: str | None, output) -> tuple[int, int]:
    """(classified, unreadable) rows written by the cluster's run of `todo`."""
    import ray

    classified = unreadable = 0
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        for rows in _predictions(todo, args).iter_batches(batch_format="pyarrow", batch_size=None):
            written = output.append(rows.to_pylist())
            unreadable += sum(1 for row in written if row.get("error"))
            classified += sum(1 for row in written if not row.get("error"))
    except ray.exceptions.RayError as exc:  # what Ray's retries could not mend: one line, and how to go on
        output.results.close()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise batch.BatchError(f"the Ray run failed ({first}); the rows written are kept: rerun to continue") from exc
    finally:
        ray.shutdown()
    return classified, unreadable


def _columns(args: argparse.Namespace) -> list[str]:
    from ..model.predictor import ServedModel
    from ..model.predictor import Predictor

    predictor = Predictor(ServedModel.read(args.model_dir / config.ARTIFACT_FILE))
    return batch.result_columns(predictor, args.features)


def _predictions(paths: list[str], args: argparse.Namespace):
    """The lazy dataset of answers for `paths`, sized to the cluster's CPUs."""
    import ray

    context = ray.data.DataContext.get_current()
    context.max_errored_blocks = 0  # a block that fails after Ray's retries fails the run: no row is silently lost
    cpus = args.ray_cpus_per_actor
    # On a GPU cluster each actor holds one GPU, which Ray shows it as cuda:0.
    gpus, device = (1, "cuda") if args.device.startswith("cuda") else (0, "cpu")
    resources = ray.cluster_resources()
    actors = args.ray_actors or (max(1, int(resources.get("GPU", 1))) if gpus else
                                 max(1, int(resources.get("CPU", 1) // cpus) - 1))
    # ^ one CPU's worth left free for Ray Data's own tasks (ray#44687)
    size = args.batch_size or 64  # larger than locally (16): amortises Ray's cost per batch
    blocks = max(1, min(len(paths) // size, actors * 4))
    dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    # An autoscaling pool (1..n), not a fixed one: a fixed pool whose actor dies can hang (ray#62746).
    return dataset.map_batches(
        _Classifier, fn_constructor_args=(str(args.model_dir.resolve()), args.precision, device, max(1, int(cpus)),
                                          args.features),
        batch_size=size, concurrency=(1, actors), num_cpus=cpus, num_gpus=gpus, batch_format="pyarrow",
        max_restarts=-1, max_task_retries=-1)


class RayOutput:
    """The results of a Ray run: a batch.ResultsFile for .csv/.jsonl; for Parquet (a file, or a
    folder of parts) a JSON-lines journal beside it, turned into Parquet when the run ends."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = Path(path), columns
        self.parquet = self.path.suffix.lower() == PARQUET or not self.path.suffix
        if not self.parquet and self.path.suffix.lower() not in batch.FORMATS:
            raise batch.BatchError(f"--output must end in .csv, .jsonl or .parquet, or be a folder: {self.path}")
        journal = self.path.with_name(f".{self.path.name}.journal.jsonl") if self.parquet else self.path
        self.results = batch.ResultsFile(journal, columns)
        self.done = set(self.results.done) | set(self._parquet_paths())

    def _parquet_paths(self) -> list[str]:
        import pyarrow.parquet as pq

        if not self.parquet or not self.path.exists():
            return []
        files = sorted(self.path.glob(f"*{PARQUET}")) if self.path.is_dir() else [self.path]
        return [p for f in files for p in pq.read_table(f, columns=["path"]).column("path").to_pylist()]

    def append(self, rows: list[dict]) -> list[dict]:
        """Write the rows whose path is not written yet (a retried block's repeat is dropped); those rows."""
        fresh = {}
        for row in rows:
            if row["path"] not in self.done:
                fresh.setdefault(row["path"], {c: row.get(c) for c in self.columns})
        self.results.append(list(fresh.values()))
        self.done.update(fresh)
        return list(fresh.values())

    def finish(self) -> None:
        """Close the file; for Parquet, add the journal's rows (one part per run in a folder)."""
        self.results.close()
        if not self.parquet:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        written = set(self._parquet_paths())  # a kill after the last replace left the journal behind
        rows = [r for r in batch.ResultsFile(self.results.path, self.columns).rows if r["path"] not in written]
        if not rows:
            self.results.path.unlink(missing_ok=True)
            return
        table = pa.Table.from_pylist([{c: r.get(c) for c in self.columns} for r in rows])
        if self.path.suffix:  # one file: what an earlier run wrote, then this run's rows
            if self.path.exists():
                table = pa.concat_tables([pq.read_table(self.path), table], promote_options="permissive")
            target = self.path
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            target = self.path / f"part-{len(list(self.path.glob('*' + PARQUET))):05d}{PARQUET}"
        temporary = target.with_name(f".{target.name}.tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, target)  # whole or absent: a kill here leaves the journal for the rerun
        self.results.path.unlink()
