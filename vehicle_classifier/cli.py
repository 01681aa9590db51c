"""The command-line flags that train.py, batch prediction and the audit share, defined once:
each flag is its setting's name with dashes, its allowed values come from config.py, and its
help says what the setting does. A command adds the ones it takes with `add_flags`."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import config, registry

_PRECISION_HELP = ("backbone precision: " + ", ".join(config.PRECISIONS) + " (auto: int8 where the CPU has int8 dot "
                   "products and training's int8 fidelity gate held, else bf16 where the hardware has it, else fp32; "
                   "training's features come from the float graph, the gate measures int8)")

SHARED = {
    "data_dir": dict(type=Path, default=config.DATA_DIR, help="image folder, one sub-folder per class"),
    "weights": dict(type=Path, default=None,
                    help="backbone weights file: the official DINO/DINOv2/DINOv3 .pth (e.g. "
                         "dino_deitsmall16_pretrain.pth) or timm .safetensors/.pth; default: the Hugging Face "
                         "cache, then a hub download"),
    "cache_dir": dict(type=Path, default=config.FEATURE_CACHE_DIR,
                      help="feature cache directory (shared by train.py and the audit)"),
    "device": dict(default="auto", help="auto (CUDA when available), cpu or cuda[:N]"),
    "precision": dict(default=config.PRECISIONS[0], choices=list(config.PRECISIONS), help=_PRECISION_HELP),
    "backbone": dict(default=config.TrainConfig().backbone,
                     help=f"one of {', '.join(registry.BACKBONES)} (DINO ViTs; DINOv2 ViT-S/14, B/14, -reg: with "
                          f"registers; DINOv3 ViT-S/16, S+/16, B/16, ConvNeXt: costs and quality in "
                          f"docs/backbones.md), or {registry.TIMM_PREFIX}<model name> for any timm model (e.g. "
                          f"{registry.TIMM_PREFIX}tf_efficientnet_lite0)"),
    "extract_batch_size": dict(type=int, default=config.TrainConfig().extract_batch_size,
                               help="images per backbone batch (0: fitted to the device, 16 on CPU)"),
}


def add_flags(parser: argparse.ArgumentParser, *names: str, **defaults) -> None:
    """Add the shared flags `names` to `parser`; `defaults` overrides a flag's default."""
    for name in names:
        spec = dict(SHARED[name])
        if name in defaults:
            spec["default"] = defaults[name]
        parser.add_argument(f"--{name.replace('_', '-')}", **spec)


def help_of(name: str) -> str:
    return SHARED[name]["help"]
