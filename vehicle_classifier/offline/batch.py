"""Batch prediction without the service: image files and folders in, one row per image out.

    python -m vehicle_classifier.offline.batch photos/ more.jpg --model-dir models/ --output predictions.csv
    torchrun --nproc-per-node=gpu -m vehicle_classifier.offline.batch photos/ --output predictions.jsonl

As timm's inference.py: a results table, written as batches complete, in CSV or JSON lines
(by the --output suffix). Columns: path, label, confidence, one probability per class (named by
the class), whatever else the predictor reports, and error (why a file could not be read; its
other columns are empty). Decoding is training's (extraction.backbone_features: worker
processes decode and crop on every core); the forward and the head are the service's own (the
Predictor's: the exported graph in the --precision asked for, int8 included, through OpenVINO on
CPU, torch on CUDA), so a photo gets the same answer here as from /predict.

Resumable: a rerun with the same --output skips the files already in it. Rows are appended and
flushed batch by batch; a torn last row left by a killed run is cut off when the file is
reopened. Under torchrun each rank writes its own part file and rank 0 merges the parts.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import UserError, cli, config

FORMATS = (".csv", ".jsonl")
FIXED_COLUMNS = ("path", "label", "confidence")


class BatchError(UserError):
    """Bad inputs or output file; the message says why in one line."""


@dataclass
class Inputs:
    """What the command line names: the image files to classify (each once, in order), the
    named inputs that cannot be classified with why (each gets an error row), and what the
    folder scans skipped, counted by kind."""

    images: list[Path] = field(default_factory=list)
    rejected: dict[Path, str] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)


def find_images(inputs: list[Path]) -> Inputs:
    """Files as named, and the image files under each folder (sorted, hidden ones left out),
    each file once. Nothing is opened: a FIFO would block its reader."""
    found = Inputs()
    for item in inputs:
        kind = _special(item)
        if kind is None and item.is_dir():
            images = _scan_folder(item, found.skipped)
            if not images and item.suffix.lower() in config.IMAGE_EXTENSIONS:
                found.rejected[item] = "a folder, not an image file (and no image files in it)"
            found.images += images
        elif kind is None:
            found.images.append(item)
        else:
            found.rejected[item] = kind if kind.startswith(("no such", "unreadable")) else f"{kind}, not an image file"
    found.images = list(dict.fromkeys(found.images))
    return found


def _special(path: Path) -> str | None:
    """What `path` is when it is neither a regular file nor a folder (by stat alone), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling link (its target does not exist)" if os.path.islink(path) else "no such file or folder"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    return "a socket" if stat.S_ISSOCK(mode) else "a device"


def _scan_folder(folder: Path, skipped: Counter) -> list[Path]:
    """The image files under `folder` (sorted, hidden ones left out); each other visible entry
    counted in `skipped` by what it is."""
    images = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        kind = _special(path)
        image_name = path.suffix.lower() in config.IMAGE_EXTENSIONS
        if kind is None and path.is_dir():
            if image_name:  # searched like any folder, but counted: the user may have meant a file
                skipped["folder named like an image (searched as a folder)"] += 1
        elif kind is not None:
            skipped[kind.removeprefix("a ")] += 1  # "1 FIFO (named pipe)" in the summary
        elif image_name:
            images.append(path)
        else:
            skipped["not an image file"] += 1
    return images


class ResultsFile:
    """A results table on disk, appended to batch by batch. What a previous run wrote is kept:
    `done` holds its paths."""

    def __init__(self, path: Path, columns: list[str], repair: bool = True):
        """`repair`: cut off a torn last row (only the process that writes the file may)."""
        self.path, self.columns = Path(path), columns
        if self.path.suffix.lower() not in FORMATS:
            raise BatchError(f"--output must end in {' or '.join(FORMATS)}: {self.path}")
        self.jsonl = self.path.suffix.lower() == ".jsonl"
        self.rows = self._recover(repair)
        self.done = {str(row["path"]) for row in self.rows}
        self.failed = {str(row["path"]) for row in self.rows if row.get("error")}  # paths with an error row
        self._file = None

    def _recover(self, repair: bool) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1  # a row is whole once its newline is written
        if repair and complete < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(complete)
        text = data[:complete].decode("utf-8", errors="replace")
        if self.jsonl:
            rows = [self._json_row(line, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            columns = list(rows[0]) if rows else None
        else:
            reader = csv.DictReader(io.StringIO(text))
            rows, columns = list(reader), reader.fieldnames
        if columns and columns != self.columns:
            raise BatchError(f"{self.path} has other columns ({', '.join(columns)}): written for another model? "
                             f"Choose another --output")
        return rows

    def _json_row(self, line: str, number: int) -> dict:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "path" not in row:
            raise BatchError(f"{self.path} line {number} is not a result row: not a batch results file?")
        return row

    def append(self, rows: list[dict]) -> None:
        """Write `rows` (each with this table's columns) and flush them to the file."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            if not self.jsonl and self._file.tell() == 0:
                self._file.write(",".join(self.columns) + "\n")
        if self.jsonl:
            text = "".join(json.dumps({c: row.get(c) for c in self.columns}) + "\n" for row in rows)
        else:
            buffer = io.StringIO()
            csv.DictWriter(buffer, self.columns, lineterminator="\n").writerows(rows)
            text = buffer.getvalue()
        self._file.write(text)  # whole rows in one write: a kill tears at most the last one
        self._file.flush()
        self.done.update(str(row["path"]) for row in rows)
        self.failed.update(str(row["path"]) for row in rows if row.get("error"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def part_files(output: Path) -> list[Path]:
    """The part files that ranks of a torchrun write beside `output` (any world size)."""
    return sorted(output.parent.glob(f".{output.name}.part*-of-*{output.suffix}"))


def merge_parts(results: ResultsFile, order: list[Path]) -> None:
    """Append the rows of every part file that `results` lacks (in input order), then remove
    the parts: a merge cut short is finished by the next run, never duplicated."""
    position = {str(p): i for i, p in enumerate(order)}
    parts = part_files(results.path)
    rows = {}
    for part in parts:
        for row in ResultsFile(part, results.columns).rows:
            if str(row["path"]) not in results.done:
                rows.setdefault(str(row["path"]), row)
    results.append(sorted(rows.values(), key=lambda row: position.get(str(row["path"]), len(position))))
    for part in parts:
        part.unlink()


def result_columns(predictor, features: bool = False) -> list[str]:
    """path, label, confidence, a probability per class, what else the predictor reports,
    features (the backbone's vector, when asked for), error."""
    example = _flat(predictor.predict_features(np.zeros((1, predictor.metadata["head"]["in_dim"]), np.float32))[0])
    columns = [*FIXED_COLUMNS, *predictor.model.class_names]
    columns += [key for key in example if key not in columns]
    if len(set(columns)) != len(columns) or "error" in columns:
        raise BatchError(f"class names clash with the result columns: {predictor.model.class_names}")
    return [*columns, *(["features"] if features else []), "error"]


def _flat(prediction) -> dict:
    """A prediction's answer with its probabilities as one entry per class."""
    answer = prediction.as_dict()
    return {key: value for key, value in answer.items() if key != "probabilities"} | answer["probabilities"]


def answer_row(path, prediction, features: np.ndarray | None = None) -> dict:
    """A result row; `features` as a list of floats (a JSON array in CSV) when given."""
    row = {"path": str(path), **_flat(prediction)}
    if features is not None:
        row["features"] = [float(x) for x in features]
    return row


def predict_into(results: ResultsFile, predictor, paths: list[Path], batch_size: int = 0,
                 num_workers: int | None = None, features: bool = False) -> tuple[int, int]:
    """Classify `paths` into `results` with the predictor's forward and head; how many were
    classified and how many were unreadable."""
    from tqdm.auto import tqdm

    from ..extraction import backbone_features

    classified = unreadable = 0
    batches = backbone_features(predictor.forward, paths, predictor.model.preprocessing, batch_size, num_workers)
    with tqdm(total=len(paths), desc="predicting", unit="img") as bar:
        for indices, vectors, failed in batches:
            rows = [{"path": str(paths[i]), "error": reason} for i, reason in failed]
            if vectors is not None:
                predictions = predictor.predict_features(vectors)
                rows += [answer_row(paths[i], p, v if features else None)
                         for i, p, v in zip(indices, predictions, vectors)]
            results.append(rows)
            classified, unreadable = classified + len(indices), unreadable + len(failed)
            bar.update(len(rows))
    return classified, unreadable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vehicle-batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="image files, and folders searched recursively for images")
    parser.add_argument("--model-dir", type=Path, default=config.OUTPUT_DIR,
                        help=f"directory holding {config.ARTIFACT_FILE} (default: %(default)s)")
    parser.add_argument("--output", type=Path, required=True,
                        help="results file, .csv or .jsonl; files already in it are skipped")
    cli.add_flags(parser, "device", "precision")
    parser.add_argument("-b", "--batch-size", type=int, default=0,
                        help="images per backbone batch (default 0: fitted to the device)")
    parser.add_argument("-j", "--workers", type=int, default=None,
                        help="decoding worker processes (default: from the cores this process may use)")
    parser.add_argument("--features", action="store_true",
                        help="also write the backbone's feature vector (column features; ood_score is a column already)")
    add_ray_arguments(parser)
    return parser


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The Ray options (ray_batch.py; Ray itself is imported only when --ray is given)."""
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on a Ray cluster: ADDRESS as ray.init takes it (host:port, ray://..., auto); "
                             "without a value RAY_ADDRESS, else a local Ray. Output may also be .parquet or a folder")
    parser.add_argument("--ray-actors", type=int, default=0, metavar="N",
                        help="most model actors (default 0: from the cluster's CPUs; with --device cuda, one per GPU)")
    parser.add_argument("--ray-cpus-per-actor", type=float, default=1.0, metavar="C",
                        help="CPUs each actor reserves and computes with (default: %(default)s)")


@dataclass
class Summary:
    """What a run did (rank 0): this run's classified and unreadable rows, the inputs already
    in --output, how many of this run's inputs have an error row there (this run's or an
    earlier one's: the exit status goes by it), and what the folder scans skipped."""

    classified: int
    unreadable: int
    already: int
    failed: int
    skipped: Counter

    def line(self, output: Path) -> str:
        text = (f"{self.classified} classified, {self.unreadable} unreadable (see the error column), "
                f"{self.already} already in {output}")
        if self.failed > self.unreadable:
            text += f" ({self.failed} of this run's inputs have an error row there)"
        if self.skipped:
            text += "; skipped in folders: " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))
        return f"{text}: results in {output}"


def run(args: argparse.Namespace) -> Summary | None:
    """Classify every input not yet in --output: a Summary on rank 0, None on torchrun's other ranks."""
    from ..distributed import part_suffix, process_group
    from ..extraction import decode_workers
    from ..devices import check_device
    from ..model.predictor import Predictor

    found = find_images(args.inputs)
    if not found.images and not found.rejected:
        raise BatchError(f"no image files in {', '.join(map(str, args.inputs))}")
    with process_group() as group:
        device = group.device(args.device)
        check_device(device)
        # Compiled (or placed on the GPU) at first use: after the decoding workers fork.
        predictor = Predictor.from_dir(args.model_dir, args.precision, str(device), openvino_mode="throughput",
                                       warm_up=False)
        columns = result_columns(predictor, args.features)
        final = ResultsFile(args.output, columns, repair=group.is_main)
        todo = [p for p in found.images if str(p) not in final.done]
        rejected = _write_rejected(final, found.rejected) if group.is_main else 0
        if group.distributed:
            target = ResultsFile(args.output.with_name(f".{args.output.name}{part_suffix(group)}{args.output.suffix}"),
                                 columns)
        else:
            target = final
        mine = [p for p in group.shard(todo) if str(p) not in target.done]
        workers = decode_workers(device, group.local_world_size) if args.workers is None else args.workers
        try:
            counts = predict_into(target, predictor, mine, args.batch_size, workers, args.features)
        finally:
            target.close()
        gathered = group.gather(counts)
        if not group.is_main:
            return None
        merge_parts(final, found.images)
        final.close()
    return _summary(found, len(todo), rejected, gathered, final)


def _summary(found: Inputs, todo: int, rejected: int, gathered: list[tuple[int, int]], final: ResultsFile) -> Summary:
    """What the run did: `todo` images and `rejected` error rows written now, `gathered` each
    rank's (classified, unreadable); `final` the merged output."""
    inputs = {str(p) for p in [*found.images, *found.rejected]}
    return Summary(sum(c for c, _ in gathered), sum(u for _, u in gathered) + rejected,
                   len(found.images) - todo + len(found.rejected) - rejected, len(final.failed & inputs),
                   found.skipped)


def _write_rejected(results: ResultsFile, rejected: dict[Path, str]) -> int:
    """An error row for each named input that is no file to classify and has no row yet."""
    rows = [{"path": str(p), "error": why} for p, why in rejected.items() if str(p) not in results.done]
    if rows:
        results.append(rows)
    return len(rows)


def ray_run(args: argparse.Namespace) -> Summary:
    from .ray_batch import run as run_on_ray  # Ray is imported only when asked for

    return run_on_ray(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.ray is None and args.output.suffix.lower() not in FORMATS:
            raise BatchError(f"--output must end in {' or '.join(FORMATS)}: {args.output}")
        summary = run(args) if args.ray is None else ray_run(args)
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the rows written so far are kept in {args.output}; rerun to continue", file=sys.stderr)
        return 130
    if summary is None:
        return 0
    print(summary.line(args.output))
    # 1 while the output holds an error row for any of this run's inputs, written now or by the
    # run this one resumes: a script checking the status of a rerun still sees the failures.
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
