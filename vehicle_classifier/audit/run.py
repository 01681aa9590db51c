"""The audit from an image folder to audit.json and audit.png: features (the training cache's),
out-of-fold label issues, near-duplicates and outliers."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import config
from ..data import DataError, stratified_split
from ..fileio import json_bytes, publish
from ..runtime import usable_cores
from ..training.job import Job
from ..training.run import Extraction, extract, unique_readable
from .duplicates import fingerprint_all, near_duplicate_pairs
from .labels import label_issues, out_of_fold_probabilities, outlier_scores
from .sheet import contact_sheet_png


def run_audit(data_dir: Path, output_dir: Path, cfg: config.TrainConfig, weights: Path | None = None,
              cache_dir: Path = config.FEATURE_CACHE_DIR, device: str = "auto") -> dict:
    """Audit the image folder `data_dir`; write audit.json and audit.png into `output_dir` (as one
    set) and return the report. Raises a UserError with a message fit for one line."""
    started = time.perf_counter()
    data_dir = Path(data_dir)
    # The training run's first stages (unreadable files are skipped with a warning there).
    ex = extract(Job(data_dir, cfg=replace(cfg, neither_dir=""), weights=weights, cache_dir=cache_dir, device=device))
    photos, class_names = ex.photos, ex.photos.class_names
    readable = [i for i, digest in enumerate(photos.digests) if digest in ex.features]
    paths = [str(photos.samples[i].path.relative_to(data_dir)) for i in readable]
    features = torch.stack([ex.features[photos.digests[i]] for i in readable])
    labels = np.array([photos.samples[i].label for i in readable])
    if min(np.bincount(labels, minlength=len(class_names))) < config.CALIBRATION_FOLDS:
        raise _too_few_photos(class_names, labels)
    report = {
        "data_dir": str(data_dir), "backbone": cfg.backbone, "photos": len(paths),
        "unreadable": sorted(str(p.relative_to(data_dir)) for p in ex.failures),
        "label_issues": _label_report(features, labels, paths, class_names, cfg),
        "near_duplicates": _duplicate_report(ex, readable, paths, data_dir, cfg),
        "outliers": _outlier_report(features, [photos.digests[i] for i in readable], paths, cfg),
    }
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["extract_seconds"] = round(ex.seconds, 2)
    publish(Path(output_dir), {config.AUDIT_FILE: json_bytes(report),
                               config.AUDIT_SHEET: contact_sheet_png(report, data_dir, ex.preprocessing)})
    return report


def _too_few_photos(class_names: list[str], labels: np.ndarray) -> DataError:
    counts = dict(zip(class_names, np.bincount(labels, minlength=len(class_names)).tolist()))
    return DataError(f"the audit needs at least {config.CALIBRATION_FOLDS} readable photos per class "
                     f"(one per fold); found {counts}")


def _label_report(features: torch.Tensor, labels: np.ndarray, paths: list[str], class_names: list[str],
                  cfg: config.TrainConfig) -> list[dict]:
    """Every photo, most suspicious first: given and suggested class, label quality score, and
    whether confident learning flags it."""
    probabilities = out_of_fold_probabilities(features, torch.from_numpy(labels), len(class_names), cfg)
    scores, flagged = label_issues(labels, probabilities)
    order = np.argsort(scores, kind="stable")
    return [{"path": paths[i], "given": class_names[labels[i]], "suggested": class_names[int(probabilities[i].argmax())],
             "score": round(float(scores[i]), 4), "issue": bool(flagged[i])} for i in order]


def _duplicate_report(ex: Extraction, readable: list[int], paths: list[str], data_dir: Path,
                      cfg: config.TrainConfig) -> list[dict]:
    """Pairs of near-duplicate photos, most similar first, and whether train.py's split (these
    settings) puts them on different sides."""
    prints = fingerprint_all([data_dir / p for p in paths], usable_cores())
    hashed = [i for i, p in enumerate(prints) if p is not None]
    side = split_sides(ex, data_dir, cfg)
    pairs = []
    for a, b, similarity in near_duplicate_pairs([prints[i] for i in hashed]):
        pa, pb = paths[hashed[a]], paths[hashed[b]]
        crosses = pa in side and pb in side and side[pa] != side[pb]
        pairs.append({"paths": [pa, pb], "similarity": similarity, "crosses_split": crosses})
    return pairs


def split_sides(ex: Extraction, data_dir: Path, cfg: config.TrainConfig) -> dict[str, str]:
    """Which part of train.py's split (train, val or test) each photo falls in, as train.py
    makes it from these photos and settings; identical files after the first are in none
    (training drops them)."""
    kept, _ = unique_readable(ex.photos.samples, ex.photos.digests, ex.features)
    split = stratified_split([s.label for s, _ in kept], cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return {str(kept[i][0].path.relative_to(data_dir)): name for name, indices in split.items() for i in indices}


def _outlier_report(features: torch.Tensor, digests: list[str], paths: list[str], cfg: config.TrainConfig) -> list[dict]:
    """The photos whose "neither" score is above what cfg.ood_acceptance of them stay under,
    least like the others first."""
    scores = outlier_scores(features, digests)
    threshold = float(np.quantile(scores, cfg.ood_acceptance))
    order = np.argsort(-scores, kind="stable")
    return [{"path": paths[i], "score": round(float(scores[i]), 4)} for i in order if scores[i] > threshold]
