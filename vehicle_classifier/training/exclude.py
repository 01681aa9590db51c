"""`train.py --exclude audit.json`: leave out what the data audit (python -m
vehicle_classifier.audit) flagged: the photos confident learning counts as label issues, and
every near-duplicate but one of each group (counted once, as identical files are, so that no
copy sits on both sides of the split). The report says what was left out and how many of the
audit's near-duplicate pairs the split made without it would have put on both sides."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import config
from ..data import DataError, Sample, stratified_split

log = logging.getLogger(__name__)


def read_audit(path: Path) -> tuple[set[str], list[list[str]]]:
    """The label issues' paths and the near-duplicate pairs of an audit.json."""
    try:
        report = json.loads(Path(path).read_text())
        issues = {item["path"] for item in report["label_issues"] if item["issue"]}
        pairs = [list(pair["paths"]) for pair in report["near_duplicates"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a readable {config.AUDIT_FILE} ({type(exc).__name__}: {exc})",
                        setting="exclude") from None
    return issues, pairs


def extra_copies(pairs: list[list[str]]) -> set[str]:
    """Of each group of near-duplicates (pairs sharing a photo join one group), every photo but
    the first by name."""
    group = {}

    def root(path: str) -> str:
        while group.setdefault(path, path) != path:
            path = group[path]
        return path

    for a, b in pairs:
        first, second = sorted((root(a), root(b)))
        group[second] = first
    return {path for path in group if root(path) != path}


def apply_exclusions(kept: list[tuple[Sample, str]], data_dir: Path,
                     cfg: config.TrainConfig) -> tuple[list[tuple[Sample, str]], dict | None]:
    """`kept` without what cfg.exclude's audit flagged, and the report for metrics.json (None
    without --exclude)."""
    if not cfg.exclude:
        return kept, None
    issues, pairs = read_audit(Path(cfg.exclude))
    copies = extra_copies(pairs) - issues
    names = [str(sample.path.relative_to(data_dir)) for sample, _ in kept]
    side = {}
    for part, indices in stratified_split([s.label for s, _ in kept], cfg.val_fraction, cfg.test_fraction,
                                          cfg.seed).items():
        side.update({names[i]: part for i in indices})
    crossing = sum(a in side and b in side and side[a] != side[b] for a, b in pairs)
    left = [item for item, name in zip(kept, names) if name not in issues and name not in copies]
    report = {"audit": str(cfg.exclude), "label_issues": sum(n in issues for n in names),
              "near_duplicate_copies": sum(n in copies for n in names), "near_duplicate_pairs": len(pairs),
              "pairs_across_split_without_exclusion": crossing, "not_found": len((issues | copies) - set(names))}
    log.info("audit %s: left out %d label issues and %d near-duplicate copies (%d of the audit's %d "
             "near-duplicate pairs would have crossed this split)", cfg.exclude, report["label_issues"],
             report["near_duplicate_copies"], crossing, len(pairs))
    return left, report
