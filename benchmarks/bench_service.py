"""Prediction-service benchmark: the served fast path against plain fp32 eager PyTorch.

    .venv/bin/python benchmarks/bench_service.py [--compile] [--requests 60]

One run, on a fresh clone (needs only ../shared/data/car-bike-sample):
  1. builds a ViT-S/16 model artifact: random weights in the official DINO format, head trained
     by vehicle_classifier.training.run.run_training on a small subset of the sample photos;
  2. the batch-1 backbone forward of each CPU option on the preprocessed sample photos: fp32
     eager (the baseline), torch bf16 autocast, OpenVINO bf16 with one stream over all cores
     and with one stream per core (what the service runs; also its per-image rate with every
     stream busy), int8 dynamic quantization, and with
     --compile torch.compile (inductor, frozen weights, under bf16 autocast), each with its
     fidelity against fp32 over every sample photo: top-1 agreement and max |delta p|;
  3. `gunicorn predict:app` (gunicorn.conf.py defaults) on a free port: /predict p50/p95 over
     HTTP with a real 1920x1080 JPEG photo (the largest sample photo cropped and resized
     to it when none is that size) and with it at 224x224, each request paired with a bare
     forward of the served runtime (backbone + head, batch 1) in this process, so that noise
     from other jobs hits both alike: the overhead is HTTP p50 minus bare p50; throughput with
     1 and 16 concurrent clients against the bare runtime's best rate; and the floor under the
     overhead: the photo's decode and preprocessing in this process plus an empty round trip.
     The client is the standard library's http.client, the multipart body encoded once.
Prints figures and ratios; asserts nothing. --http-only skips step 2.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import requests
import torch
from PIL import Image, ImageOps
from torch import nn
from tqdm.auto import tqdm
from urllib3 import encode_multipart_formdata

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vehicle_classifier import config  # noqa: E402
from vehicle_classifier.backbone import create_backbone, get_spec  # noqa: E402
from vehicle_classifier.images import load_tensor  # noqa: E402
from vehicle_classifier.devices import torch_threads  # noqa: E402
from vehicle_classifier.serving.predictor import Predictor  # noqa: E402
from vehicle_classifier.serving.uploads import form_parts  # noqa: E402
from vehicle_classifier.runtime import OpenVINOBackbone  # noqa: E402
from vehicle_classifier.training.run import run_training  # noqa: E402

SAMPLE_DIR = config.SAMPLE_DIR


def sample_photos() -> list[Path]:
    photos = sorted(p for d in sorted(SAMPLE_DIR.glob("*/")) for p in d.iterdir() if p.is_file())
    if not photos:
        sys.exit(f"no sample photos at {SAMPLE_DIR}")
    return photos


def build_artifact(work: Path, per_class: int) -> Path:
    """Random official-format ViT-S/16 weights and a head trained on `per_class` photos per class."""
    spec = get_spec("dino-vits16")
    torch.manual_seed(0)
    weights = work / spec.official_file
    torch.save(create_backbone(spec.architecture).state_dict(), weights)
    data = work / "data"
    for folder in sorted(SAMPLE_DIR.glob("*/")):
        (data / folder.name).mkdir(parents=True)
        for photo in sorted(p for p in folder.iterdir() if p.is_file())[:per_class]:
            (data / folder.name / photo.name).symlink_to(photo)
    model_dir = work / "model"
    cfg = config.TrainConfig(backbone=spec.name)
    run_training(data, model_dir, cfg, weights, work / "cache", device="cpu")
    return model_dir


def timed(fn, inputs, repeats: int) -> float:
    """Median ms of `fn` over `repeats` inputs, after two warm-up calls."""
    fn(inputs[0])
    fn(inputs[1 % len(inputs)])
    times = []
    for i in range(repeats):
        x = inputs[i % len(inputs)]
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@torch.inference_mode()
def probabilities(forward, head: nn.Module, tensors: list[torch.Tensor], desc: str) -> torch.Tensor:
    out = [head(forward(x).float()).softmax(dim=1) for x in tqdm(tensors, desc=desc, unit="img", leave=False,
                                                                   mininterval=2)]
    return torch.cat(out)


def fidelity(probs: torch.Tensor, reference: torch.Tensor) -> str:
    agree = int((probs.argmax(1) == reference.argmax(1)).sum())
    delta = float((probs - reference).abs().max())
    return f"top-1 agreement {agree}/{len(reference)}, max |dp| {delta:.4f}"


def bf16(fn):
    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(x)
    return run


def served_forward(predictor: Predictor):
    """The bare forward of the runtime the service runs, backbone and head, as a lone request's
    forward runs (OpenVINO: the one stream over every core in the default adaptive mode)."""
    head = predictor.head

    def forward(x):
        with torch.inference_mode():
            if predictor.openvino is not None:
                return head(predictor.openvino(x))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=predictor.precision == "bf16"):
                return head(predictor.torch_forward.backbone(x).float())

    return forward


def best_rate(predictor: Predictor, tensors: list[torch.Tensor], forward, repeats: int) -> float:
    """The served runtime's best throughput in images/s: batch-1 forwards on every OpenVINO
    stream at once, or batch-8 forwards, whichever is faster."""
    count = min(len(tensors), 4 * repeats)
    rates = []
    if predictor.openvino is not None:
        start = time.perf_counter()
        for _ in predictor.openvino.map((i, x) for i, x in enumerate(tensors[:count])):
            pass
        rates.append(count / (time.perf_counter() - start))
    batches = [torch.cat(tensors[i:i + 8]) for i in range(0, count - 7, 8)]
    rates.append(8000 / timed(forward, batches, max(2, repeats // 8)))
    return max(rates)


def decoded_tensors(predictor: Predictor, photos: list[Path]) -> list[torch.Tensor]:
    return [predictor.to_tensor(predictor.load_image(photo)).unsqueeze(0)
            for photo in tqdm(photos, desc="decoding sample photos", unit="img", leave=False, mininterval=2)]


def measure_options(model_dir: Path, photos: list[Path], repeats: int, with_compile: bool) -> float:
    predictor = Predictor.from_dir(model_dir)  # the service's own predictor (precision auto)
    backbone, head = predictor.torch_forward.backbone, predictor.head
    tensors = decoded_tensors(predictor, photos)

    print(f"\nbatch-1 backbone forward on {len(tensors)} sample photos ({torch.get_num_threads()} torch threads):")
    with torch.inference_mode():
        fp32_ms = timed(backbone, tensors, repeats)
    reference = probabilities(backbone, head, tensors, "fp32 reference")
    print(f"  fp32 eager (baseline)          {fp32_ms:7.1f} ms")

    def report(name, forward, extra=""):
        with torch.inference_mode():
            ms = timed(forward, tensors, repeats)
        probs = probabilities(forward, head, tensors, name)
        print(f"  {name:<30} {ms:7.1f} ms  {fp32_ms / ms:4.2f}x faster  {fidelity(probs, reference)}{extra}")

    report("torch bf16 autocast", bf16(backbone))
    served = predictor.openvino
    if served is None:
        report(f"service path (torch {predictor.precision})", backbone if predictor.precision == "fp32" else bf16(backbone))
    else:
        size = predictor.model.preprocessing["input_size"]
        report(f"OpenVINO {served.precision}, one stream", OpenVINOBackbone(backbone, size, served.precision, "latency"),
               "  (OPENVINO_MODE=latency)")
        report(f"OpenVINO {served.precision}, {served.mode}", served, "  (served, one call at a time)")
        # The served mode's rate: batch-1 forwards kept running on every stream at once.
        count = min(len(tensors), 4 * repeats)
        start = time.perf_counter()
        for _ in served.map((i, x) for i, x in enumerate(tensors[:count])):
            pass
        per_image = (time.perf_counter() - start) * 1000 / count
        print(f"  {'  the same, per image, ' + str(served.streams) + ' at once':<30} {per_image:7.1f} ms  "
              f"{fp32_ms / per_image:4.2f}x faster")
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(backbone), {nn.Linear}, dtype=torch.qint8)
    report("int8 dynamic quantization", int8)
    if with_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(copy.deepcopy(backbone))
        start = time.perf_counter()
        with torch.inference_mode():
            bf16(compiled)(tensors[0])
        report("torch.compile + bf16", bf16(compiled), f"  (compile {time.perf_counter() - start:.0f} s)")
    return fp32_ms


def photo_1920x1080(photos: list[Path]) -> tuple[bytes, str]:
    """A sample JPEG that is exactly 1920x1080, else the largest sample photo cropped to 16:9,
    resized to 1920x1080 and re-encoded (quality 90)."""
    sizes = {p: Image.open(p).size for p in photos}
    for photo, size in sizes.items():
        if size == (1920, 1080) and Image.open(photo).format == "JPEG":
            return photo.read_bytes(), f"{photo.name} (1920x1080 JPEG)"
    source = max(photos, key=lambda p: sizes[p][0] * sizes[p][1])
    with Image.open(source) as im:
        frame = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (1920, 1080), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    frame.save(buffer, format="JPEG", quality=90)
    verb = "cropped to 16:9 and resized" if sizes[source][0] >= 1920 else "cropped to 16:9 and upscaled"
    return buffer.getvalue(), (f"no sample photo is 1920x1080 JPEG: the largest, {source.name} "
                               f"({sizes[source][0]}x{sizes[source][1]}), {verb} to 1920x1080, JPEG quality 90")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "predict:app"],
                            cwd=REPO, env={**os.environ, "MODEL_DIR": str(model_dir)},
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    while time.perf_counter() - started < 300:
        if proc.poll() is not None:
            sys.exit(f"gunicorn exited:\n{log.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/ready", timeout=2).ok:
                print(f"\ngunicorn ready in {time.perf_counter() - started:.1f} s at {url}")
                return proc, url
        except requests.RequestException:
            time.sleep(0.3)
    sys.exit("gunicorn not ready within 300 s")


def multipart(photo: bytes) -> tuple[bytes, str]:
    """The body and content type of `curl -F file=@photo.jpg`, encoded once (by urllib3, as
    requests does), so the timed requests measure the service, not the client's encoding."""
    return encode_multipart_formdata({"file": ("photo.jpg", photo, "image/jpeg")})


def post(url: str, body: tuple[bytes, str], steps: dict | None = None) -> float:
    """One /predict on a new connection (the service closes each: no keep-alive), with the plain
    standard-library client: requests adds about 1 ms of its own per call on this machine."""
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
    if steps is not None:  # the service's own account of the request (Server-Timing, ms)
        for item in response.getheader("Server-Timing").split(", "):
            name, ms = item.split(";dur=")
            steps.setdefault(name, []).append(float(ms))
    return elapsed


def throughput(url: str, photo: bytes, clients: int, per_client: int) -> float:
    body = multipart(photo)

    def client(_):
        for _ in range(per_client):
            post(url, body)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return clients * per_client / (time.perf_counter() - start)


def jpeg_224(photo: bytes) -> bytes:
    """The request photo resized to 224x224 (what the model sees): the request that costs the least."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC).save(
        buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def paired(url: str, photo: bytes, bare, tensor: torch.Tensor, count: int) -> tuple[list, list, dict]:
    """`count` rounds of one bare forward (in this process) then one /predict of the same photo
    (in gunicorn), back to back: whatever else loads the machine loads both alike. Returns the
    sorted bare ms, the sorted HTTP ms and the service's own account of each step."""
    steps: dict[str, list[float]] = {}
    bare_ms, http_ms = [], []
    body = multipart(photo)
    for _ in range(5):
        bare(tensor)
        post(url, body)
    for _ in range(count):
        start = time.perf_counter()
        bare(tensor)
        bare_ms.append((time.perf_counter() - start) * 1000)
        http_ms.append(post(url, body, steps))
    return sorted(bare_ms), sorted(http_ms), steps


def floors(url: str, photos: dict[str, bytes], preprocessing: dict, repeats: int) -> dict[str, float]:
    """What no serial request path goes below on this machine, per photo: its decode and
    preprocessing (the project's own, in this process, on one thread as a request thread runs
    it) plus an empty HTTP round trip (GET /health on a new connection, gunicorn idle)."""
    address = urlsplit(url)

    def round_trip(_):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
        connection.request("GET", "/health")
        connection.getresponse().read()
        connection.close()

    empty = timed(round_trip, [None], repeats)
    with torch_threads(1):
        return {name: timed(lambda d: load_tensor(d, preprocessing), [data], repeats) + empty
                for name, data in photos.items()}


def multipart_parsers(photo: bytes, repeats: int) -> None:
    """The service's multipart parsing (uploads.form_parts: python-multipart) against werkzeug's,
    behind Flask's request.files, on the request photo and on a 3 MB body (a phone photo)."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    def werkzeug_files(body):
        environ = EnvironBuilder(method="POST", data=body[0], content_type=body[1]).get_environ()
        return Request(environ).files["file"].read()

    def service_files(body):
        return form_parts(body[0], body[1].split("boundary=")[1].encode())[0][0][2]

    print("\nmultipart parsing of one file part, median ms:")
    for name, data in (("the request photo", photo), ("3 MB", (photo * (3_000_000 // len(photo) + 1))[:3_000_000])):
        body = multipart(data)
        assert werkzeug_files(body) == service_files(body) == data
        slow, fast = (timed(parse, [body], repeats) for parse in (werkzeug_files, service_files))
        print(f"  {name}: werkzeug {slow:.2f}, the service's {fast:.2f} ({slow / fast:.1f}x faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="sequential /predict requests for p50/p95")
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards per option")
    parser.add_argument("--train-per-class", type=int, default=40, help="photos per class to train the head on")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--http-only", action="store_true",
                        help="skip the CPU options and their fidelity (step 2); measure only the served runtime")
    args = parser.parse_args()

    photos = sample_photos()
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = Path(tmp)
        print(f"building a ViT-S/16 artifact (random official-format weights, head on "
              f"{2 * args.train_per_class} sample photos)")
        model_dir = build_artifact(work, args.train_per_class)
        if not args.http_only:
            measure_options(model_dir, photos, args.repeats, args.compile)
        predictor = Predictor.from_dir(model_dir)
        tensors = decoded_tensors(predictor, photos[:64])
        with torch.inference_mode():
            fp32_ms = timed(predictor.torch_forward.backbone, tensors, args.repeats)
        bare = served_forward(predictor)
        photo, described = photo_1920x1080(photos)
        small = jpeg_224(photo)
        multipart_parsers(photo, args.repeats)
        print(f"\nrequest photos: {described}, {len(photo) / 1024:.0f} KB; and it at 224x224, {len(small) / 1024:.0f} KB")
        proc, url = serve(model_dir, work / "gunicorn.log")
        try:
            figures, request_photos = {}, {"1920x1080": photo, "224x224": small}
            for name, data in request_photos.items():
                tensor = predictor.to_tensor(predictor.load_image(data)).unsqueeze(0)
                figures[name] = paired(url, data, bare, tensor, args.requests)
            lowest = floors(url, request_photos, predictor.model.preprocessing, args.repeats)
            one = throughput(url, photo, 1, 30)
            sixteen = throughput(url, photo, 16, 4)
            bare_rate = best_rate(predictor, tensors, bare, args.repeats)  # gunicorn idle meanwhile
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    report(args.requests, figures, lowest, fp32_ms, bare_rate, one, sixteen)


def report(requests_: int, figures: dict, lowest: dict, fp32_ms, bare_rate, one, sixteen) -> None:
    def p(latencies, q):
        return latencies[min(len(latencies) - 1, round(q * len(latencies)) - 1)]

    print(f"\nfp32 eager batch-1 forward {fp32_ms:.1f} ms; the served runtime's best rate {bare_rate:.1f} img/s")
    print(f"/predict over HTTP, {requests_} requests each, each after one bare forward (backbone + head) of the same "
          f"photo in this process (gunicorn defaults):")
    for name, (bare_ms, http_ms, steps) in figures.items():
        print(f"  {name} JPEG: HTTP p50 {statistics.median(http_ms):.1f} ms (p95 {p(http_ms, 0.95):.1f}), bare p50 "
              f"{statistics.median(bare_ms):.1f} ms; inside the service, median ms: "
              + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in steps.items()))
    print(f"  throughput (1920x1080): 1 client {one:.1f} req/s, 16 concurrent clients {sixteen:.1f} req/s")
    print("\nratios and goals (one run, same machine):")
    for (name, (bare_ms, http_ms, _)), goal in zip(figures.items(), (3.0, 1.5)):
        overhead = statistics.median(http_ms) - statistics.median(bare_ms)
        print(f"  HTTP p50 - bare forward p50, {name}: {overhead:.1f} ms  (goal <= {goal} ms: "
              f"{'met' if overhead <= goal else 'NOT met'}; floor: decode + preprocess + an empty round trip "
              f"{lowest[name]:.1f} ms)")
        if overhead < lowest[name]:  # the pairing did not cancel other load: the figure means nothing
            print("    below its floor: other load slowed the bare forwards more than the service's; rerun on a "
                  "quiet machine")
    print(f"  16-client throughput / bare best = {sixteen:.1f} / {bare_rate:.1f} = {sixteen / bare_rate:.2f}"
          f"  (goal >= 0.70: {'met' if sixteen >= 0.7 * bare_rate else 'NOT met'})")
    large = statistics.median(figures["1920x1080"][1])
    print(f"  /predict p50 (1920x1080) / fp32 eager forward = {large:.1f} / {fp32_ms:.1f} = {large / fp32_ms:.2f}"
          f"  (goal <= 0.40 on an AMX machine: {'met' if large <= 0.4 * fp32_ms else 'NOT met'})")


if __name__ == "__main__":
    main()
