"""The backbone as an exported OpenVINO model: what the CPU service runs, without torch.

    python -m vehicle_classifier.export --model-dir models/    # for an artifact trained before

Training writes it beside model.safetensors, in the same transaction (config.EXPORT_FILES). The
graph takes the centre crops as they are (uint8, NHWC) and normalises them itself (OpenVINO's
preprocessing, folded into the graph), and returns the [CLS] feature and, for a ViT, the last
block's [CLS] attention map: one forward answers with or without ?attention=1. The head, the
calibration and the "neither" check are a few small matmuls on the artifact's own tensors,
done by the predictor in numpy. The graph records the artifact's model_version, so a service
never pairs it with another model.

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


def _with_attention(backbone: nn.Module) -> nn.Module:
    """`backbone` returning its features and the [CLS] attention map from one forward
    (backbone.cls_attention). torch and timm are imported here, not at the top, so that
    `--help` answers at once (they take ~4 s to import)."""
    from torch import nn

    from .backbone import cls_attention

    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone

        def forward(self, images):
            return cls_attention(self.backbone, images)

    return WithAttention()


def to_openvino(backbone: nn.Module, input_size: int, preprocessing: dict | None = None, attention: bool = False):
    """The backbone converted to an `openvino.Model`: float NCHW input (as training feeds it), or
    with `preprocessing` uint8 NHWC crops normalised in the graph; outputs FEATURES and, with
    `attention`, ATTENTION. Traced here rather than by OpenVINO, to skip the trace check (a
    second forward and comparison, ~1 s); tracing and converting start no OpenVINO threads."""
    import torch

    ov = import_openvino()
    module = _with_attention(backbone.eval()) if attention else backbone.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns about timm's shape asserts, which hold for the one input size we serve.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(module, example, check_trace=False)
        model = ov.convert_model(traced, example_input=example)
    for output, name in zip(model.outputs, (FEATURES, ATTENTION)):
        output.set_names({name})
    return _with_preprocessing(model, preprocessing) if preprocessing else model


def _with_preprocessing(model, preprocessing: dict):
    """uint8 NHWC in; (x - 255 mean) / (255 std) in float32, as images.preprocess computes it."""
    ov = import_openvino()
    from openvino.preprocess import PrePostProcessor

    steps = PrePostProcessor(model)
    steps.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    steps.input().model().set_layout(ov.Layout("NCHW"))
    steps.input().preprocess().convert_element_type(ov.Type.f32) \
        .mean([255 * m for m in preprocessing["mean"]]).scale([255 * s for s in preprocessing["std"]])
    return steps.build()


def exported_graph(backbone: nn.Module, preprocessing: dict):
    """The graph the service runs: uint8 NHWC crops in, features (and a ViT's attention) out."""
    from .backbone import has_cls_attention

    return to_openvino(backbone, preprocessing["input_size"], preprocessing, attention=has_cls_attention(backbone))


def export_files(backbone: nn.Module, metadata: dict, graphs: tuple | None = None) -> dict[str, bytes]:
    """The exported model's files (config.EXPORT_FILES) for the artifact with this `metadata`
    (as stored: with its model_version), as bytes to publish with the artifact. `graphs`:
    (float graph, its int8 copy or None) made already (training measures them before it
    publishes); with an int8 copy, its files (config.INT8_FILES) too."""
    graph, quantized = graphs or (exported_graph(backbone, metadata["preprocessing"]), None)
    files = {}
    for model, names in ((graph, config.EXPORT_FILES), (quantized, config.INT8_FILES)):
        if model is not None:
            model.set_rt_info(metadata["model_version"], RT_INFO_VERSION)
            files.update(_saved(model, names))
    return files


def _saved(graph, names: tuple[str, str]) -> dict[str, bytes]:
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
        publish(model_dir, export_files(model.backbone, model.metadata))
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
