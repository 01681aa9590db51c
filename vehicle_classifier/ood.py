""""Neither a car nor a bike": how far a photo's features lie from the training photos'.

The score is the mean cosine distance from a photo's [CLS] feature to its `k` nearest training
features; above a threshold chosen on the validation split the photo is out of distribution.
Chosen by measurement (docs/training.md, "Neither a car nor a bike"): on EfficientNet-Lite0 features of
the 400 sample photos it separated every image of data/neither/ from every held-out car and
bike (AUROC 1.000), where class-conditional Gaussians (Mahalanobis, shared covariance) reached
0.96-0.97 and the softmax confidence 0.97, letting through most of data/neither/ at the same
acceptance rate. The artifact stores the training features (unit length, float16, at most
`config.OOD_MAX_REFERENCES` of them), so a request costs one small matrix product.
"""

from __future__ import annotations

import numpy as np

from . import config


def _unit(features) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def reference_features(train_features, seed: int) -> np.ndarray:
    """The training features the artifact keeps: unit length, float16, a seeded subset when
    there are more than `config.OOD_MAX_REFERENCES` (the artifact stays small)."""
    features = _unit(train_features)
    if len(features) > config.OOD_MAX_REFERENCES:
        chosen = np.random.default_rng(seed).permutation(len(features))[: config.OOD_MAX_REFERENCES]
        features = features[np.sort(chosen)]
    return np.ascontiguousarray(features.astype(np.float16))


def ood_scores(features, references, k: int = config.OOD_NEIGHBOURS) -> np.ndarray:
    """Mean cosine distance (0: the same direction, 2: opposite) to the `k` nearest references.
    Features and references: arrays or CPU tensors, one row each."""
    references = np.asarray(references, dtype=np.float32)
    similarity = _unit(features) @ references.T
    k = min(k, references.shape[0])
    nearest = -np.partition(-similarity, k - 1, axis=1)[:, :k]
    return 1.0 - nearest.mean(axis=1)


def choose_threshold(validation_scores, acceptance: float) -> float:
    """The score below which `acceptance` of the validation photos fall."""
    return float(np.quantile(np.asarray(validation_scores), acceptance))


def flagged_rate(scores, threshold: float) -> float | None:
    return float((np.asarray(scores) > threshold).mean()) if len(scores) else None
