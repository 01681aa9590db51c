"""Photos filed under the wrong class, and photos unlike both classes.

Label issues: every photo scored by a head that never saw it (out of fold, as the calibration
does it: training.calibration.out_of_fold_logits), then cleanlab's confident learning on those
probabilities: its label quality score (the out-of-fold probability of the given label) ranks
every photo, and find_label_issues says which ones are likely wrong (per-class thresholds from
the data, not a fixed cut). On 312 sample photos with 16 moved to the other class it ranked all
16 among the 17 most suspicious, on three plants (docs/audit.md).

Outliers: the "neither" score that training uses (ood.py): mean cosine distance to the nearest
photos' features, here to the other photos of the data set (the photo itself and identical
copies of it left out); above the score that config's acceptance share of the photos stays
under, a photo is listed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import config
from ..data import stratified_split
from ..devices import torch_threads
from ..training.calibration import out_of_fold_logits
from ..training.head_training import train_head


def out_of_fold_probabilities(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                              cfg: config.TrainConfig) -> np.ndarray:
    """Each photo's class probabilities from one of config.CALIBRATION_FOLDS heads that never
    saw it, trained for the epochs early stopping picks on cfg's validation share (as training
    picks them for the kept head)."""
    split = stratified_split(y.tolist(), cfg.val_fraction or 0.15, 0.0, cfg.seed)
    with torch_threads(1):  # tiny steps: see training.run.fit
        epochs = train_head(x[split["train"]], y[split["train"]], x[split["val"]], y[split["val"]],
                            num_classes, cfg, progress=False).best_epoch
        logits = out_of_fold_logits(x, y, num_classes, epochs, cfg)
    return logits.softmax(dim=1).numpy()


def label_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's label quality score of every photo (0: surely mislabelled, 1: surely right)
    and whether confident learning counts it as a label issue."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    scores = get_label_quality_scores(labels, probabilities, method="self_confidence")
    flagged = find_label_issues(labels, probabilities)
    return scores, flagged


def outlier_scores(features: torch.Tensor, digests: list[str], k: int = config.OOD_NEIGHBOURS) -> np.ndarray:
    """The "neither" score of each photo against all the others: mean cosine distance to its
    `k` nearest, the photo itself and identical files (same digest) excluded."""
    unit = F.normalize(features.float(), dim=1)
    similarity = unit @ unit.T
    codes = torch.tensor(np.unique(digests, return_inverse=True)[1])
    similarity[codes[:, None] == codes[None, :]] = -float("inf")
    nearest = similarity.topk(min(k, len(features) - 1), dim=1).values
    return (1.0 - nearest.mean(dim=1)).numpy()
