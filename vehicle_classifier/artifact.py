"""The self-contained model artifact: one safetensors file holding the backbone and head weights,
with the JSON metadata (classes, backbone, preprocessing, training config, metrics, version) in
its header. Serving needs nothing else and no network; the file is replaced atomically.

Reading the metadata and the small tensors (the head, the "neither" references) needs numpy
alone: the torch-free CPU service (model/predictor.py) reads those, and the fingerprint check
reads the header before torch is imported. Rebuilding the torch modules (`load_artifact`) and
writing an artifact (`encode_artifact`) import torch, the backbone and the head when called.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open

from . import UserError, __version__, config
from .fileio import write_file

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT_VERSION = 1
OOD_REFERENCES = "ood.references"  # the training features that 'neither' scores are measured against
BACKBONE, HEAD = "backbone.", "head."  # prefixes of the two modules' tensors


class ArtifactError(UserError):
    """The artifact is missing, damaged or of another format; the message says which."""


class Described:
    """What an artifact's `metadata` says of its model."""

    metadata: dict

    @property
    def class_names(self) -> list[str]:
        return self.metadata["class_names"]

    @property
    def preprocessing(self) -> dict:
        return self.metadata["preprocessing"]


@dataclass
class Model(Described):
    """The artifact as torch modules (training, batch prediction, the service's torch paths)."""

    backbone: nn.Module
    head: nn.Module
    metadata: dict
    ood_references: torch.Tensor | None = None  # absent in artifacts trained without a validation split


def save_artifact(path: Path, backbone: nn.Module, head: nn.Module, metadata: dict,
                  extra_tensors: dict[str, torch.Tensor] | None = None) -> dict:
    """Write the artifact; returns the metadata as stored (with version and creation time)."""
    data, metadata = encode_artifact(backbone, head, metadata, extra_tensors)
    write_file(path, data)
    return metadata


def encode_artifact(backbone: nn.Module, head: nn.Module, metadata: dict,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> tuple[bytes, dict]:
    """The artifact file's bytes and the metadata they store (with version and creation time);
    `extra_tensors` (e.g. OOD_REFERENCES) are stored under their own names."""
    from safetensors.torch import save

    tensors = {f"{BACKBONE}{k}": v for k, v in backbone.state_dict().items()}
    tensors.update({f"{HEAD}{k}": v for k, v in head.state_dict().items()})
    tensors.update(extra_tensors or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        **metadata,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_version": _version({k: v.numpy() for k, v in tensors.items()}),
        "head": head.config,
    }
    return save(tensors, metadata={config.ARTIFACT_METADATA_KEY: json.dumps(metadata)}), metadata


def _version(tensors: dict[str, np.ndarray]) -> str:
    """The model version: a digest of every tensor, so that loading can tell a damaged file."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode() + np.ascontiguousarray(tensors[key]).tobytes())
    return digest.hexdigest()[:12]


def read_metadata(path: Path) -> dict:
    """The artifact's metadata, from the file's header alone (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no model artifact at {path}; train one with: python train.py --output-dir {path.parent}")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = json.loads(f.metadata()[config.ARTIFACT_METADATA_KEY])
    except Exception as exc:  # not safetensors at all, or cut short: its header no longer covers the file
        raise ArtifactError(f"{path} is not a readable model artifact: damaged or incomplete "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format {metadata.get('format_version')}, expected {FORMAT_VERSION}")
    return metadata


def read_tensors(path: Path, keep=lambda name: True) -> dict[str, np.ndarray]:
    """The artifact's tensors whose names `keep` accepts, as numpy arrays (no torch)."""
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except Exception as exc:
        raise _damaged(path, exc) from None


def load_artifact(path: Path) -> Model:
    """Rebuild backbone and head as torch modules from the artifact alone, loading every weight
    strictly, after checking every tensor against the version it was saved with."""
    import torch

    from .backbone import build_loaded
    from .head import MLPHead

    metadata = read_metadata(path)
    arrays = read_tensors(path)
    try:
        if _version(arrays) != metadata["model_version"]:
            raise ValueError("its weights do not match the checksum it was saved with")
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        spec = metadata["backbone"]
        backbone = build_loaded(spec["architecture"], spec.get("model_kwargs"), _part(tensors, BACKBONE), str(path))
        head = MLPHead(**metadata["head"]).eval()
        head.load_state_dict(_part(tensors, HEAD), strict=True)
    except Exception as exc:
        raise _damaged(path, exc) from None
    return Model(backbone=backbone, head=head, metadata=metadata, ood_references=tensors.get(OOD_REFERENCES))


def _part(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _damaged(path: Path, exc: Exception) -> ArtifactError:
    return ArtifactError(f"{path} is damaged or incomplete ({type(exc).__name__}: {str(exc).splitlines()[0]})")
