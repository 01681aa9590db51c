"""[CLS] features of the frozen backbone: the fastest faithful precision, batched extraction, and
an on-disk cache so that a rerun never runs the backbone for a file it has seen.

On CPU the backbone runs through OpenVINO (runtime.py: ~1.4x torch's bf16 when batches are fed
to both cores at once), on CUDA through torch. The cache is keyed by backbone architecture +
weights digest + preprocessing + precision + runtime (one folder per key) and, inside it, by each
image file's content hash: renaming a file costs nothing, a changed or added file is the only
one recomputed. Features are persisted batch by batch, so an interrupted run loses nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import PRECISIONS
from .distributed import SINGLE, Group, part_suffix
from .fileio import WriteError, clean_temporaries, exclusive, write_file
from .images import DECODER_VERSION, ImageError, load_tensor
from .runtime import OpenVINOBackbone

log = logging.getLogger(__name__)


# --- precision ------------------------------------------------------------------------------
def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' is bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16
    or AMX: 1.3-1.6x fp32 in torch on this project's AMD EPYC (benchmarks/), features within ~1e-4 cosine of fp32), else fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def runtime_for(device: torch.device) -> str:
    return "openvino" if device.type == "cpu" else "torch"


def cache_key(architecture: str, model_kwargs: dict, weights_digest: str, preprocessing: dict, precision: str,
              runtime: str) -> str:
    identity = dict(architecture=architecture, model_kwargs=model_kwargs, weights=weights_digest,
                    preprocessing=preprocessing, precision=precision, runtime=runtime, decoder=DECODER_VERSION)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


# --- cache ----------------------------------------------------------------------------------
class FeatureCache:
    """Features by file-content digest, for one backbone key: a folder of safetensors shards.

    Each batch's features are written as a shard of their own as soon as they are computed
    (atomically and durably: a torn write leaves no shard, never a damaged one), so an
    interrupted, killed or disk-full run keeps everything it computed and the rerun extracts only
    the rest. Each shard names its key in its header, so a shard under the wrong key is ignored.
    Used as a context manager: the folder's lock is held meanwhile (a second run on the same
    cache waits, then finds the first run's features), and shards are merged into one on exit.
    """

    def __init__(self, cache_dir: Path, key: str):
        self.key = key
        self.folder = Path(cache_dir) / key
        self.legacy = Path(cache_dir) / f"{key}.safetensors"  # the one-file cache of earlier versions
        self.features: dict[str, torch.Tensor] = {}
        self._held = contextlib.ExitStack()

    def __enter__(self) -> "FeatureCache":
        with contextlib.ExitStack() as stack:
            stack.enter_context(exclusive(self.folder, "--cache-dir", wait=True))
            clean_temporaries(self.folder)
            for shard in self._shards():
                self.features.update(self._read(shard))
            self._held = stack.pop_all()
        return self

    def __exit__(self, *exc_info) -> None:
        with self._held:
            if exc_info[0] is None:
                self.compact()

    def _shards(self) -> list[Path]:
        return sorted(self.folder.glob("*.safetensors")) + ([self.legacy] if self.legacy.is_file() else [])

    def _read(self, shard: Path) -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(shard), framework="pt") as f:
                key = (f.metadata() or {}).get("cache_key")
                if key != self.key and shard != self.legacy:
                    raise ValueError(f"it belongs to cache key {key!r}")
                return {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # a damaged shard is only a slower run: its photos are redone
            log.warning("ignoring unreadable feature cache shard %s: %s", shard, exc)
            return {}

    def add(self, features: dict[str, torch.Tensor]) -> None:
        """Keep `features` and persist them at once, as a shard of their own."""
        if features:
            features = {k: v.detach().cpu().contiguous().clone() for k, v in features.items()}
            try:
                write_file(self.folder / f"{uuid.uuid4().hex}.safetensors", self._encode(features))
            except WriteError as exc:
                raise WriteError(f"{exc} (the features stored before are kept: a rerun continues from them)") from None
            self.features.update(features)

    def compact(self) -> None:
        """Merge the shards into one (fewer files to open next time); crash-safe, as the merged
        shard is complete before any other is removed."""
        shards = self._shards()
        if len(shards) > 1:
            write_file(self.folder / f"{uuid.uuid4().hex}.safetensors", self._encode(self.features))
            for shard in shards:
                shard.unlink(missing_ok=True)

    def _encode(self, features: dict[str, torch.Tensor]) -> bytes:
        return save(features, metadata={"cache_key": self.key})


# --- loading: decode on every core, feed the device without waiting ------------------------
CPU_BATCH_SIZE = 16  # OpenVINO, a stream per core: batches of 16 keep each stream busy
CUDA_MAX_BATCH_SIZE = 256  # ViT-S/16 bf16 on an H100 runs ~18,000 img/s from batch 256 up
# Images one CPU core decodes and preprocesses per second (~270 for the public dataset's
# photos) against what a stream of the CPU backbone computes (~40): on CPU one decoding
# worker keeps up with about six cores of backbone.
CPU_CORES_PER_DECODER = 6


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or a job scheduler's
    share, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
        results = OpenVINOBackbone(model, preprocessing["input_size"], precision, mode="throughput").map(readable())
    else:
        results = _cuda_forward(model, readable(), device, precision)
    for indices, features in results:
        bad, failed[:] = list(failed), []
        yield indices, features, bad
    if failed:
        yield [], None, failed


def extract_features(
    model: nn.Module,
    paths: list[Path],
    digests: list[str],
    preprocessing: dict,
    cache: FeatureCache,
    device: torch.device,
    precision: str,
    batch_size: int = 0,
    num_workers: int | None = None,
    group: Group = SINGLE,
) -> tuple[dict[str, torch.Tensor], dict[Path, str]]:
    """Features for every readable file (by digest) and the reason each unreadable one failed.
    Only files whose digest is not in the cache (an open FeatureCache) are decoded and run
    through the backbone; each batch's features are persisted as soon as they are computed.

    Under torchrun, rank 0 passes the cache and every other rank its own part cache
    (part_cache): the files rank 0's cache lacks are sharded by rank, each rank extracts its
    share into the cache it holds, and rank 0 then merges the parts into its cache."""
    todo = group.broadcast([i for i, d in enumerate(digests) if d not in cache.features])
    num_workers = decode_workers(device, group.local_world_size) if num_workers is None else num_workers
    mine = [(paths[i], digests[i]) for i in group.shard(todo) if digests[i] not in cache.features]
    failures = _extract_into(cache, model, mine, preprocessing, device, precision, batch_size, num_workers)
    if group.distributed:
        failures = _merge_parts(cache, failures, group)
    found = {d: cache.features[d] for d in digests if d in cache.features}
    return found, failures


def part_cache(cache_dir: Path, key: str, group: Group) -> FeatureCache:
    """A torchrun rank's own cache for its share of the features (merged by rank 0)."""
    return FeatureCache(cache_dir, key + part_suffix(group))


def _extract_into(cache: FeatureCache, model: nn.Module, files: list[tuple[Path, str]], preprocessing: dict,
                  device: torch.device, precision: str, batch_size: int, num_workers: int) -> dict[Path, str]:
    """Run the backbone over `files` (path, digest) into `cache`; the unreadable ones' reasons."""
    failures: dict[Path, str] = {}
    if not files:
        return failures
    batches = backbone_features(model, [p for p, _ in files], preprocessing, device, precision, batch_size,
                                num_workers)
    with tqdm(total=len(files), desc="extracting features", unit="img") as bar:
        for indices, features, failed in batches:
            for i, reason in failed:
                failures[files[i][0]] = reason
            if features is not None:
                cache.add({files[i][1]: feature for i, feature in zip(indices, features)})
            bar.update(len(indices) + len(failed))
    return failures


def _merge_parts(cache: FeatureCache, failures: dict[Path, str], group: Group) -> dict[Path, str]:
    """Once every rank is done (gather is a barrier), rank 0 adds every part cache it finds
    (a killed run's too) to its cache and removes them, and collects every rank's failures."""
    gathered = group.gather({str(p): reason for p, reason in failures.items()})
    if not group.is_main:
        return failures
    for folder in sorted(cache.folder.parent.glob(f"{cache.key}.part*-of-*")):
        with FeatureCache(folder.parent, folder.name) as part:
            cache.add(part.features)
        shutil.rmtree(folder)
    return {Path(p): reason for failed in gathered for p, reason in failed.items()}
