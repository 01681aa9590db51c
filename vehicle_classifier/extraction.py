"""Images to features, fast: photos decoded in worker processes that keep batches ready, and
the frozen backbone run over them in batches (OpenVINO, a stream per core, on CPU; torch on CUDA).
Shared by training's feature cache (training/features.py) and batch prediction (offline/batch.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .images import ImageError, load_tensor
from .devices import autocast
from .export import to_openvino
from .runtime import OpenVINOModel, runtime_for, usable_cores


# --- loading: decode on every core, feed the device without waiting ------------------------
CPU_BATCH_SIZE = 16  # OpenVINO, a stream per core: batches of 16 keep each stream busy
CUDA_MAX_BATCH_SIZE = 256  # ViT-S/16 bf16 on an H100 runs ~18,000 img/s from batch 256 up
# Images one CPU core decodes and preprocesses per second (~270 for the public dataset's
# photos) against what a stream of the CPU backbone computes (~40): on CPU one decoding
# worker keeps up with about six cores of backbone.
CPU_CORES_PER_DECODER = 6


def decode_workers(device: torch.device, processes: int = 1) -> int:
    """DataLoader worker processes for decoding, for each of `processes` that share the cores
    (the ranks of a torchrun on this node). On CUDA the forward is ~60x faster than one core's
    decode, so every core but the one feeding the GPU decodes; on CPU the backbone needs the
    cores itself, so one worker per CPU_CORES_PER_DECODER (one on a 2-core machine)."""
    cores = max(1, usable_cores() // processes)
    if device.type == "cuda":
        return max(1, cores - 1)
    return max(1, cores // CPU_CORES_PER_DECODER)


def fit_batch_size(model: nn.Module, input_size: int, device: torch.device, precision: str) -> int:
    """The batch size for the device: CPU_BATCH_SIZE on CPU; on CUDA the largest power of two
    up to CUDA_MAX_BATCH_SIZE whose forward fits in the GPU's memory (tried, halving on
    out-of-memory; the successful try doubles as the warm-up)."""
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    batch_size = CUDA_MAX_BATCH_SIZE
    while True:
        try:
            with torch.inference_mode(), autocast(device, precision):
                model(torch.zeros(batch_size, 3, input_size, input_size, device=device))
            return batch_size
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch_size == 1:
                raise
            batch_size //= 2


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path], preprocessing: dict):
        self.paths, self.preprocessing = paths, preprocessing

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, load_tensor(self.paths[index], self.preprocessing), ""
        except ImageError as exc:
            return index, None, str(exc)


def _collate(items):
    good = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, err) for i, t, err in items if t is None]
    indices = [i for i, _ in good]
    batch = torch.stack([t for _, t in good]) if good else None
    return indices, batch, failed


def image_batches(paths: list[Path], preprocessing: dict, device: torch.device, batch_size: int,
                  num_workers: int | None = None) -> DataLoader:
    """(indices, batch or None, [(index, reason)...]) per batch of `paths`, decoded in worker
    processes that stay up and keep batches ready ahead; pinned memory on CUDA, so that the copy
    to the GPU runs beside the forward (non_blocking)."""
    num_workers = decode_workers(device) if num_workers is None else num_workers
    return DataLoader(
        _ImageFiles(paths, preprocessing),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


# --- extraction -----------------------------------------------------------------------------
def _cuda_forward(model: nn.Module, batches: Iterable, device: torch.device, precision: str) -> Iterator:
    """(tag, features on the CPU) per (tag, batch), one batch ahead: the next batch's copy and
    forward are queued on the GPU before the previous batch's features are copied back (the
    copy back waits for the GPU)."""
    pending = None
    for tag, batch in batches:
        with autocast(device, precision):
            features = model(batch.to(device, non_blocking=True)).float()
        if pending is not None:
            yield pending[0], pending[1].cpu()
        pending = (tag, features)
    if pending is not None:
        yield pending[0], pending[1].cpu()


@torch.inference_mode()
def backbone_features(model: nn.Module, paths: list[Path], preprocessing: dict, device: torch.device,
                      precision: str, batch_size: int = 0, num_workers: int | None = None,
                      ) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """(indices into `paths`, their features as float32 on the CPU, [(index, reason) of
    unreadable files]) batch by batch, as soon as each is computed: decoding in worker
    processes, the backbone through OpenVINO (a stream per core) on CPU, through torch on CUDA.
    `batch_size` 0: fitted to the device."""
    if not paths:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # pinned memory and kernels on this rank's GPU, not GPU 0
        model = model.to(device).eval()
    batch_size = batch_size or fit_batch_size(model, preprocessing["input_size"], device, precision)
    batches = iter(image_batches(paths, preprocessing, device, batch_size, num_workers))
    # ^ its worker processes fork here, before OpenVINO starts threads (runtime.py)
    failed: list[tuple[int, str]] = []

    def readable():
        for indices, batch, bad in batches:
            failed.extend(bad)
            if batch is not None:
                yield indices, batch

    if runtime_for(device) == "openvino":
        forward = OpenVINOModel(to_openvino(model, preprocessing["input_size"]), precision, mode="throughput")
        computed = forward.map((indices, batch.numpy()) for indices, batch in readable())
        results = ((indices, torch.from_numpy(features)) for indices, features in computed)
    else:
        results = _cuda_forward(model, readable(), device, precision)
    for indices, features in results:
        bad, failed[:] = list(failed), []
        yield indices, features, bad
    if failed:
        yield [], None, failed
