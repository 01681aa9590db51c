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
import torch
import torch.nn.functional as F

from . import config


def reference_features(train_features: torch.Tensor, seed: int) -> torch.Tensor:
    """The training features the artifact keeps: unit length, float16, a seeded subset when
    there are more than `config.OOD_MAX_REFERENCES` (the artifact stays small)."""
    features = F.normalize(train_features.float(), dim=1)
    if len(features) > config.OOD_MAX_REFERENCES:
        chosen = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
        features = features[chosen[: config.OOD_MAX_REFERENCES].sort().values]
    return features.half().contiguous()


def ood_scores(features: torch.Tensor, references: torch.Tensor, k: int = config.OOD_NEIGHBOURS) -> torch.Tensor:
    """Mean cosine distance (0: the same direction, 2: opposite) to the `k` nearest references."""
    similarity = F.normalize(features.float(), dim=1) @ references.float().T
    nearest = similarity.topk(min(k, references.shape[0]), dim=1).values
    return 1.0 - nearest.mean(dim=1)


def choose_threshold(validation_scores: torch.Tensor, acceptance: float) -> float:
    """The score below which `acceptance` of the validation photos fall."""
    return float(np.quantile(validation_scores.numpy(), acceptance))


def flagged_rate(scores: torch.Tensor, threshold: float) -> float | None:
    return float((scores > threshold).float().mean()) if len(scores) else None
