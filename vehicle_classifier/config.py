"""Defaults in one place: paths, training hyperparameters, image limits and service settings.

Entry scripts take their flag defaults from here; the service (app and gunicorn.conf.py) reads
its settings from the environment through `ServiceConfig.from_env`, the one list of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import UserError

# --- paths ----------------------------------------------------------------------------------
DATA_DIR = Path("data/Car-Bike-Dataset")
# The public Kaggle data set that DATA_DIR holds, fetched by train.py when DATA_DIR is missing
# (training/fetch.py, through kagglehub: its cache, KAGGLEHUB_CACHE and proxies apply). The
# version is pinned: the same photos for every user, and a cached copy is found offline.
KAGGLE_DATASET = "utkarshsaxenadn/car-vs-bike-classification-dataset"
KAGGLE_VERSION = 1
KAGGLE_CLASSES = ("Bike", "Car")  # the class folders inside the download (its Car-Bike-Dataset/)
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
# The backbone exported for OpenVINO (export.py): what the CPU service runs, without torch.
EXPORT_FILES = ("backbone.xml", "backbone.bin")
# The head (head.MLPHead) converted for OpenVINO: what every path answering from features runs.
HEAD_FILES = ("head.xml", "head.bin")
# The backbone's graph quantized to int8 post-training (export.quantize, NNCF), calibrated on
# INT8_CALIBRATION_CROPS centre crops of the training photos; served as precision int8.
INT8_FILES = ("backbone-int8.xml", "backbone-int8.bin")
INT8_CALIBRATION_CROPS = 50  # NNCF on ViT-S/16, 2-core EPYC: 22.7 s with 100 crops, 10.2 s with 32
# The fidelity gate: 'auto' serves int8 only when the head's top-1 answers through the int8
# graph agree with fp32 on at least this share of the validation photos (metrics.json "int8").
INT8_MIN_AGREEMENT = 0.995
# What the CPU service reads from a model folder (and INT8_FILES where training wrote them).
SERVED_FILES = (ARTIFACT_FILE, *EXPORT_FILES, *HEAD_FILES)
# One training run's outputs: published together, as one set (fileio.publish).
OUTPUT_FILES = (ARTIFACT_FILE, *EXPORT_FILES, *HEAD_FILES, *INT8_FILES, METRICS_FILE, SPLIT_FILE, HISTORY_PLOT, CONFUSION_PLOT, RELIABILITY_PLOT)
ARTIFACT_METADATA_KEY = "vehicle_classifier"  # the artifact header entry holding its JSON metadata

# --- backbones (the registry itself: registry.py) -----------------------------------------
HUB_WEIGHTS_FILE = "model.safetensors"  # timm's weights file in each hub repository
HUB_TIMEOUT = 3.0  # seconds the hub may take to answer before it counts as unreachable


# --- "neither a car nor a bike" and calibration (ood.py, training.calibrate) -----------
OOD_NEIGHBOURS = 5  # the score: mean cosine distance to this many nearest training features
OOD_MAX_REFERENCES = 1024  # training features kept in the artifact (1024 x 1280 float16: 2.6 MB)
CALIBRATION_BINS = 15  # confidence bins of the expected calibration error and reliability diagram
CALIBRATION_FOLDS = 5  # heads trained for the out-of-fold logits (calibration "out-of-fold")
# Where the temperature is fitted (TrainConfig.calibration): out-of-fold logits of train+val (the
# default: 18% lower held-out log-loss, for CALIBRATION_FOLDS more heads to train, +2.4 s on a
# 600-photo --force run on 2 cores), or the kept head's validation logits (free, but few; they
# also chose its epoch): docs/training.md, "Calibration".
CALIBRATIONS = ("out-of-fold", "val")

# --- the data audit (python -m vehicle_classifier.audit) ------------------------------------
AUDIT_DIR = Path("audit")
AUDIT_FILE = "audit.json"  # label_issues, near_duplicates, outliers
AUDIT_SHEET = "audit.png"  # the top suspects, captioned
# Two photos are near-duplicates (audit/duplicates.py) when their perceptual hashes lie within
# this distance (0: the same, ~0.5: unrelated; planted altered copies measured 0.05-0.21) and
# their aligned thumbnails correlate at least this well (copies 0.975-0.999, different cars
# photographed alike on white up to 0.935).
DUPLICATE_HASH_DISTANCE = 0.30
DUPLICATE_MIN_CORRELATION = 0.96

# --- data -----------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Pixel limit checked from the header, before decoding: a 48 MP phone photo passes, a
# decompression bomb does not.
MAX_IMAGE_PIXELS = 64_000_000

# --- allowed values, each list once (the first entry is the default) -----------------------
PRECISIONS = ("auto", "bf16", "fp32", "int8")  # auto: int8/bf16 where the hardware runs it natively (runtime.py)
RUNTIMES = ("auto", "openvino", "torch")  # auto: openvino on cpu, torch elsewhere
# OpenVINO: "throughput" runs one stream per core (two requests' forwards at once, ~1.3x the
# requests/s under load); "latency" one stream over all cores (a lone request ~1.4x sooner);
# "adaptive" the latter while a forward runs alone, the former when they overlap.
OPENVINO_MODES = ("adaptive", "throughput", "latency")
OOD_CHECKS = ("on", "off")  # on: answers say whether a photo is like the training photos
DEVICES = ("cpu", "cuda")  # the service's device; cuda: torch on the current GPU, opt-in


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
    extract_batch_size: int = 0  # 0: the forward's preferred batch, fitted to a GPU's memory (preferred_batch)
    precision: str = PRECISIONS[0]
    # "Neither": the share of validation photos the out-of-distribution threshold accepts, and
    # the images that are neither class whose flagged share metrics.json reports.
    ood_acceptance: float = 0.975
    neither_dir: str = str(NEITHER_DIR)
    calibration: str = CALIBRATIONS[0]
    # An audit.json (python -m vehicle_classifier.audit) whose flagged photos are left out; "": none.
    exclude: str = ""

    def __post_init__(self):
        # Checked at once, before any work (the other settings' values are checked where they are
        # used, or by train.py's choices).
        if not 0 < self.ood_acceptance <= 1:
            raise UserError(f"the share of validation photos the 'neither' threshold accepts must be in (0, 1], "
                            f"not {self.ood_acceptance}", setting="ood_acceptance")


# --- service --------------------------------------------------------------------------------
# Where the service listens (gunicorn, through gunicorn.conf.py's bind; the development server) and
# the client looks. The Makefile, scripts, Dockerfiles, compose and k8s files cannot import it:
# they say 9696 themselves (tests/test_k8s.py checks the manifests against it).
DEFAULT_PORT = 9696
# Requests waiting together share one forward of up to this many images (a batch per OpenVINO
# stream). On one stream over both cores ViT-S/16 bf16 costs 33 ms alone and 25-28 ms per image
# at batch 2-8, more again at 16; on one stream per core batching changes little.
FORWARD_BATCH = 8
# On CUDA (DEVICE=cuda) a small batch's forward is bound by kernel launches, not arithmetic: at
# the ~18,000 img/s issue #11 measured for ViT-S/16 bf16 on an H100 (batch 256), 64 images are
# ~3.5 ms of arithmetic, of the order of an eager forward's launches alone (an estimate, not
# measured here: this project had no GPU). So a forward takes up to 64 of the images waiting
# (none waits for a batch to fill); the cap bounds one forward's activation memory per worker,
# which matters with several workers or large backbones on one GPU.
FORWARD_BATCH_CUDA = 64
# Memory: an image costs ~4 bytes per decoded pixel while it is decoded and converted (up to
# ~12 with transparency). JPEGs decode at the smallest DCT scale that still covers the resize
# (a 48 MP photo decodes to under 1 MP); other formats decode at full size. Decoded pixels are
# bounded per request (CPU time and memory of one request: a request's images decode one at
# a time, each dropped once it is a tensor) and per worker (images decoding at once in all
# of its request threads; a thread waits until its image fits).
MAX_REQUEST_PIXELS = 64_000_000
MAX_WORKER_DECODE_PIXELS = 2 * MAX_REQUEST_PIXELS


def _whole_number(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be at least 1, not {number}")
    return number


def _choice(choices: tuple[str, ...]):
    def parse(name: str, value: str) -> str:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        return value

    return parse


def _megabytes(name: str, value: str) -> int:
    return _whole_number(name, value) * 1024 * 1024


@dataclass(frozen=True)
class ServiceConfig:
    """Every service setting, read from the environment and checked here, once
    (`from_env`): the app (create_app) and gunicorn.conf.py both take theirs from it."""

    model_dir: Path = OUTPUT_DIR
    max_upload_bytes: int = 20 * 1024 * 1024
    max_batch_files: int = 16
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_request_pixels: int = MAX_REQUEST_PIXELS
    max_worker_decode_pixels: int = MAX_WORKER_DECODE_PIXELS
    precision: str = PRECISIONS[0]
    runtime: str = RUNTIMES[0]
    openvino_mode: str = OPENVINO_MODES[0]
    device: str = DEVICES[0]
    # Seconds an upload may take to arrive, whole: a trickling or stalled client is cut off
    # (408) instead of holding a request thread.
    upload_timeout: int = 10
    # Whether answers say if the photo is like the training photos ("in_distribution"); off,
    # both fields are null and the label stands alone.
    ood_check: bool = True
    # gunicorn (gunicorn.conf.py); torch_threads 0: the cores divided among the workers.
    bind: str = f"0.0.0.0:{DEFAULT_PORT}"  # --bind on the command line wins
    pidfile: str | None = None  # where gunicorn writes the master's PID (make run: gunicorn.pid, for make reload)
    accesslog: str | None = None  # e.g. "-" for stdout; off by default
    workers: int = 1
    threads: int = 6
    timeout: int = 60
    backlog: int = 256
    torch_threads: int = 0

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "ServiceConfig":
        """Settings from `environ` (default os.environ); a bad value raises ValueError naming
        the variable, in one line."""
        environ = os.environ if environ is None else environ
        values = {}
        for variable, (field_name, parse) in ENVIRONMENT.items():
            raw = environ.get(variable, "").strip()
            if raw:
                values[field_name] = parse(variable, raw)
        return cls(**values)


# Environment variable -> (ServiceConfig field, parser): the one list of service settings.
ENVIRONMENT = {
    "MODEL_DIR": ("model_dir", lambda _name, value: Path(value)),
    "MAX_UPLOAD_MB": ("max_upload_bytes", _megabytes),
    "MAX_BATCH_FILES": ("max_batch_files", _whole_number),
    "MAX_IMAGE_PIXELS": ("max_image_pixels", _whole_number),
    "MAX_REQUEST_PIXELS": ("max_request_pixels", _whole_number),
    "MAX_WORKER_DECODE_PIXELS": ("max_worker_decode_pixels", _whole_number),
    "PRECISION": ("precision", _choice(PRECISIONS)),
    "RUNTIME": ("runtime", _choice(RUNTIMES)),
    "OPENVINO_MODE": ("openvino_mode", _choice(OPENVINO_MODES)),
    "DEVICE": ("device", _choice(DEVICES)),
    "UPLOAD_TIMEOUT": ("upload_timeout", _whole_number),
    "OOD_CHECK": ("ood_check", lambda name, value: _choice(OOD_CHECKS)(name, value) == "on"),
    "GUNICORN_BIND": ("bind", lambda _name, value: value),
    "GUNICORN_PIDFILE": ("pidfile", lambda _name, value: value),
    "GUNICORN_ACCESSLOG": ("accesslog", lambda _name, value: value),
    "GUNICORN_WORKERS": ("workers", _whole_number),
    "GUNICORN_THREADS": ("threads", _whole_number),
    "GUNICORN_TIMEOUT": ("timeout", _whole_number),
    "GUNICORN_BACKLOG": ("backlog", _whole_number),
    "TORCH_THREADS": ("torch_threads", _whole_number),
}
