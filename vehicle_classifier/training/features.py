"""[CLS] features of the frozen backbone: the fastest faithful precision, batched extraction, and
an on-disk cache so that a rerun never runs the backbone for a file it has seen.

The forward is the run's one forward (torch_forward.forward_for): on CPU the exported graph
through OpenVINO (runtime.py: ~1.4x torch's bf16 when batches are fed to both cores at once),
the very graph the run publishes and the service runs; on CUDA backbone.OnCrops through torch. The cache is keyed by backbone architecture +
weights digest + preprocessing + precision + runtime (one folder per key) and, inside it, by each
image file's content hash: renaming a file costs nothing, a changed or added file is the only
one recomputed. Features are persisted batch by batch, so an interrupted run loses nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from ..distributed import SINGLE, Group, part_suffix
from ..extraction import backbone_features, decode_workers
from ..fileio import WriteError, clean_temporaries, exclusive, write_file
from ..images import DECODER_VERSION

log = logging.getLogger(__name__)


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
            stack.enter_context(exclusive(self.folder, "feature cache folder", wait=True, setting="cache_dir"))
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


def extract_features(
    forward,
    paths: list[Path],
    digests: list[str],
    preprocessing: dict,
    cache: FeatureCache,
    batch_size: int = 0,
    num_workers: int | None = None,
    group: Group = SINGLE,
    desc: str = "extracting features",
) -> tuple[dict[str, torch.Tensor], dict[Path, str]]:
    """Features for every readable file (by digest) and the reason each unreadable one failed.
    Only files whose digest is not in the cache (an open FeatureCache) are decoded and run
    through `forward` (the run's one forward: torch_forward.forward_for); each batch's features
    are persisted as soon as they are computed.

    Under torchrun, rank 0 passes the cache and every other rank its own part cache
    (part_cache): the files rank 0's cache lacks are sharded by rank, each rank extracts its
    share into the cache it holds, and rank 0 then merges the parts into its cache."""
    todo = group.broadcast([i for i, d in enumerate(digests) if d not in cache.features])
    num_workers = decode_workers(forward.device, group.local_world_size) if num_workers is None else num_workers
    mine = [(paths[i], digests[i]) for i in group.shard(todo) if digests[i] not in cache.features]
    failures = _extract_into(cache, forward, mine, preprocessing, batch_size, num_workers, desc)
    if group.distributed:
        failures = _merge_parts(cache, failures, group)
    found = {d: cache.features[d] for d in digests if d in cache.features}
    return found, failures


def part_cache(cache_dir: Path, key: str, group: Group) -> FeatureCache:
    """A torchrun rank's own cache for its share of the features (merged by rank 0)."""
    return FeatureCache(cache_dir, key + part_suffix(group))


def _extract_into(cache: FeatureCache, forward, files: list[tuple[Path, str]], preprocessing: dict,
                  batch_size: int, num_workers: int, desc: str = "extracting features") -> dict[Path, str]:
    """Run `forward` over `files` (path, digest) into `cache`, under a progress bar named
    `desc`; the unreadable ones' reasons."""
    failures: dict[Path, str] = {}
    if not files:
        return failures
    batches = backbone_features(forward, [p for p, _ in files], preprocessing, batch_size, num_workers)
    with tqdm(total=len(files), desc=desc, unit="img") as bar:
        for indices, features, failed in batches:
            for i, reason in failed:
                failures[files[i][0]] = reason
            if features is not None:
                cache.add({files[i][1]: torch.from_numpy(feature) for i, feature in zip(indices, features)})
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
