"""What decides a training run's result, and whether an output directory already holds it.

A rerun of train.py with the same data (by content), backbone weights and config would write
the same model again; instead it says so and stops. Kept free of torch and timm imports so
that this check costs well under a second.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from .. import __version__, config
from ..data import file_digest, scan_image_folder
from ..fileio import in_transition, read_safetensors_metadata


def weights_identity(spec: config.BackboneSpec, weights: Path | None) -> str | None:
    """The weights file's content digest; for hub weights, the cached blob's name (the hub
    names blobs by their content hash). None when the weights are not on disk yet."""
    if weights:
        return file_digest(weights) if Path(weights).is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.hub_id, config.HUB_WEIGHTS_FILE)
    return f"hub:{Path(cached).resolve().name}" if isinstance(cached, str) else None


def training_fingerprint(data_dir: Path, cfg: config.TrainConfig, weights: Path | None, device: str) -> str | None:
    spec = config.BACKBONES.get(cfg.backbone)
    if spec is None and cfg.backbone.startswith(config.TIMM_PREFIX):
        # Without timm's registry (it imports torch): the name as given. With no --weights and no
        # pretrained tag in the name, the cache lookup below misses and the run just trains.
        spec = config.BackboneSpec(cfg.backbone, cfg.backbone.removeprefix(config.TIMM_PREFIX))
    if spec is None:
        return None
    weights_id = weights_identity(spec, weights)
    if weights_id is None:
        return None
    class_names, samples = scan_image_folder(data_dir)
    identity = {
        "package": __version__,
        "backbone": [spec.architecture, spec.model_kwargs, weights_id],
        "config": asdict(cfg),
        "device": device,
        "classes": class_names,
        "files": [[str(s.path.relative_to(data_dir)), s.label, file_digest(s.path)] for s in samples],
        # The audit's content, not only its name: a new audit of the same folder is a new run.
        "exclude": file_digest(Path(cfg.exclude)) if cfg.exclude and Path(cfg.exclude).is_file() else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def up_to_date(output_dir: Path, fingerprint: str | None) -> bool:
    """True when every output exists and the artifact was trained from exactly these inputs."""
    output_dir = Path(output_dir)
    outputs = (config.ARTIFACT_FILE, config.METRICS_FILE, config.SPLIT_FILE, config.HISTORY_PLOT)
    if fingerprint is None or in_transition(output_dir) or not all((output_dir / name).is_file() for name in outputs):
        return False
    try:
        metadata = json.loads(read_safetensors_metadata(output_dir / config.ARTIFACT_FILE)[config.ARTIFACT_METADATA_KEY])
    except (OSError, ValueError, KeyError):
        return False
    return metadata.get("training", {}).get("fingerprint") == fingerprint
