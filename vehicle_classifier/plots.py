"""Figures of a dataset and a model, shared by notebook.ipynb and scripts/make_figures.py: a grid
of sample photos per class, and the attention banner (photos with the backbone's [CLS] attention
and the model's answer).

Plain `matplotlib.figure.Figure`s, not pyplot: the notebook displays them inline, the script
saves them, and neither leaves global pyplot state behind.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from .data import Sample
from .fileio import atomic_path
from .images import ImageError, center_crop, open_image


def shuffled_by_class(samples: list[Sample], class_names: list[str], seed: int = 0) -> dict[str, list[Path]]:
    """Each class's files in a seeded random order: the candidates figures draw from."""
    rng = np.random.default_rng(seed)
    return {
        name: [samples[i].path for i in rng.permutation([i for i, s in enumerate(samples) if s.label == label])]
        for label, name in enumerate(class_names)
    }


def _readable(paths: list[Path], count: int, draft_size: int) -> list[tuple[Path, Image.Image]]:
    """The first `count` files that decode; a damaged file in the data is skipped, not drawn."""
    found = []
    for path in paths:
        try:
            found.append((path, open_image(path, draft_size)))
        except ImageError:
            continue
        if len(found) == count:
            break
    return found


def sample_grid(paths_by_class: dict[str, list[Path]], per_class: int, preprocessing: dict) -> Figure:
    """One row per class of `per_class` photos, each as the centre crop the backbone sees."""
    rows = {name: _readable(paths, per_class, preprocessing["resize_size"]) for name, paths in paths_by_class.items()}
    fig = Figure(figsize=(1.6 * per_class, 1.75 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), per_class, squeeze=False))
    for row, (name, photos) in zip(axes, rows.items()):
        for col, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col < len(photos):
                path, image = photos[col]
                ax.imshow(center_crop(image, preprocessing))
                ax.set_xlabel(path.name, fontsize=6)
        row[0].set_ylabel(name, fontsize=11)
    return fig


def attention_banner(predictor, paths_by_class: dict[str, list[Path]], per_class: int) -> Figure:
    """For `per_class` photos of each class: the photo (top) and the last block's [CLS]
    attention over it with the model's answer (bottom). A backbone without attention maps (a
    CNN) gets the photos with the answers alone."""
    preprocessing = predictor.model.preprocessing
    photos = [(name, path, image) for name, paths in paths_by_class.items()
              for path, image in _readable(paths, per_class, preprocessing["resize_size"])]
    attention = predictor.attention_available
    predictions = predictor.predict([image for _, _, image in photos], attention=attention)
    fig = Figure(figsize=(1.7 * len(photos), 3.7 if attention else 2.1), layout="constrained")
    axes = fig.subplots(2 if attention else 1, len(photos), squeeze=False)
    for col, ((name, path, image), prediction) in enumerate(zip(photos, predictions)):
        axes[0, col].imshow(predictor.crop(image))
        axes[0, col].set_title(name, fontsize=10)
        if attention:
            axes[1, col].imshow(Image.open(io.BytesIO(base64.b64decode(prediction.attention_png))))
        answer = f"{prediction.label} {prediction.confidence:.2f}"
        if prediction.in_distribution is False:
            answer = f"neither? ({answer})"
        color = "black" if prediction.label == name else "red"
        if attention:
            axes[1, col].set_title(f"predicted {answer}", fontsize=9, color=color)
        else:  # one row: the answer under the photo
            axes[0, col].text(0.5, -0.04, f"predicted {answer}", transform=axes[0, col].transAxes, ha="center",
                              va="top", fontsize=9, color=color)
        for ax in axes[:, col]:
            ax.set_axis_off()
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
