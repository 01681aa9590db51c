"""What a run publishes: the artifact, the backbone and head exported for OpenVINO, metrics.json,
split.json and the plots, rendered in memory and then published into the output folder as one
set (fileio.publish: all of them or none)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .. import config
from ..artifact import encode_artifact
from ..export import export_files
from ..fileio import json_bytes, publish
from ..head import MLPHead
from .metrics import confusion_matrix_png, learning_curves_png


def publish_outputs(output_dir: Path, backbone: nn.Module, head: MLPHead, artifact_metadata: dict, split_doc: dict,
                    metrics_doc: dict, extra_tensors: dict | None = None, extra_files: dict | None = None,
                    graphs: tuple | None = None) -> str:
    """Render every output in memory, then publish them as one set; metrics.json and split.json
    carry the artifact's model_version, so a reader can tell they belong to it. `graphs`: the
    exported graphs made already (export.export_files). Returns the model_version."""
    artifact, stored = encode_artifact(backbone, head, artifact_metadata, extra_tensors)
    version = stored["model_version"]
    files = {
        config.ARTIFACT_FILE: artifact,
        **export_files(backbone, head, stored, graphs),  # what the CPU service runs, without torch
        config.METRICS_FILE: json_bytes({"model_version": version, **metrics_doc}),
        config.SPLIT_FILE: json_bytes({"model_version": version, **split_doc}),
        config.HISTORY_PLOT: learning_curves_png(metrics_doc["history"], metrics_doc["summary"]["best_epoch"]),
    }
    if metrics_doc["test"]["count"]:
        files[config.CONFUSION_PLOT] = confusion_matrix_png(
            metrics_doc["test"]["confusion_matrix"], artifact_metadata["class_names"], "test split")
    files.update(extra_files or {})
    publish(output_dir, files, replaces=config.OUTPUT_FILES)
    return version
