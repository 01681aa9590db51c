"""int8 at training time: the exported graph quantized (export.quantize) on centre crops of the
training photos, and the fidelity gate: the head's answers on the validation photos through the
int8 graph against the features it learned on (the float graph's). 'auto' serves int8 only where
the gate held (runtime.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .. import config
from ..export import quantize
from ..head import MLPHead
from ..images import load_crop
from .head_training import predict_proba

log = logging.getLogger(__name__)


def crops(paths: list[Path], preprocessing: dict) -> np.ndarray:
    """uint8 NHWC centre crops, as every path feeds the graph (images.load_crop)."""
    return np.stack([load_crop(p, preprocessing) for p in paths])


def calibration_paths(paths: list[Path], count: int = config.INT8_CALIBRATION_CROPS) -> list[Path]:
    """`count` photos spread evenly over the list (every class, not the first folder's alone)."""
    step = max(1, len(paths) // count)
    return paths[::step][:count]


def quantized(graph, preprocessing: dict, train_paths: list[Path], transformer: bool):
    """`graph`'s int8 copy, calibrated on crops of the training photos; `graph` is the exported
    graph (export.exported_graph) the run extracted its features with."""
    return quantize(graph, list(crops(calibration_paths(train_paths), preprocessing)), transformer)


def fidelity(reference: np.ndarray, fast: np.ndarray, reference_precision: str, head: MLPHead,
             temperature: float, labels: list[int]) -> dict:
    """The head's answers on the validation photos through the int8 graph (`fast`: their
    features through it) against `reference`: their features as the run extracted them (the
    float graph, in `reference_precision`), so the gate measures what int8 changes from what the
    head learned on, without running the float graph again (4-5 s of 9.5 for 90 ViT-S/16 photos
    here). Top-1 agreement, max |Δp|, feature cosine, both accuracies; `passed` when the
    agreement reaches config.INT8_MIN_AGREEMENT."""
    exact, fast = np.asarray(reference, np.float32), np.asarray(fast, np.float32)
    cosine = (exact * fast).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(fast, axis=1))
    with torch.no_grad():
        p32, p8 = (predict_proba(head, torch.from_numpy(f), temperature).numpy() for f in (exact, fast))
    top32, top8, truth = p32.argmax(1), p8.argmax(1), np.asarray(labels)
    agreement = float((top32 == top8).mean())
    report = {
        "photos": len(labels), "reference": f"the float graph's features ({reference_precision}) the head learned on",
        "top1_agreement": agreement, "max_abs_dp": float(np.abs(p32 - p8).max()),
        "feature_cosine_median": float(np.median(cosine)), "feature_cosine_min": float(cosine.min()),
        "accuracy_float": float((top32 == truth).mean()), "accuracy_int8": float((top8 == truth).mean()),
        "min_agreement": config.INT8_MIN_AGREEMENT, "passed": agreement >= config.INT8_MIN_AGREEMENT,
    }
    log.info("int8 fidelity gate %s: top-1 agreement %.2f%% on %d validation photos (needs %.1f%%)",
             "held" if report["passed"] else "failed", 100 * agreement, len(labels),
             100 * config.INT8_MIN_AGREEMENT)
    return report
