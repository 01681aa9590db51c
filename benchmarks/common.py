"""What the benchmarks share (imported by name: a script's own folder is on sys.path): the
sample photos, the ViT-S/16 random-weights artifact, the request photos, the plain-PyTorch fp32
eager baseline, timing helpers, the HTTP client and the /proc readings. The servers themselves
come from harness/ (start_gunicorn, stop, free_port).

The benchmarks touch the package's preprocessing in one place only: `eager_fp32`."""

from __future__ import annotations

import http.client
import io
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from tqdm.auto import tqdm
from urllib3 import encode_multipart_formdata

from harness.live import start_gunicorn
from vehicle_classifier import config
from vehicle_classifier.artifact import load_artifact
from vehicle_classifier.backbone import OnCrops, create_backbone
from vehicle_classifier.model.predictor import Predictor
from vehicle_classifier.registry import get_spec

REPO = Path(__file__).resolve().parents[1]

SAMPLE_DIR = config.SAMPLE_DIR
SHOWN_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8")


# --- the photos and the model ------------------------------------------------------------------
def sample_photos() -> list[Path]:
    photos = sorted(p for d in sorted(SAMPLE_DIR.glob("*/")) for p in d.iterdir() if p.is_file())
    if not photos:
        sys.exit(f"no sample photos at {SAMPLE_DIR}")
    return photos


def training_photos(per_class: int) -> list[Path]:
    """The first `per_class` sample photos of each class: what build_artifact trains the head on."""
    return [p for d in sorted(SAMPLE_DIR.glob("*/")) for p in sorted(q for q in d.iterdir() if q.is_file())[:per_class]]


def held_out(per_class: int, count: int = 0) -> list[Path]:
    """Sample photos the head (and the int8 calibration) never saw, `count` of them spread over
    both classes (0: every one)."""
    seen = set(training_photos(per_class))
    rest = [p for p in sample_photos() if p not in seen]
    return rest[::max(1, len(rest) // count)][:count] if count else rest


def build_artifact(work: Path, per_class: int) -> Path:
    """Random official-format ViT-S/16 weights and a head trained by train.py on `per_class`
    photos per class (training also writes backbone.xml and, its gate's photos permitting,
    backbone-int8.xml, as for any model). Returns the model folder."""
    spec = get_spec("dino-vits16")
    torch.manual_seed(0)
    weights = work / spec.official_file
    torch.save(create_backbone(spec.architecture).state_dict(), weights)
    data = work / "data"
    for photo in training_photos(per_class):
        (data / photo.parent.name).mkdir(parents=True, exist_ok=True)
        (data / photo.parent.name / photo.name).symlink_to(photo)
    model_dir = work / "model"
    # train.py in a process of its own: OpenVINO's threads from training's extraction and
    # quantization would stay in this one and slow the torch baseline timed here (measured: fp32
    # eager 116 ms in-process after training, 89 ms in a fresh process, quiet 2-core EPYC).
    subprocess.run([sys.executable, str(REPO / "train.py"), "--data-dir", str(data), "--output-dir", str(model_dir),
                    "--weights", str(weights), "--cache-dir", str(work / "cache"), "--device", "cpu",
                    "--backbone", spec.name], check=True, cwd=REPO)
    return model_dir


def cpu_flags_line() -> str:
    """The CPU flags the precisions depend on, read from /proc/cpuinfo (no torch involved)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU flags: /proc/cpuinfo unreadable"
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return "CPU flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in SHOWN_FLAGS)


# --- the fp32 eager baseline: the one place that names the package's preprocessing -----------
def eager_fp32(model_dir: Path) -> nn.Module:
    """Plain PyTorch, fp32 eager: the artifact's backbone behind the single preprocessing
    definition (backbone.OnCrops), uint8 NHWC crops in (torch.uint8, N,H,W,3), features out.
    Call it under torch.inference_mode()."""
    model = load_artifact(model_dir / config.ARTIFACT_FILE)
    return OnCrops(model.backbone, model.preprocessing).eval()


def fp32_eager_ms(model_dir: Path, photos: list[Path], repeats: int) -> float:
    """Median ms of the fp32 eager batch-1 forward on `photos`' crops (the service's decode and crop)."""
    crops = crops_of(Predictor.from_dir(model_dir, warm_up=False), photos)  # decoding only: nothing compiled
    model = eager_fp32(model_dir)
    with torch.inference_mode():
        return timed(model, [torch.from_numpy(c) for c in crops], repeats, desc="fp32 eager")


# --- the served forward --------------------------------------------------------------------------
def crops_of(predictor: Predictor, photos: list, desc: str = "decoding photos") -> list[np.ndarray]:
    """Each photo (a path or JPEG bytes) as the service decodes and centre-crops it: (1, H, W, 3) uint8."""
    return [np.array(predictor.crop(predictor.load_image(p)), dtype=np.uint8)[None]
            for p in tqdm(photos, desc=desc, unit="img", leave=False, mininterval=2)]


def served_features(predictor: Predictor):
    """The served backbone forward alone: uint8 crops in, features out."""
    return lambda pixels: predictor.forward(pixels, attention=False)[0]


def bare_served(predictor: Predictor):
    """What the service runs for a lone request, in this process: the forward, then the numpy
    head, temperature and "neither" check."""
    return lambda pixels: predictor.predict_features(predictor.forward(pixels, attention=False)[0])


def describe(predictor: Predictor) -> str:
    mode = getattr(predictor, "openvino_mode", None) if predictor.runtime == "openvino" else None
    return f"{predictor.runtime} {predictor.precision}" + (f" {mode}" if mode else "") + f" ({predictor.source} model)"


# --- timing ----------------------------------------------------------------------------------------
def timed(fn, inputs: list, repeats: int, desc: str = "", before=None) -> float:
    """Median ms of `fn` over `repeats` inputs (cycling), after two warm-up calls; `before()`, if
    given, runs untimed before each call (to time `fn` in the state a request meets it in)."""
    fn(inputs[0])
    fn(inputs[1 % len(inputs)])
    times = []
    for i in tqdm(range(repeats), desc=desc or "timing", unit="call", leave=False, mininterval=2):
        x = inputs[i % len(inputs)]
        if before is not None:
            before()
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# --- the request photos and the HTTP client ----------------------------------------------------
def photo_1920x1080(photos: list[Path]) -> tuple[bytes, str]:
    """A sample JPEG that is exactly 1920x1080, else the largest sample photo cropped to 16:9,
    resized to 1920x1080 and re-encoded (quality 90); and how it was made."""
    sizes = {p: Image.open(p).size for p in photos}
    for photo, size in sizes.items():
        if size == (1920, 1080) and Image.open(photo).format == "JPEG":
            return photo.read_bytes(), f"{photo.name} (1920x1080 JPEG)"
    source = max(photos, key=lambda p: sizes[p][0] * sizes[p][1])
    with Image.open(source) as im:
        frame = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (1920, 1080), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    frame.save(buffer, format="JPEG", quality=90)
    verb = "resized" if sizes[source][0] >= 1920 else "upscaled"
    return buffer.getvalue(), (f"no sample photo is a 1920x1080 JPEG: the largest, {source.name} "
                               f"({sizes[source][0]}x{sizes[source][1]}), cropped to 16:9 and {verb}, JPEG quality 90")


def jpeg_224(photo: bytes) -> bytes:
    """The request photo resized to 224x224 (what the model sees): the request that costs the least."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC).save(
        buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def multipart(photo: bytes) -> tuple[bytes, str]:
    """The body and content type of `curl -F file=@photo.jpg`, encoded once (by urllib3, as
    requests does), so the timed requests measure the service, not the client's encoding."""
    return encode_multipart_formdata({"file": ("photo.jpg", photo, "image/jpeg")})


def post(url: str, body: tuple[bytes, str], steps: dict | None = None) -> float:
    """One /predict on a new connection (the service closes each), with the standard library's
    client (requests adds ~1 ms of its own per call); ms. `steps` collects Server-Timing."""
    address = urlsplit(url)
    start = time.perf_counter()
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.request("POST", "/predict", body=body[0], headers={"Content-Type": body[1]})
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    elapsed = (time.perf_counter() - start) * 1000
    if response.status != 200:
        raise RuntimeError(f"/predict answered {response.status}")
    if steps is not None and response.getheader("Server-Timing"):
        for item in response.getheader("Server-Timing").split(", "):
            name, ms = item.split(";dur=")
            steps.setdefault(name, []).append(float(ms))
    return elapsed


def serve(model_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`gunicorn predict:app` (gunicorn.conf.py defaults) serving `model_dir`, ready; the caller stops it."""
    proc, url, seconds = start_gunicorn(model_dir, log, timeout=300)
    print(f"gunicorn ready in {seconds:.1f} s at {url}")
    return proc, url


# --- processes (/proc) --------------------------------------------------------------------------
def worker_pids(master: int) -> list[int]:
    """Children of the gunicorn master, from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            children.append(int(stat.parent.name))
    return sorted(children)


def _status_mb(path: str, key: str) -> float:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid: int) -> float:
    return _status_mb(f"/proc/{pid}/status", "VmRSS:")


def pss_mb(pid: int) -> float:
    """Proportional set size: pages shared by the master and its forked workers counted once
    between them (as a container's memory accounting counts them), so the figures add up."""
    return _status_mb(f"/proc/{pid}/smaps_rollup", "Pss:")


def loads_torch(pid: int) -> bool:
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
