"""Load clients shared by benchmarks/bench_load.py and tests/test_stack.py: threads posting photos
to /predict, each request's start, duration and outcome recorded."""

from __future__ import annotations

import threading
import time

import requests


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.results: list[tuple[float, float, int | str]] = []  # (start, seconds, status or error)

    def add(self, start: float, seconds: float, outcome) -> None:
        with self.lock:
            self.results.append((start, seconds, outcome))

    def summary(self, elapsed: float) -> dict:
        ok = sorted(s for _, s, o in self.results if o == 200)
        answered = sorted(s for _, s, o in self.results if isinstance(o, int))  # any HTTP status
        failed = [o for _, _, o in self.results if o != 200]

        def pct(q, values=ok):
            return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))] * 1000 if values else None

        return {
            "requests": len(self.results), "ok": len(ok), "failed": len(failed),
            "failed_pct": 100 * len(failed) / max(1, len(self.results)),
            "failures": sorted({str(o) for o in failed}),
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "throughput_rps": len(ok) / elapsed,
            "answer_p50_ms": pct(0.50, answered), "answer_p99_ms": pct(0.99, answered),
        }


def run_clients(url: str, photos: list[bytes], clients: int, seconds: float, recorder: Recorder,
                max_requests: int = 100_000, files_per_request: int = 1,
                stop: threading.Event | None = None) -> float:
    """`clients` threads posting photos until `seconds` pass (or `max_requests` are sent, or
    `stop` is set)."""
    stop = stop or threading.Event()
    deadline = time.perf_counter() + seconds
    sent = [0]
    sent_lock = threading.Lock()

    def client(index: int):
        # One connection per request, as independent users (and most HTTP clients) would make.
        i = index
        while time.perf_counter() < deadline and not stop.is_set():
            with sent_lock:
                if sent[0] >= max_requests:
                    return
                sent[0] += 1
            files = [("file", (f"photo{k}.jpg", photos[(i + k) % len(photos)], "image/jpeg"))
                     for k in range(files_per_request)]
            i += clients
            start = time.perf_counter()
            try:
                response = requests.post(f"{url}/predict", files=files, timeout=30)
                outcome = response.status_code
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            recorder.add(start, time.perf_counter() - start, outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return time.perf_counter() - started
