"""What decides a training run's result, and whether an output directory already holds it.

A rerun of train.py with the same data (by content), backbone weights and config would write
the same model again; instead it says so and stops. Kept free of torch and timm imports so
that this check costs well under a second. The photos it reads and hashes are handed to the run
(Job.photos), which reads each photo's content no second time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import UserError, __version__, config
from ..data import ImageFolder, file_digest, read_image_folder
from ..artifact import read_metadata
from ..fileio import in_transition
from ..registry import BackboneSpec, WeightsError, get_spec


def weights_identity(spec: BackboneSpec, weights: Path | None) -> str | None:
    """The weights file's content digest; for hub weights, the cached blob's name (the hub
    names blobs by their content hash). None when the weights are not on disk yet."""
    if weights:
        return file_digest(weights) if Path(weights).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.hub_id, config.HUB_WEIGHTS_FILE)
    return f"hub:{Path(cached).resolve().name}" if isinstance(cached, str) else None


@dataclass
class Fingerprint:
    value: str | None  # None when it cannot be told without torch: the run then just trains
    photos: ImageFolder | None  # the data folder, read and every file hashed (for the run to reuse)


def training_fingerprint(data_dir: Path, cfg: config.TrainConfig, weights: Path | None, device: str) -> Fingerprint:
    """A digest of everything that decides the run's result. Without one to compute (an unknown
    backbone, weights not on disk yet) the photos are not read here: the run reads them, after
    checking the backbone."""
    try:
        # A timm: name as written, without timm (it imports torch): with no --weights and no
        # pretrained tag in the name, the cache lookup misses and the run just trains.
        spec = get_spec(cfg.backbone, resolve_tag=False)
    except WeightsError:
        return Fingerprint(None, None)
    weights_id = weights_identity(spec, weights)
    if weights_id is None:
        return Fingerprint(None, None)
    photos = read_image_folder(data_dir)
    identity = {
        "package": __version__,
        "backbone": [spec.architecture, spec.model_kwargs, weights_id],
        "config": asdict(cfg),
        "device": device,
        "classes": photos.class_names,
        "files": [[str(s.path.relative_to(photos.root)), s.label, digest]
                  for s, digest in zip(photos.samples, photos.digests)],
        # The audit's content, not only its name: a new audit of the same folder is a new run.
        "exclude": file_digest(Path(cfg.exclude)) if cfg.exclude and Path(cfg.exclude).is_file() else None,
    }
    return Fingerprint(hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(), photos)


def up_to_date(output_dir: Path, fingerprint: str | None) -> bool:
    """True when every output exists and the artifact was trained from exactly these inputs."""
    output_dir = Path(output_dir)
    outputs = (*config.SERVED_FILES, config.METRICS_FILE, config.SPLIT_FILE, config.HISTORY_PLOT)
    if fingerprint is None or in_transition(output_dir) or not all((output_dir / name).is_file() for name in outputs):
        return False
    try:
        metadata = read_metadata(output_dir / config.ARTIFACT_FILE)  # the header alone, without torch
    except UserError:
        return False
    return metadata.get("training", {}).get("fingerprint") == fingerprint
