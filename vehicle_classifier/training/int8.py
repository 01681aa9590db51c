"""int8 at training time: the exported graph quantized (export.quantize) on centre crops of the
training photos, and the fidelity gate: the head's answers on the validation photos through the
int8 graph against the fp32 one. 'auto' serves int8 only where the gate held (runtime.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .. import config
from ..export import quantize
from ..head import MLPHead
from ..images import load_crop
from ..runtime import OpenVINOModel
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


def fidelity(graphs: tuple, head: MLPHead, temperature: float, val_paths: list[Path], labels: list[int],
             preprocessing: dict) -> dict:
    """The head's answers on the validation photos through the int8 graph against fp32: top-1
    agreement, max |Δp|, feature cosine, both accuracies; `passed` when the agreement reaches
    config.INT8_MIN_AGREEMENT."""
    batch = crops(val_paths, preprocessing)
    exact, fast = (OpenVINOModel(g, p)(batch)[0] for g, p in zip(graphs, ("fp32", "int8")))
    cosine = (exact * fast).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(fast, axis=1))
    with torch.no_grad():
        p32, p8 = (predict_proba(head, torch.from_numpy(f), temperature).numpy() for f in (exact, fast))
    top32, top8, truth = p32.argmax(1), p8.argmax(1), np.asarray(labels)
    agreement = float((top32 == top8).mean())
    report = {
        "photos": len(val_paths), "top1_agreement": agreement, "max_abs_dp": float(np.abs(p32 - p8).max()),
        "feature_cosine_median": float(np.median(cosine)), "feature_cosine_min": float(cosine.min()),
        "accuracy_fp32": float((top32 == truth).mean()), "accuracy_int8": float((top8 == truth).mean()),
        "min_agreement": config.INT8_MIN_AGREEMENT, "passed": agreement >= config.INT8_MIN_AGREEMENT,
    }
    log.info("int8 fidelity gate %s: top-1 agreement %.2f%% on %d validation photos (needs %.1f%%)",
             "held" if report["passed"] else "failed", 100 * agreement, len(val_paths),
             100 * config.INT8_MIN_AGREEMENT)
    return report
