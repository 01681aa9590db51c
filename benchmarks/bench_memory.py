"""Memory of the prediction service under the worst requests it accepts, all at once.

    .venv/bin/python benchmarks/bench_memory.py [--model-dir models] [--rounds 2]

Starts `gunicorn predict:app` (gunicorn.conf.py defaults: one worker, GUNICORN_THREADS request
threads) on a free port and sends, from as many clients as the worker has threads, the worst
request each limit allows: one solid RGBA PNG of MAX_REQUEST_PIXELS (the per-request decoded
budget; PNGs decode at full size, and transparency costs the most to convert). It samples the
worker's RSS every 20 ms and prints it idle, at its peak, and after the requests (is the memory
handed back?); and what the issue's request (16 such PNGs at once) now gets. Without
--model-dir it builds a ViT-S/16 artifact (common.build_artifact). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
from PIL import Image

from vehicle_classifier.config import ServiceConfig
from harness.live import start_gunicorn, stop


def worst_png(pixels: int) -> bytes:
    width = int(pixels ** 0.5)
    height = pixels // width
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height), (200, 40, 40, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def worker_rss(master: psutil.Process) -> int:
    return sum(child.memory_info().rss for child in master.children(recursive=True))


def sample_peak(master: psutil.Process, stop: threading.Event, out: list[int]) -> None:
    while not stop.is_set():
        try:
            out.append(worker_rss(master))
        except psutil.Error:
            pass
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    settings = ServiceConfig.from_env()
    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model_dir
        if model_dir is None:
            from common import build_artifact

            model_dir = build_artifact(Path(work), per_class=20)
        proc, url, _ = start_gunicorn(model_dir, Path(work) / "gunicorn.log", timeout=300)
        try:
            run(url, psutil.Process(proc.pid), settings, args.rounds)
        finally:
            stop(proc)


def run(url: str, master: psutil.Process, settings: ServiceConfig, rounds: int) -> None:
    png = worst_png(settings.max_request_pixels)
    clients = settings.threads
    print(f"worst accepted request: one {len(png) / 1e6:.2f} MB RGBA PNG of {settings.max_request_pixels / 1e6:g} MP; "
          f"{clients} clients at once (GUNICORN_THREADS), worker decode budget "
          f"{settings.max_worker_decode_pixels / 1e6:g} MP")
    time.sleep(1)
    print(f"worker RSS idle: {worker_rss(master) / 2**20:.0f} MiB")

    def send(_):
        response = requests.post(f"{url}/predict", data=png, headers={"Content-Type": "image/png"}, timeout=600)
        return response.status_code

    for round_ in range(1, rounds + 1):
        peak: list[int] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_peak, args=(master, stop, peak))
        sampler.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(send, range(clients)))
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
        time.sleep(1)
        print(f"round {round_}: statuses {sorted(set(statuses))} in {seconds:.1f} s; worker RSS peak "
              f"{max(peak) / 2**20:.0f} MiB, 1 s after {worker_rss(master) / 2**20:.0f} MiB")
    files = [("file", (f"{i}.png", png)) for i in range(16)]
    start = time.perf_counter()
    response = requests.post(f"{url}/predict", files=files, timeout=600)
    print(f"16 such PNGs in one request: {response.status_code} in {(time.perf_counter() - start) * 1000:.0f} ms: "
          f"{response.json().get('error', '')}")


if __name__ == "__main__":
    main()
