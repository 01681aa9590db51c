"""Train the Car/Bike head on frozen DINO features and write the model artifact.

    python train.py --data-dir data/Car-Bike-Dataset --output-dir models/   (or: vehicle-train ...)
    torchrun --nproc-per-node=gpu train.py ...   # features extracted on every GPU at once
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

from .. import cli, config

HELP = {
    "backbone": cli.help_of("backbone"),
    "val_fraction": "fraction of each class held out for validation (early stopping)",
    "test_fraction": "fraction of each class held out for the final test metrics",
    "seed": "seed of the split and of head training; the same seed gives the same model",
    "hidden_dim": "hidden units of the MLP head (0: a linear probe)",
    "dropout": "dropout before the head's last layer",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "batch_size": "head training batch size",
    "max_epochs": "upper bound on head training epochs",
    "patience": "stop after this many epochs without a better validation loss",
    "extract_batch_size": cli.help_of("extract_batch_size"),
    "precision": cli.help_of("precision"),
    "ood_acceptance": "share of validation photos the 'neither a car nor a bike' threshold accepts",
    "neither_dir": "images that are neither class, for the flagged share in metrics.json (skipped when absent or '')",
    "calibration": f"where the temperature is fitted: out-of-fold (every train+val photo scored by one of "
                   f"{config.CALIBRATION_FOLDS} heads that never saw it: better held-out log-loss, costs those "
                   "heads' training) or val (the validation logits: free, but few)",
    "exclude": f"an {config.AUDIT_FILE} of python -m vehicle_classifier.audit: its label issues and all but one "
               "photo of each near-duplicate group are left out ('': none)",
}

# Backbone names are checked by registry.get_spec.
CHOICES = {"precision": list(config.PRECISIONS), "calibration": list(config.CALIBRATIONS)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_flags(parser, "data_dir")
    parser.add_argument("--output-dir", type=Path, default=config.OUTPUT_DIR,
                        help="where the artifact, metrics.json, split.json and plots go")
    cli.add_flags(parser, "weights", "cache_dir", "device")
    parser.add_argument("--force", action="store_true",
                        help="retrain even when --output-dir already holds a model trained from these very inputs")
    defaults = config.TrainConfig()
    for f in fields(config.TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name), help=HELP[f.name], choices=CHOICES.get(f.name))
    return parser


class _TqdmHandler(logging.Handler):
    """Warnings printed above the progress bar instead of through it."""

    def emit(self, record):
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _interrupt_in(pid: int):
    """SIGTERM (`docker stop`, `kill`) winds the run down as Ctrl-C does, in the process `pid`
    alone. Forked decoding workers inherit the handler, and the DataLoader ends a slow worker
    with SIGTERM: there it must end the worker, as SIGTERM does by default, not raise into the
    parent's stack that the fork copied (seen in the suite: a worker printing pytest's summary,
    then hanging, with its parent waiting on it)."""
    def handler(signum, frame):
        if os.getpid() == pid:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    return handler


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    before = signal.signal(signal.SIGTERM, _interrupt_in(os.getpid()))
    try:
        return _main(args)
    finally:  # called in-process (make_figures, tests): the caller's handler comes back
        signal.signal(signal.SIGTERM, before)


def _main(args: argparse.Namespace) -> int:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])

    from .. import UserError

    try:
        metrics = train(args)
    except (UserError, OSError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # the run's message says what was kept (run.RunInterrupted)
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 130
    if metrics is not None:
        report(metrics, args.output_dir)
    return 0


def train(args: argparse.Namespace) -> dict | None:
    """The run the flags ask for; None when there is nothing to report (the outputs were up to
    date, or this is a torchrun rank other than 0: rank 0 reports)."""
    from .fetch import ensure_dataset
    from .fingerprint import training_fingerprint, up_to_date

    cfg = config.TrainConfig(**{f.name: getattr(args, f.name) for f in fields(config.TrainConfig)})
    ensure_dataset(args.data_dir)  # the first run on a fresh clone: the Kaggle set, fetched
    # Checked before torch is even imported: an unchanged rerun costs well under a second. The
    # photos it reads and hashes go to the run, which hashes none again.
    fingerprint = training_fingerprint(args.data_dir, cfg, args.weights, args.device)
    if not args.force and up_to_date(args.output_dir, fingerprint.value):
        print(f"up to date: {args.output_dir / config.ARTIFACT_FILE} was trained from these same images, "
              f"weights and settings (metrics in {args.output_dir / config.METRICS_FILE}; --force retrains)")
        return None
    from ..distributed import process_group
    from .job import Job
    from .run import run_training

    with process_group() as group:  # under torchrun: this process's rank, else a group of one
        return run_training(Job(args.data_dir, args.output_dir, cfg, args.weights, args.cache_dir, args.device,
                                photos=fingerprint.photos, fingerprint=fingerprint.value, group=group))


def error_line(exc: Exception) -> str:
    """The library's message, led by the flag of the setting it is about (UserError.setting):
    every setting's flag is its name with dashes."""
    setting = getattr(exc, "setting", None)
    return f"--{setting.replace('_', '-')}: {exc}" if setting else str(exc)


def report(metrics: dict, output_dir: Path) -> None:
    s = metrics["summary"]
    print(f"{s['images_found']} images ({s['images_skipped']} skipped, {s['duplicates_dropped']} duplicates), "
          f"best epoch {s['best_epoch']}, {s['precision']} ({s['runtime']}) on {s['device']}, {s['seconds']} s")
    for split in ("train", "val", "test"):
        m = metrics[split]
        auc = f"{m['roc_auc']:.3f}" if m["roc_auc"] is not None else "n/a"
        acc = f"{m['accuracy']:.3f}" if m["accuracy"] is not None else "n/a"
        print(f"{split:>5}: accuracy {acc}  ROC-AUC {auc}  ({m['count']} images)")
    print(f"model written to {output_dir / config.ARTIFACT_FILE}")
