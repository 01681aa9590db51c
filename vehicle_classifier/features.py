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
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import PRECISIONS
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


# --- extraction -----------------------------------------------------------------------------
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


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    paths: list[Path],
    digests: list[str],
    preprocessing: dict,
    cache: FeatureCache,
    device: torch.device,
    precision: str,
    batch_size: int = 16,
    num_workers: int = 1,
) -> tuple[dict[str, torch.Tensor], dict[Path, str]]:
    """Features for every readable file (by digest) and the reason each unreadable one failed.
    Only files whose digest is not in the cache (an open FeatureCache) are decoded and run
    through the backbone; each batch's features are persisted as soon as they are computed."""
    todo = [i for i, d in enumerate(digests) if d not in cache.features]
    failures: dict[Path, str] = {}
    if todo:
        loader = DataLoader(
            _ImageFiles([paths[i] for i in todo], preprocessing),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        batches = iter(loader)  # its worker process forks before OpenVINO starts threads
        with tqdm(total=len(todo), desc="extracting features", unit="img") as bar:

            def readable_batches():
                for indices, batch, failed in batches:
                    for i, reason in failed:
                        failures[paths[todo[i]]] = reason
                    bar.update(len(failed))
                    if batch is not None:
                        yield indices, batch

            if runtime_for(device) == "openvino":
                results = OpenVINOBackbone(model, preprocessing["input_size"], precision, mode="throughput").map(
                    readable_batches())
            else:
                model = model.to(device)

                def forward(indices, batch):
                    with autocast(device, precision):
                        return indices, model(batch.to(device)).float().cpu()

                results = (forward(indices, batch) for indices, batch in readable_batches())
            for indices, features in results:
                cache.add({digests[todo[i]]: feature for i, feature in zip(indices, features)})
                bar.update(len(indices))
    found = {d: cache.features[d] for d in digests if d in cache.features}
    return found, failures
