"""Our numpy metrics agree with scikit-learn's on random and edge-case inputs."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from vehicle_classifier.training.metrics import classification_metrics

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("seed, n_classes, n", [(0, 2, 50), (1, 2, 7), (2, 3, 80), (3, 2, 200)])
def test_metrics_match_sklearn(seed, n_classes, n):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    labels[:n_classes] = np.arange(n_classes)  # every class present
    logits = rng.normal(size=(n, n_classes)) + np.eye(n_classes)[labels] * rng.uniform(0, 2)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, 2)  # ties in the scores, which ROC-AUC must count as half
    probs[:, -1] = 1 - probs[:, :-1].sum(1)
    names = [f"c{i}" for i in range(n_classes)]
    ours = classification_metrics(labels, probs, names)
    preds = probs.argmax(1)
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=range(n_classes), zero_division=0)
    for i, name in enumerate(names):
        assert ours["per_class"][name] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})
    assert ours["confusion_matrix"] == confusion_matrix(labels, preds, labels=range(n_classes)).tolist()
    assert ours["accuracy"] == pytest.approx((preds == labels).mean())
    expected_auc = roc_auc_score(labels, probs[:, 1]) if n_classes == 2 else roc_auc_score(labels, probs, multi_class="ovr")
    assert ours["roc_auc"] == pytest.approx(expected_auc)


def test_single_class_split_has_no_roc_auc_and_no_crash():
    m = classification_metrics(np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]]), ["a", "b"])
    assert m["roc_auc"] is None
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["precision"] == 0.0  # predicted once, wrongly


def test_empty_split():
    m = classification_metrics(np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"])
    assert m["count"] == 0 and m["accuracy"] is None and m["roc_auc"] is None
