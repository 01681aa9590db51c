"""The backbone as an exported OpenVINO model: what the CPU service runs, without torch.

    python -m vehicle_classifier.export --model-dir models/    # for an artifact trained before

Training writes it beside model.safetensors, in the same transaction (config.EXPORT_FILES,
HEAD_FILES). The graph is backbone.OnCrops converted: it takes the centre crops as they are
(uint8, NHWC), normalises them itself, and returns the [CLS] feature and, for a ViT, the last
block's [CLS] attention map: one forward answers with or without ?attention=1. The head is its
own small graph (head.MLPHead converted); the calibration and the "neither" check are done by
the predictor in numpy. Each graph records the artifact's model_version, so a service never
pairs it with another model.

Weights stay float32 in the file (`compress_to_fp16=False`): the service compiles it in the
precision it chooses (bf16 where the CPU has it), exactly as it would the torch model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import UserError, config
from .artifact import load_artifact
from .fileio import exclusive, publish, recover
from .runtime import RT_INFO_VERSION, import_openvino

if TYPE_CHECKING:
    from torch import nn

FEATURES, ATTENTION = "features", "attention"  # the graph's output names
PROG = "python -m vehicle_classifier.export"


def to_openvino(module: nn.Module, example):
    """`module` converted to an `openvino.Model` for inputs like `example`, its outputs named
    FEATURES and ATTENTION (in that order, as many as it has). Traced here rather than by
    OpenVINO, to skip the trace check (a second forward and comparison, ~1 s); tracing and
    converting start no OpenVINO threads. torch is imported here, not at the top, so that
    `--help` answers at once (torch and timm take ~4 s to import)."""
    import torch

    ov = import_openvino()
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about timm's shape asserts, which hold for the one input size we serve.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
        model = ov.convert_model(traced, example_input=example)
    for output, name in zip(model.outputs, (FEATURES, ATTENTION)):
        output.set_names({name})
    return model


def exported_graph(backbone: nn.Module, preprocessing: dict):
    """The one forward on the CPU (backbone.OnCrops, converted): uint8 NHWC centre crops in,
    features (and a ViT's [CLS] attention map) out. Training extracts its features with it,
    then publishes it; batch prediction and the service run it."""
    import torch

    from .backbone import OnCrops, has_cls_attention

    size = preprocessing["input_size"]
    module = OnCrops(backbone.eval(), preprocessing, attention=has_cls_attention(backbone))
    return to_openvino(module, torch.zeros(1, size, size, 3, dtype=torch.uint8))


def head_graph(head: nn.Module):
    """The head (head.MLPHead, in eval mode) converted: features in, logits out. Every path
    that answers from features runs this conversion of training's own module."""
    import torch

    return to_openvino(head.eval(), torch.zeros(1, head.config["in_dim"]))


def export_files(backbone: nn.Module, head: nn.Module, metadata: dict, graphs: tuple | None = None) -> dict[str, bytes]:
    """The exported model's files (config.EXPORT_FILES and HEAD_FILES) for the artifact with
    this `metadata` (as stored: with its model_version), as bytes to publish with the artifact.
    `graphs`: (float graph, its int8 copy or None) made already (training extracts with the
    float one and measures the int8 one before it publishes); with an int8 copy, its files
    (config.INT8_FILES) too."""
    graph, quantized = graphs or (exported_graph(backbone, metadata["preprocessing"]), None)
    files = {}
    for model, names in ((graph, config.EXPORT_FILES), (quantized, config.INT8_FILES), (head_graph(head), config.HEAD_FILES)):
        if model is not None:
            model.set_rt_info(metadata["model_version"], RT_INFO_VERSION)
            files.update(saved_files(model, names))
    return files


def saved_files(graph, names: tuple[str, str]) -> dict[str, bytes]:
    """An openvino.Model as the bytes of its (xml, bin) files."""
    ov = import_openvino()
    with tempfile.TemporaryDirectory() as folder:
        ov.save_model(graph, str(Path(folder) / names[0]), compress_to_fp16=False)
        return {name: (Path(folder) / name).read_bytes() for name in names}


def quantize(graph, calibration: list[np.ndarray], transformer: bool):
    """The graph quantized to int8 post-training by NNCF, its activation ranges measured on the
    `calibration` crops (uint8 HWC, as the service feeds them). A transformer needs NNCF's
    transformer scheme (it keeps softmax and layer norms float); a CNN takes the default.
    nncf is imported here only: the service loads the quantized graph with openvino alone."""
    import nncf

    dataset = nncf.Dataset([crop[None] for crop in calibration])
    options = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    return nncf.quantize(graph, dataset, subset_size=len(calibration), **options)


def export(model_dir: Path) -> Path:
    """Write the exported model beside the artifact in `model_dir`, as one set, under the
    folder's lock (a training run publishing there meanwhile would pair it with another model)."""
    with exclusive(model_dir, "model folder", wait=False):
        recover(model_dir)
        model = load_artifact(model_dir / config.ARTIFACT_FILE)
        publish(model_dir, export_files(model.backbone, model.head, model.metadata))
    return model_dir / config.EXPORT_FILES[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Export a trained artifact's backbone for the torch-free CPU service.")
    parser.add_argument("--model-dir", type=Path, default=config.OUTPUT_DIR,
                        help="folder holding model.safetensors (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = export(args.model_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the export is published as one set: all of it or none
        print(f"interrupted: {args.model_dir} is as it was, or holds the whole export", file=sys.stderr)
        return 130
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
