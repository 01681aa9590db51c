"""Images to features, fast: photos decoded and centre-cropped in worker processes that keep
batches ready, and the one forward (the exported graph through OpenVINO, a stream per core, on
CPU; backbone.OnCrops through torch on CUDA: model/torch_forward.py) run over them in batches.
Shared by training's feature cache (training/features.py) and batch prediction (offline/batch.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .images import ImageError, load_crop
from .runtime import usable_cores


# --- loading: decode on every core, feed the device without waiting ------------------------
# Images one CPU core decodes and crops per second (~270 for the public dataset's photos)
# against what a stream of the CPU backbone computes (~40): on CPU one decoding worker keeps up
# with about six cores of backbone.
CPU_CORES_PER_DECODER = 6


def decode_workers(device, processes: int = 1) -> int:
    """DataLoader worker processes for decoding, for each of `processes` that share the cores
    (the ranks of a torchrun on this node). On CUDA the forward is ~60x faster than one core's
    decode, so every core but the one feeding the GPU decodes; on CPU the backbone needs the
    cores itself, so one worker per CPU_CORES_PER_DECODER (one on a 2-core machine)."""
    cores = max(1, usable_cores() // processes)
    if str(device).startswith("cuda"):
        return max(1, cores - 1)
    return max(1, cores // CPU_CORES_PER_DECODER)


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path], preprocessing: dict):
        self.paths, self.preprocessing = paths, preprocessing

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, load_crop(self.paths[index], self.preprocessing), ""
        except ImageError as exc:
            return index, None, str(exc)


def _collate(items):
    good = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, err) for i, t, err in items if t is None]
    indices = [i for i, _ in good]
    batch = torch.from_numpy(np.stack([t for _, t in good])) if good else None  # uint8 NHWC
    return indices, batch, failed


def image_batches(paths: list[Path], preprocessing: dict, device, batch_size: int,
                  num_workers: int | None = None) -> DataLoader:
    """(indices, uint8 crops (N, H, W, 3) or None, [(index, reason)...]) per batch of `paths`,
    decoded in worker processes that stay up and keep batches ready ahead; pinned memory on
    CUDA, so that the copy to the GPU runs beside the forward (non_blocking)."""
    num_workers = decode_workers(device) if num_workers is None else num_workers
    return DataLoader(
        _ImageFiles(paths, preprocessing),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=str(device).startswith("cuda"),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


# --- extraction -----------------------------------------------------------------------------
def backbone_features(forward, paths: list[Path], preprocessing: dict, batch_size: int = 0,
                      num_workers: int | None = None,
                      ) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
    """(indices into `paths`, their features as float32, [(index, reason) of unreadable files])
    batch by batch, as soon as each is computed: decoding in worker processes, the backbone
    through `forward` (runtime.OpenVINOModel or torch_forward.TorchForward: `map` keeps every
    stream busy). `batch_size` 0: the forward's preferred one (fitted to a GPU's memory)."""
    if not paths:
        return
    batch_size = batch_size or forward.preferred_batch()
    batches = iter(image_batches(paths, preprocessing, forward.device, batch_size, num_workers))
    # ^ its worker processes fork here, before the forward starts threads (runtime.py)
    failed: list[tuple[int, str]] = []

    def readable():
        for indices, batch, bad in batches:
            failed.extend(bad)
            if batch is not None:
                yield indices, batch

    for indices, features in forward.map(readable()):
        bad, failed[:] = list(failed), []
        yield indices, features, bad
    if failed:
        yield [], None, failed
