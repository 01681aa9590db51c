"""Batch prediction's throughput locally against a two-node Ray cluster on the same box, and
what one Ray node costs, in one run.

    .venv/bin/python benchmarks/bench_ray.py --model-dir M [--photos DIR] [--copies 10]

The photos (default: the sample, ../shared/data/car-bike-sample) are copied `--copies` times
into a temporary folder, so that both runs last long enough to measure. Each run is the batch
command as a subprocess, start-up included (for Ray: connecting, starting the actors, loading
the model in each). The cluster is harness/ray_cluster.py's: a head and a worker node, 2
logical CPUs each, on loopback inside `unshare -n` (this script re-runs itself there). Prints
img/s for each, their ratio, and per node its start time and resident memory at rest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from harness import ray_cluster as cluster

REPO = Path(__file__).resolve().parents[1]

SAMPLE = REPO.parent / "shared" / "data" / "car-bike-sample"


def copies(source: Path, target: Path, count: int) -> int:
    """`count` copies of every photo under `source` in `target`; how many photos."""
    photos = [p for p in sorted(source.rglob("*")) if p.is_file()]
    for n in range(count):
        for i, photo in enumerate(photos):
            shutil.copyfile(photo, target / f"{n:03d}-{i:05d}{photo.suffix}")
    return len(photos) * count


def timed_batch(photos: Path, model_dir: Path, output: Path, ray: str | None) -> float:
    command = [sys.executable, "-m", "vehicle_classifier.offline.batch", str(photos), "--model-dir",
               str(model_dir), "--output", str(output), *(["--ray", ray] if ray else [])]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=cluster.ENV, check=True, capture_output=True)
    return time.perf_counter() - start


def node_memory_mb(node: subprocess.Popen) -> float:
    tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    return sum(p.memory_info().rss for p in tree) / 2**20


def measure(args: argparse.Namespace) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory(prefix="bench-ray") as temp, \
            tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_temp:  # short: Ray's socket paths
        photos = Path(temp) / "photos"
        photos.mkdir()
        total = copies(args.photos, photos, args.copies)
        local = timed_batch(photos, args.model_dir, Path(temp) / "local.csv", None)
        start = time.perf_counter()
        nodes, port = cluster.start_cluster(ray_temp)
        started = time.perf_counter() - start
        try:
            memory = [node_memory_mb(node) for node in nodes]
            on_ray = timed_batch(photos, args.model_dir, Path(temp) / "ray.parquet", f"127.0.0.1:{port}")
        finally:
            cluster.stop(nodes)
    print(f"photos: {total}; cores this process may use: {len(os.sched_getaffinity(0))}")
    print(f"local:            {total / local:7.1f} img/s ({local:.1f} s, start-up included)")
    print(f"ray, 2 nodes:     {total / on_ray:7.1f} img/s ({on_ray:.1f} s, start-up included)")
    print(f"ratio ray/local:  {local / on_ray:7.2f}x")
    print(f"per node: cluster of 2 up in {started:.1f} s; resident memory at rest "
          f"head {memory[0]:.0f} MB, worker {memory[1]:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--photos", type=Path, default=SAMPLE)
    parser.add_argument("--copies", type=int, default=10)
    args = parser.parse_args()
    if os.environ.get("BENCH_RAY_IN_NAMESPACE") != "1":  # keep Ray on loopback: run in a namespace of its own
        os.environ["BENCH_RAY_IN_NAMESPACE"] = "1"
        os.execvp("unshare", ["unshare", "-n", sys.executable, *sys.argv])
    measure(args)


if __name__ == "__main__":
    main()
