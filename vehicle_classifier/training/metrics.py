"""Evaluation numbers and the plots people would rather see than read."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..fileio import write_file


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, ROC-AUC and the confusion matrix.

    Plain numpy rather than sklearn.metrics: importing sklearn costs ~2 s, most of a cached
    rerun of train.py; tests/test_metrics.py checks these numbers against sklearn's.
    """
    labels = np.asarray(labels, dtype=int)
    n_classes = len(class_names)
    predictions = probabilities.argmax(axis=1) if len(labels) else labels
    matrix = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(matrix, (labels, predictions), 1)
    true_pos = np.diag(matrix).astype(float)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros(n_classes), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n_classes), where=precision + recall > 0)
    if n_classes == 2:
        roc_auc = _binary_roc_auc(labels == 1, probabilities[:, 1])
    else:  # one-vs-rest, macro average
        aucs = [_binary_roc_auc(labels == c, probabilities[:, c]) for c in range(n_classes)]
        roc_auc = None if None in aucs else float(np.mean(aucs))
    return {
        "count": int(len(labels)),
        "accuracy": float((predictions == labels).mean()) if len(labels) else None,
        "roc_auc": roc_auc,
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": matrix.tolist(),
    }


def calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error (the bin-weighted gap between confidence and accuracy over
    equal-width confidence bins) and each bin's count, confidence and accuracy for the diagram."""
    labels = np.asarray(labels, dtype=int)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            ece += members.mean() * gap
            table.append({"bin": b, "count": int(members.sum()), "confidence": float(confidence[members].mean()),
                          "accuracy": float(correct[members].mean())})
    return {"ece": float(ece) if len(labels) else None, "bins": table}


def _binary_roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count half); None when
    one side is empty, where the curve is undefined."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def plot_learning_curves(history: list[dict], best_epoch: int, path: Path) -> None:
    write_file(path, learning_curves_png(history, best_epoch))


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    write_file(path, confusion_matrix_png(matrix, class_names, title))


def learning_curves_png(history: list[dict], best_epoch: int) -> bytes:
    plt = _figure()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], label=split)
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], label=split)
    for ax, title in ((ax_loss, "cross-entropy loss"), (ax_acc, "accuracy")):
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    return _png(plt, fig)


def reliability_diagram_png(panels: dict[str, tuple[dict, dict]], bins: int, temperature: float) -> bytes:
    """Accuracy against confidence per bin, before and after temperature scaling, one panel per
    title in `panels` (its calibration_error tables before and after); the diagonal is perfect
    calibration. Marker area shows how many photos a bin holds."""
    plt = _figure()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (title, (before, after)) in zip(axes[0], panels.items()):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
        for table, name in ((before, "before"), (after, f"after (T = {temperature:.2f})")):
            rows = table["bins"]
            ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", linewidth=1,
                    label=f"{name}: ECE {table['ece']:.4f}")
            ax.scatter([r["confidence"] for r in rows], [r["accuracy"] for r in rows],
                       s=[20 + 2 * r["count"] for r in rows], alpha=0.25)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel=f"confidence ({bins} bins)", ylabel="accuracy",
               title=title)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(plt, fig)


def confusion_matrix_png(matrix: list[list[int]], class_names: list[str], title: str) -> bytes:
    plt = _figure()
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    fig.tight_layout()
    return _png(plt, fig)
