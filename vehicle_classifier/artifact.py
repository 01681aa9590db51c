"""The self-contained model artifact: one safetensors file holding the backbone and head weights,
with the JSON metadata (classes, backbone, preprocessing, training config, metrics, version) in
its header. Serving needs nothing else and no network; the file is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from . import UserError, __version__, config
from .backbone import build_loaded
from .fileio import read_safetensors_metadata, write_file
from .head import MLPHead

FORMAT_VERSION = 1
OOD_REFERENCES = "ood.references"  # the training features that 'neither' scores are measured against


class ArtifactError(UserError):
    """The artifact is missing, damaged or of another format; the message says which."""


@dataclass
class Model:
    backbone: nn.Module
    head: MLPHead
    metadata: dict
    ood_references: torch.Tensor | None = None  # absent in artifacts trained without a validation split

    @property
    def class_names(self) -> list[str]:
        return self.metadata["class_names"]

    @property
    def preprocessing(self) -> dict:
        return self.metadata["preprocessing"]


def save_artifact(path: Path, backbone: nn.Module, head: MLPHead, metadata: dict,
                  extra_tensors: dict[str, torch.Tensor] | None = None) -> dict:
    """Write the artifact; returns the metadata as stored (with version and creation time)."""
    data, metadata = encode_artifact(backbone, head, metadata, extra_tensors)
    write_file(path, data)
    return metadata


def encode_artifact(backbone: nn.Module, head: MLPHead, metadata: dict,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> tuple[bytes, dict]:
    """The artifact file's bytes and the metadata they store (with version and creation time);
    `extra_tensors` (e.g. OOD_REFERENCES) are stored under their own names."""
    tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in head.state_dict().items()})
    tensors.update(extra_tensors or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        **metadata,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_version": _version(tensors),
        "head": head.config,
    }
    return save(tensors, metadata={config.ARTIFACT_METADATA_KEY: json.dumps(metadata)}), metadata


def _version(tensors: dict[str, torch.Tensor]) -> str:
    """The model version: a digest of every tensor, so that loading can tell a damaged file."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode() + tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def read_metadata(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no model artifact at {path}; train one with: python train.py --output-dir {path.parent}")
    try:
        metadata = json.loads(read_safetensors_metadata(path)[config.ARTIFACT_METADATA_KEY])
    except Exception as exc:
        raise ArtifactError(f"{path} is not a readable model artifact ({type(exc).__name__}: {exc})") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format {metadata.get('format_version')}, expected {FORMAT_VERSION}")
    return metadata


def load_artifact(path: Path) -> Model:
    """Rebuild backbone and head from the artifact alone, loading every weight strictly."""
    metadata = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if _version(tensors) != metadata["model_version"]:
            raise ValueError("its weights do not match the checksum it was saved with")
        spec = metadata["backbone"]
        backbone = build_loaded(spec["architecture"], spec.get("model_kwargs"),
                                {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}, str(path))
        head = MLPHead(**metadata["head"]).eval()
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")}, strict=True)
    except Exception as exc:
        raise ArtifactError(f"{path} is damaged or incomplete ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return Model(backbone=backbone, head=head, metadata=metadata, ood_references=tensors.get(OOD_REFERENCES))
