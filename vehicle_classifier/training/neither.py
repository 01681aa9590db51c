""""Neither a car nor a bike", as training sets it up: the training features the artifact keeps
and the threshold on their distance (ood.py's score), chosen on the validation split; with how
many test photos it accepts and how many images of neither class it flags."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import config
from ..data import visible_files
from ..ood import choose_threshold, flagged_rate, ood_scores, reference_features

log = logging.getLogger(__name__)


@dataclass
class Neither:
    references: np.ndarray  # the training features the artifact keeps (float16, unit length)
    report: dict  # metrics.json's "ood": the method, the threshold and what it accepts and flags


def neither_paths(folder: Path | str) -> list[Path]:
    """The images that are neither class (every file under `folder`, but hidden ones; none when
    it is absent, or '' to skip them)."""
    if not str(folder) or not Path(folder).is_dir():
        return []
    return visible_files(Path(folder))


def fit_neither(part: dict, neither: list[torch.Tensor], cfg: config.TrainConfig) -> Neither | None:
    """The references and the threshold that accepts cfg.ood_acceptance of the validation
    photos; the share of test photos accepted and of the 'neither' images (`neither`: their
    features) flagged. None without a validation split to choose the threshold on. `part`: each
    split's (features, labels)."""
    if not len(part["val"][1]):
        log.warning("no validation split: answers will not say whether a photo is like the training photos")
        return None
    references = reference_features(part["train"][0], cfg.seed)
    scores = {name: ood_scores(x, references) for name, (x, _) in part.items()}
    threshold = choose_threshold(scores["val"], cfg.ood_acceptance)
    accepted = {name: 1 - flagged_rate(scores[name], threshold) for name in ("val", "test") if len(scores[name])}
    neither_flagged = flagged_rate(ood_scores(torch.stack(neither), references), threshold) if neither else None
    return Neither(references, {
        "method": "knn-cosine", "k": config.OOD_NEIGHBOURS, "references": len(references),
        "acceptance_target": cfg.ood_acceptance, "threshold": threshold, "accepted": accepted,
        "neither": {"count": len(neither), "flagged": neither_flagged, "dir": str(cfg.neither_dir)},
    })
