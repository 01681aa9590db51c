"""Image-folder datasets: finding image files, class names from sub-folders, each file's content
digest, and deterministic stratified splits and folds. Free of torch (train.py's up-to-date check
scans and hashes the photos before torch is imported)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import UserError, config


class DataError(UserError):
    """The dataset cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def file_digest(path: Path) -> str:
    """sha256 of a file's content: what identifies an image for the feature cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def visible_files(folder: Path, extensions: tuple[str, ...] | None = None) -> list[Path]:
    """Every file under `folder`, sorted, but hidden ones (a name starting with ".", or inside
    such a folder); with `extensions`, only the files with one of them (in any case)."""
    folder = Path(folder)
    return sorted(
        path for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and (extensions is None or path.suffix.lower() in extensions)
    )


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, by extension (config.IMAGE_EXTENSIONS), sorted."""
    return visible_files(folder, config.IMAGE_EXTENSIONS)


def scan_image_folder(root: Path) -> tuple[list[str], list[Sample]]:
    """Every file under each class folder (sorted); files that are not images are found out,
    and skipped with a warning, when they are decoded."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file, not a folder (expected a data folder with one sub-folder per class)")
    if not root.is_dir():
        raise DataError(f"data directory not found: {root} (expected one sub-folder per class)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(f"{root} needs at least two class sub-folders, found {len(class_dirs)}")
    samples = [Sample(path, label) for label, class_dir in enumerate(class_dirs) for path in visible_files(class_dir)]
    return [d.name for d in class_dirs], samples


@dataclass
class ImageFolder:
    """An image-folder dataset as found on disk: its classes, every file under them and each
    file's content digest (read once per training run: the up-to-date check and the feature
    cache both go by it)."""

    root: Path
    class_names: list[str]
    samples: list[Sample]
    digests: list[str]


def read_image_folder(root: Path) -> ImageFolder:
    """scan_image_folder, with every file's digest."""
    class_names, samples = scan_image_folder(root)
    return ImageFolder(Path(root), class_names, samples, [file_digest(s.path) for s in samples])


def stratified_split(labels: list[int], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Indices of train/val/test, class proportions kept in each; the same seed, the same split."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError("validation and test fractions must be in [0, 1) and sum to less than 1")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    split = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        split["test"] += members[:n_test].tolist()
        split["val"] += members[n_test : n_test + n_val].tolist()
        split["train"] += members[n_test + n_val :].tolist()
    return {name: sorted(indices) for name, indices in split.items()}


def stratified_folds(labels: list[int], folds: int, seed: int) -> list[int]:
    """Each sample's fold, 0 to `folds` - 1: the classes, each in a seeded order, dealt one after
    the other round-robin over the folds, so every fold holds its share of each class and the
    folds' sizes differ by one at most. The same seed, the same folds."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    fold, dealt = np.zeros(len(labels), dtype=int), 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return fold.tolist()
