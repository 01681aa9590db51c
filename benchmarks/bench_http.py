"""/predict over HTTP against the bare served forward in the same process, and under 16 clients:

    .venv/bin/python benchmarks/bench_http.py [--requests 60] [--per-client 8] [--repeats 30] [--train-per-class 40]
                                              [--model-dir DIR]

Builds the ViT-S/16 random-weights artifact (common.build_artifact; --model-dir reuses one made
so) and starts `gunicorn predict:app` (gunicorn.conf.py defaults) on a free port, then:
  - /predict p50/p95 with a 1920x1080 JPEG (a sample photo cropped and resized to it when none
    is that size) and with it at 224x224, --requests each, every request paired with one bare
    served forward of the same photo's crop in this process (Predictor.forward + predict_features,
    precision auto), back to back, so that other load hits both alike: overhead = HTTP p50 - bare p50;
  - the floor under that overhead: the photo's decode and centre crop in this process plus an
    empty round trip (GET /health on a new connection), each timed after one bare forward as
    each request is: no serial request path goes below it (and, beside it, the same timed back
    to back, which runs faster than any request that follows a forward can: see floor_ms);
  - 1 client (--requests / 2 requests) and 16 concurrent clients (--per-client requests each),
    1920x1080: req/s, p50, p99;
    the 16-client rate against the naive fp32 eager rate, 1000 / fp32 eager batch-1 ms (measured
    here on the held-out photos, or handed over by bench_service.py from the same run);
  - the service's multipart parsing against werkzeug's (a side figure).
The client is the standard library's http.client, the multipart body encoded once. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from tqdm.auto import tqdm

from common import (bare_served, build_artifact, cpu_flags_line, crops_of, describe, fp32_eager_ms, held_out,
                    jpeg_224, multipart, percentile, photo_1920x1080, post, sample_photos, serve, timed)
from harness.live import stop
from vehicle_classifier.model.predictor import Predictor
from vehicle_classifier.serving.uploads import form_parts


def paired(url: str, photo: bytes, bare, pixels: np.ndarray, count: int, name: str) -> dict:
    """`count` rounds of one bare forward (here) then one /predict of the same photo (gunicorn),
    back to back. Returns the bare and HTTP latencies and the service's own account (Server-Timing)."""
    steps: dict[str, list[float]] = {}
    bare_ms, http_ms = [], []
    body = multipart(photo)
    for _ in range(3):
        bare(pixels)
        post(url, body)
    for _ in tqdm(range(count), desc=f"paired requests, {name}", unit="req", leave=False, mininterval=2):
        start = time.perf_counter()
        bare(pixels)
        bare_ms.append((time.perf_counter() - start) * 1000)
        http_ms.append(post(url, body, steps))
    return {"bare_p50": statistics.median(bare_ms), "http_p50": statistics.median(http_ms),
            "http_p95": percentile(http_ms, 0.95), "steps": {k: statistics.median(v) for k, v in steps.items()}}


def floor_ms(url: str, photo: bytes, predictor: Predictor, after, repeats: int) -> dict:
    """The floor under a request's overhead: the photo's decode and centre crop to uint8 pixels in
    this process plus an empty HTTP round trip (GET /health on a new connection). "floor": each
    part timed after one untimed `after()` (the bare forward), as each paired /predict is;
    "hot": each timed back to back. They differ: on the 2-core EPYC VM every step of a round
    trip runs 2-3x slower after a forward or 25 ms idle (cold caches, halted vCPUs waking) than
    right after another round trip, so only the first is a floor that a request meeting the
    service after a forward, or idle, can reach (figures in docs/benchmarks.md)."""
    address = urlsplit(url)

    def round_trip(_):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
        connection.request("GET", "/health")
        connection.getresponse().read()
        connection.close()

    def decode_and_crop(data):
        return np.asarray(predictor.crop(predictor.load_image(data)))

    parts = {}
    for state, before in (("floor", after), ("hot", None)):
        parts[state] = (timed(decode_and_crop, [photo], repeats, f"floor: decode, {state}", before),
                        timed(round_trip, [None], repeats, f"floor: GET, {state}", before))
    return {state: sum(ms) for state, ms in parts.items()} | {"floor_parts": parts}


def concurrent(url: str, photo: bytes, clients: int, per_client: int) -> dict:
    """`clients` threads posting the photo `per_client` times each: req/s, p50 and p99 (ms)."""
    body = multipart(photo)
    latencies: list[float] = []
    progress = tqdm(total=clients * per_client, desc=f"{clients} client(s)", unit="req", leave=False, mininterval=2)

    def client(_):
        for _ in range(per_client):
            latencies.append(post(url, body))  # list.append is atomic under the GIL
            progress.update()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    progress.close()
    return {"rps": len(latencies) / elapsed, "p50": statistics.median(latencies), "p99": percentile(latencies, 0.99)}


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

    print("multipart parsing of one file part, median ms:")
    for name, data in (("the request photo", photo), ("3 MB", (photo * (3_000_000 // len(photo) + 1))[:3_000_000])):
        body = multipart(data)
        assert werkzeug_files(body) == service_files(body) == data
        slow, fast = (timed(parse, [body], repeats, "multipart") for parse in (werkzeug_files, service_files))
        print(f"  {name}: werkzeug {slow:.2f}, the service's {fast:.2f} ({slow / fast:.1f}x faster)")


def run_http(model_dir: Path, work: Path, fp32_ms: float, args) -> dict:
    """Every HTTP figure, against the bare served forward; returns what the driver's table needs."""
    photo, described = photo_1920x1080(sample_photos())
    photos = {"1920x1080": photo, "224x224": jpeg_224(photo)}
    print(f"\nrequest photos: {described}, {len(photo) / 1024:.0f} KB; and it at 224x224, "
          f"{len(photos['224x224']) / 1024:.0f} KB")
    multipart_parsers(photo, args.repeats)
    predictor = Predictor.from_dir(model_dir)
    bare = bare_served(predictor)
    proc, url = serve(model_dir, work / "gunicorn.log")
    try:
        runs = {name: paired(url, data, bare, crops_of(predictor, [data])[0], args.requests, name)
                for name, data in photos.items()}
        for name, data in photos.items():
            pixels = crops_of(predictor, [data])[0]
            runs[name] |= floor_ms(url, data, predictor, lambda: bare(pixels), args.repeats)
        one = concurrent(url, photo, 1, max(2, args.requests // 2))
        sixteen = concurrent(url, photo, 16, args.per_client)
    finally:
        stop(proc)
    figures = {"paired": runs, "one": one, "sixteen": sixteen, "fp32_ms": fp32_ms, "served": describe(predictor)}
    print_http(figures, args.requests)
    return figures


def print_http(f: dict, requests_: int) -> None:
    print(f"\n/predict over HTTP (gunicorn defaults), {requests_} requests per photo, each after one bare served "
          f"forward of the same crop in this process ({f['served']}):")
    for name, r in f["paired"].items():
        inside = ", ".join(f"{k} {v:.1f}" for k, v in r["steps"].items())
        overhead, (decode, trip), (hot_decode, hot_trip) = r["http_p50"] - r["bare_p50"], *r["floor_parts"].values()
        print(f"  {name} JPEG: HTTP p50 {r['http_p50']:.1f} ms (p95 {r['http_p95']:.1f}), bare p50 "
              f"{r['bare_p50']:.1f} ms, overhead {overhead:+.1f} ms = floor {overhead - r['floor']:+.1f} ms; floor "
              f"{r['floor']:.1f} ms (decode {decode:.1f} + round trip {trip:.1f}, each after a bare forward; back to "
              f"back {r['hot']:.1f} = {hot_decode:.1f} + {hot_trip:.1f}: overhead = that {overhead - r['hot']:+.1f}); "
              f"inside the service, median ms: {inside or 'no Server-Timing'}")
    naive = 1000 / f["fp32_ms"]
    for label, c in (("1 client", f["one"]), ("16 clients", f["sixteen"])):
        print(f"  {label}, 1920x1080: {c['rps']:.1f} req/s, p50 {c['p50']:.1f} ms, p99 {c['p99']:.1f} ms "
              f"({c['rps'] / naive:.2f}x the naive fp32 eager rate, {naive:.1f}/s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=60, help="paired /predict requests per photo for p50/p95")
    parser.add_argument("--per-client", type=int, default=8, help="requests per client in the 16-client run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls for fp32 eager and the floors")
    parser.add_argument("--train-per-class", type=int, default=40, help="photos per class to train the head on")
    parser.add_argument("--model-dir", type=Path, help="an artifact build_artifact made (with --train-per-class), "
                        "reused instead of training one (a few minutes) on each run")
    args = parser.parse_args()
    print(cpu_flags_line())
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir or build_artifact(work, args.train_per_class)
        fp32_ms = fp32_eager_ms(model_dir, held_out(args.train_per_class, 16), args.repeats)
        print(f"fp32 eager batch-1 forward: {fp32_ms:.1f} ms")
        run_http(model_dir, work, fp32_ms, args)


if __name__ == "__main__":
    main()
