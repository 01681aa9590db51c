"""Load and fault test of the prediction service: real gunicorn, real photos, loopback only.

    .venv/bin/python benchmarks/bench_load.py                       # the full run (~3 minutes)
    .venv/bin/python benchmarks/bench_load.py --clients 16 --seconds 30 --kill-after 15

Every loop is bounded in count and time and the script stops by itself. Phases:
  1. naive single-stream fp32 eager inference (plain PyTorch, decode included), the yardstick;
  2. load: N concurrent clients for T seconds posting real photos; one worker is killed with
     SIGKILL mid-way (gunicorn forks a replacement); requests, failures, p50/p95/p99 latency,
     throughput and its ratio to (1), and how long /ready took to answer again;
  3. slow clients: uploads trickled a byte at a time, and uploads that never finish, while
     normal clients run; their latency against the same clients without the slow ones;
  4. a storm: many concurrent requests over the batch limit (fast 4xx expected), and a valid
     storm of more clients than the service has slots (they wait in the kernel's bounded
     listen queue, GUNICORN_BACKLOG: all answered, none refused while it has room);
  5. memory: worker RSS after warm-up and after thousands of requests.
Prints figures; with --json also writes them to a file (the test suite runs a reduced version).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from common import build_artifact, eager_fp32, rss_mb, sample_photos, serve, worker_pids  # beside this script
from harness.load import Recorder, run_clients


def kill_one_worker_later(master: int, url: str, after: float, report: dict) -> threading.Thread:
    """SIGKILL one worker after `after` seconds; then time until a new worker serves /ready."""
    def act():
        time.sleep(after)
        before = worker_pids(master)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.perf_counter()
        report["killed_pid"] = victim
        while time.perf_counter() - killed_at < 60:
            now = worker_pids(master)
            replaced = victim not in now and len(now) >= len(before)
            try:
                ready = requests.get(f"{url}/ready", timeout=2).status_code == 200
            except requests.RequestException:
                ready = False
            if replaced and ready:
                report["recovered_s"] = time.perf_counter() - killed_at
                report["new_pids"] = now
                return
            time.sleep(0.05)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


def slow_uploads(port: int, count: int, seconds: float, trickle: bool, stop: threading.Event) -> dict:
    """`count` uploads that announce 2 MB and then send a byte every 0.5 s (trickle) or nothing
    more (stalled). Returns how many the server closed, and when."""
    socks, closed = [], []
    header = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
              f"Content-Length: {2 * 1024 * 1024}\r\n\r\n").encode() + b"\xff\xd8\xff"
    started = time.perf_counter()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(header)
        socks.append(s)
    open_socks = list(socks)
    while open_socks and time.perf_counter() - started < seconds and not stop.is_set():
        time.sleep(0.5)
        for s in list(open_socks):
            try:
                if trickle:
                    s.sendall(b"\x00")
                s.setblocking(False)
                try:
                    if s.recv(4096) == b"":
                        raise ConnectionResetError
                    raise ConnectionResetError  # an answer (e.g. 408): the server is done with it
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
            except OSError:
                closed.append(time.perf_counter() - started)
                open_socks.remove(s)
    for s in socks:
        s.close()
    return {"slow_clients": count, "closed_by_server": len(closed),
            "closed_after_s": round(statistics.median(closed), 1) if closed else None}


# --- the naive yardstick --------------------------------------------------------------------------
def naive_fp32_throughput(model_dir: Path, photo_paths: list[Path], count: int) -> float:
    """Images per second of a plain single-stream fp32 eager loop: decode, centre crop, batch 1."""
    import torch

    from vehicle_classifier.model.predictor import Predictor

    decoder = Predictor.from_dir(model_dir, warm_up=False)  # its decode and crop only: nothing compiled
    model = eager_fp32(model_dir)
    paths = [photo_paths[i % len(photo_paths)] for i in range(count)]
    with torch.inference_mode():
        model(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))  # warm-up, as the service also gets
        start = time.perf_counter()
        for path in paths:
            model(torch.from_numpy(np.array(decoder.crop(decoder.load_image(path)), dtype=np.uint8)[None]))
    return count / (time.perf_counter() - start)


# --- main ---------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30, help="length of the load phase")
    parser.add_argument("--kill-after", type=float, default=15, help="seconds into the load phase; <0: no kill")
    parser.add_argument("--model-dir", type=Path, help="serve this model (default: build a ViT-S/16 one)")
    parser.add_argument("--naive-images", type=int, default=40, help="images for the fp32 yardstick; 0 skips it")
    parser.add_argument("--slow-clients", type=int, default=3, help="slow uploads (fewer than the worker's 6 threads, so normal clients still get one)")
    parser.add_argument("--slow-seconds", type=float, default=12)
    parser.add_argument("--storm-clients", type=int, default=64)
    parser.add_argument("--storm-seconds", type=float, default=6)
    parser.add_argument("--memory-requests", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    photo_paths = sample_photos()
    photos = [p.read_bytes() for p in photo_paths]
    figures: dict = {"clients": args.clients, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp:
        work = Path(tmp)
        model_dir = args.model_dir or build_artifact(work, 40)
        if args.naive_images:
            figures["naive_fp32_rps"] = naive_fp32_throughput(model_dir, photo_paths, args.naive_images)
            print(f"naive single-stream fp32 eager: {figures['naive_fp32_rps']:.2f} images/s")

        proc, url = serve(model_dir, work / "gunicorn.log")
        try:
            run_clients(url, photos, args.clients, 3, Recorder())  # warm-up
            load_phase(url, proc, photos, args, figures)
            if args.slow_clients:
                slow_phase(url, photos, args, figures)
            if args.storm_clients:
                storm_phase(url, photos, args, figures)
            if args.memory_requests:
                memory_phase(url, proc, photos, args, figures)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def load_phase(url: str, proc, photos: list[bytes], args, figures: dict) -> None:
    """2. load, with a worker killed mid-way."""
    recorder, kill_report = Recorder(), {}
    killer = kill_one_worker_later(proc.pid, url, args.kill_after, kill_report) if args.kill_after >= 0 else None
    elapsed = run_clients(url, photos, args.clients, args.seconds, recorder)
    if killer:
        killer.join(60)
    figures["load"] = {**recorder.summary(elapsed), **kill_report}
    if figures.get("naive_fp32_rps"):
        figures["load"]["throughput_vs_naive"] = figures["load"]["throughput_rps"] / figures["naive_fp32_rps"]
    if figures["load"]["p50_ms"]:
        figures["load"]["p99_over_p50"] = figures["load"]["p99_ms"] / figures["load"]["p50_ms"]
    print_phase("load" + (f", worker {kill_report.get('killed_pid')} killed at {args.kill_after:g} s"
                          if killer else ""), figures["load"])


def slow_phase(url: str, photos: list[bytes], args, figures: dict) -> None:
    """3. slow uploads (trickled, then stalled) beside normal clients."""
    port = int(url.rsplit(":", 1)[1])
    normal = max(2, args.clients // 4)
    base = Recorder()
    figures["slow_baseline"] = base.summary(run_clients(url, photos, normal, args.slow_seconds / 2, base))
    for kind in ("trickle", "stalled"):
        stop, result = threading.Event(), {}
        slow = threading.Thread(target=lambda: result.update(slow_uploads(
            port, args.slow_clients, args.slow_seconds + 20, kind == "trickle", stop)), daemon=True)
        slow.start()
        time.sleep(1)
        rec = Recorder()
        figures[f"slow_{kind}"] = {**rec.summary(run_clients(url, photos, normal, args.slow_seconds, rec))}
        slow.join(args.slow_seconds + 25)
        stop.set()
        figures[f"slow_{kind}"].update(result)
        print_phase(f"{normal} clients beside {args.slow_clients} {kind} uploads "
                    f"(alone: p50 {figures['slow_baseline']['p50_ms']:.0f} ms)", figures[f"slow_{kind}"])


def storm_phase(url: str, photos: list[bytes], args, figures: dict) -> None:
    """4. storms: clients over the batch limit, then valid ones."""
    metadata = requests.get(f"{url}/metadata", timeout=10).json()
    over = metadata["serving"]["max_batch_files"] + 1
    rec = Recorder()
    figures["storm_over_batch_limit"] = rec.summary(
        run_clients(url, photos[:over], args.storm_clients, args.storm_seconds, rec, files_per_request=over))
    print_phase(f"{args.storm_clients} clients, {over} files each (over the batch limit)",
                figures["storm_over_batch_limit"])
    rec = Recorder()
    figures["storm_valid"] = rec.summary(run_clients(url, photos, args.storm_clients, args.storm_seconds, rec))
    print_phase(f"{args.storm_clients} clients, valid single photos", figures["storm_valid"])


def memory_phase(url: str, proc, photos: list[bytes], args, figures: dict) -> None:
    """5. the workers' memory before and after many requests."""
    pids = worker_pids(proc.pid)
    before = sum(rss_mb(p) for p in pids)
    rec = Recorder()
    run_clients(url, photos, args.clients // 2 or 1, 3600, rec, max_requests=args.memory_requests)
    after = sum(rss_mb(p) for p in worker_pids(proc.pid))
    figures["memory"] = {"requests": len(rec.results), "failed": rec.summary(1)["failed"],
                         "rss_before_mb": before, "rss_after_mb": after,
                         "growth_pct": 100 * (after - before) / before, "same_workers": pids == worker_pids(proc.pid)}
    print(f"\nmemory: workers' RSS {before:.0f} MB after warm-up, {after:.0f} MB after "
          f"{len(rec.results)} more requests ({figures['memory']['growth_pct']:+.1f}%)")


def print_phase(title: str, s: dict) -> None:
    line = (f"\n{title}:\n  {s['requests']} requests, {s['failed']} failed ({s['failed_pct']:.2f}%)"
            + (f" {s['failures']}" if s["failures"] else ""))
    if s["p50_ms"] is None and s["answer_p50_ms"] is not None:
        line += f"\n  answered in p50 {s['answer_p50_ms']:.0f} ms  p99 {s['answer_p99_ms']:.0f} ms"
    if s["p50_ms"] is not None:
        line += f"\n  p50 {s['p50_ms']:.0f} ms  p95 {s['p95_ms']:.0f} ms  p99 {s['p99_ms']:.0f} ms  {s['throughput_rps']:.1f} req/s"
    for key, label in (("p99_over_p50", "p99/p50 {:.2f}"), ("throughput_vs_naive", "throughput / naive fp32 {:.2f}x"),
                       ("recovered_s", "/ready from a new worker {:.2f} s after the kill"),
                       ("closed_by_server", "slow uploads closed by the server: {}"), ("closed_after_s", "after ~{} s")):
        if s.get(key) is not None:
            line += "\n  " + label.format(s[key])
    print(line)


if __name__ == "__main__":
    main()
