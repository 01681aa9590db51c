"""Defaults in one place: paths, training hyperparameters, image limits and service settings.

Entry scripts take their flag defaults from here; the service reads its settings from the
environment through `ServiceConfig.from_env`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# --- paths ----------------------------------------------------------------------------------
DATA_DIR = Path("data/Car-Bike-Dataset")
OUTPUT_DIR = Path("models")
FEATURE_CACHE_DIR = Path(".cache/features")
# Images that are neither a car nor a bike (scripts/make_neither_set.py, committed): train.py
# reports how many of them the model flags as out of distribution.
NEITHER_DIR = Path("data/neither")
# Real photos for tests, benchmarks and demos: this workplace keeps them beside the repository.
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "car-bike-sample"

# Files inside an output directory.
ARTIFACT_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.json"
HISTORY_PLOT = "learning_curves.png"
CONFUSION_PLOT = "confusion_matrix.png"
RELIABILITY_PLOT = "reliability.png"
ARTIFACT_METADATA_KEY = "vehicle_classifier"  # the artifact header entry holding its JSON metadata

# --- backbones ------------------------------------------------------------------------------
HUB_WEIGHTS_FILE = "model.safetensors"  # timm's weights file in each hub repository
# `--backbone timm:<model name>`: any timm model (with or without its pretrained tag) besides the
# registry below; backbone.get_spec builds its spec.
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: the timm architecture, where its pretrained weights live, and which file
    the official DINO release calls them."""

    name: str
    architecture: str  # timm name with its pretrained tag: that tag decides the preprocessing
    official_file: str = ""
    model_kwargs: dict = field(default_factory=dict)

    @property
    def hub_id(self) -> str:
        return f"timm/{self.architecture}"


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("dino-vits16", "vit_small_patch16_224.dino", official_file="dino_deitsmall16_pretrain.pth"),
        BackboneSpec("dino-vits8", "vit_small_patch8_224.dino", official_file="dino_deitsmall8_pretrain.pth"),
        BackboneSpec("dino-vitb16", "vit_base_patch16_224.dino", official_file="dino_vitbase16_pretrain.pth"),
        BackboneSpec("dino-vitb8", "vit_base_patch8_224.dino", official_file="dino_vitbase8_pretrain.pth"),
    )
}


# --- "neither a car nor a bike" and calibration (ood.py, training.fit_temperature) -----------
OOD_NEIGHBOURS = 5  # the score: mean cosine distance to this many nearest training features
OOD_MAX_REFERENCES = 1024  # training features kept in the artifact (1024 x 1280 float16: 2.6 MB)
CALIBRATION_BINS = 15  # confidence bins of the expected calibration error and reliability diagram

# --- data -----------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Pixel limit checked from the header, before decoding: a 48 MP phone photo passes, a
# decompression bomb does not.
MAX_IMAGE_PIXELS = 64_000_000


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved into the artifact's metadata."""

    backbone: str = "dino-vits16"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    # Head hyperparameters (chosen by the sweep in notebook.ipynb).
    hidden_dim: int = 256
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 15
    # Feature extraction.
    extract_batch_size: int = 16
    precision: str = "auto"  # auto | bf16 | fp32
    # "Neither": the share of validation photos the out-of-distribution threshold accepts, and
    # the images that are neither class whose flagged share metrics.json reports.
    ood_acceptance: float = 0.975
    neither_dir: str = str(NEITHER_DIR)


# --- service --------------------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be at least 1, not {number}")
    return number


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The variable's value, one of `choices` (the first is the default)."""
    value = os.environ.get(name) or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


# Requests waiting together share one forward of up to this many images (a batch per OpenVINO
# stream). On one stream over both cores ViT-S/16 bf16 costs 33 ms alone and 25-28 ms per image
# at batch 2-8, more again at 16; on one stream per core batching changes little.
FORWARD_BATCH = 8


@dataclass
class ServiceConfig:
    model_dir: Path = OUTPUT_DIR
    max_upload_bytes: int = 20 * 1024 * 1024
    max_batch_files: int = 16
    max_image_pixels: int = MAX_IMAGE_PIXELS
    precision: str = "auto"
    runtime: str = "auto"  # auto (openvino on cpu) | openvino | torch
    # OpenVINO: "throughput" runs one stream per core (two requests' forwards at once, ~1.3x the
    # requests/s under load); "latency" one stream over all cores (a lone request ~1.4x sooner);
    # "adaptive" the latter while a forward runs alone, the former when they overlap.
    openvino_mode: str = "adaptive"
    # Set by gunicorn.conf.py: the app is built in a master that forks its workers, so the model
    # is compiled and warmed up in each worker (post_worker_init), not at load.
    prefork: bool = False
    # Seconds an upload may take to arrive, whole: a trickling or stalled client is cut off
    # (408) instead of holding a request thread.
    upload_timeout: float = 10.0
    # Whether answers say if the photo is like the training photos ("in_distribution"); off,
    # both fields are null and the label stands alone.
    ood_check: bool = True

    @classmethod
    def from_env(cls) -> "ServiceConfig":
        return cls(
            model_dir=Path(os.environ.get("MODEL_DIR", str(OUTPUT_DIR))),
            max_upload_bytes=_env_int("MAX_UPLOAD_MB", 20) * 1024 * 1024,
            max_batch_files=_env_int("MAX_BATCH_FILES", 16),
            max_image_pixels=_env_int("MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS),
            precision=_env_choice("PRECISION", ("auto", "bf16", "fp32")),
            runtime=_env_choice("RUNTIME", ("auto", "openvino", "torch")),
            openvino_mode=_env_choice("OPENVINO_MODE", ("adaptive", "throughput", "latency")),
            prefork=os.environ.get("VEHICLE_CLASSIFIER_PREFORK") == "1",
            upload_timeout=_env_int("UPLOAD_TIMEOUT", 10),
            ood_check=_env_choice("OOD_CHECK", ("on", "off")) == "on",
        )
