"""The service's start to ready, and its memory, with the exported model and without it:

    .venv/bin/python benchmarks/bench_start.py [--start-rounds 2] [--train-per-class 40]

Builds the ViT-S/16 random-weights artifact (common.build_artifact), then starts `gunicorn
predict:app` (gunicorn.conf.py defaults) --start-rounds times each, in turn, on the model folder
as training writes it (the exported backbone.xml/.bin beside the artifact) and on
model.safetensors alone in a folder (a model from before export: torch loads it and converts
the backbone at start); /metadata says which the service ran. For each: seconds from start until
/ready answers 200 (a worker has compiled and warmed up), and after 10 requests the RSS of
master and workers, the PSS of both summed, and whether each loaded torch. Medians, and the
converted / exported ratios. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import requests
from tqdm.auto import tqdm

from common import (build_artifact, cpu_flags_line, loads_torch, multipart, photo_1920x1080, post, pss_mb, rss_mb,
                    sample_photos, worker_pids)
from harness.live import start_gunicorn, stop
from vehicle_classifier import config

SOURCES = (("exported", "the exported model (backbone.xml/.bin beside the artifact)"),
           ("converted", "model.safetensors alone (converted from torch at start)"))


def memory(master: int) -> dict:
    """RSS and PSS (MiB) of the gunicorn master and its workers, and whether each loaded torch."""
    workers = worker_pids(master)
    return {"master_rss": rss_mb(master), "worker_rss": sum(rss_mb(w) for w in workers),
            "total_pss": pss_mb(master) + sum(pss_mb(w) for w in workers),
            "torch": {"master": loads_torch(master), "workers": any(loads_torch(w) for w in workers)}}


def one_start(folder: Path, source: str, log: Path, body: tuple[bytes, str]) -> dict:
    proc, url, seconds = start_gunicorn(folder, log, timeout=300)
    try:
        served = requests.get(f"{url}/metadata", timeout=10).json()["serving"]["model"]
        if served != source:
            sys.exit(f"the service ran the {served} model from {folder}, not the {source} one")
        for _ in range(10):
            post(url, body)
        return {"ready_s": seconds, **memory(proc.pid)}
    finally:
        stop(proc)


def start_costs(model_dir: Path, work: Path, rounds: int) -> dict[str, list[dict]]:
    """The service started `rounds` times on each model folder, in turn."""
    converted = work / "artifact-alone"
    converted.mkdir()
    shutil.copy2(model_dir / config.ARTIFACT_FILE, converted)
    body = multipart(photo_1920x1080(sample_photos())[0])
    costs: dict[str, list[dict]] = {"exported": [], "converted": []}
    for _ in tqdm(range(rounds), desc="start to ready", unit="round", leave=False):
        for source, folder in (("exported", model_dir), ("converted", converted)):
            costs[source].append(one_start(folder, source, work / f"gunicorn-{source}.log", body))
    return costs


def print_start(costs: dict[str, list[dict]]) -> dict:
    """Medians over the rounds, and the converted / exported ratios; returns the medians."""
    medians = {source: {key: statistics.median(c[key] for c in costs[source])
                        for key in ("ready_s", "worker_rss", "master_rss", "total_pss")} for source, _ in SOURCES}
    print(f"\nservice start (gunicorn defaults, median of {len(costs['exported'])} start(s) each, "
          f"memory after 10 requests):")
    for source, what in SOURCES:
        m, torch_in = medians[source], costs[source][0]["torch"]
        print(f"  {what}: ready in {m['ready_s']:.1f} s; worker RSS {m['worker_rss']:.0f} MiB, master RSS "
              f"{m['master_rss']:.0f} MiB, both PSS {m['total_pss']:.0f} MiB; torch loaded: master "
              f"{'yes' if torch_in['master'] else 'no'}, worker {'yes' if torch_in['workers'] else 'no'}")
    print("  converted / exported: " + ", ".join(
        f"{label} {medians['converted'][key] / medians['exported'][key]:.2f}x"
        for label, key in (("start to ready", "ready_s"), ("worker RSS", "worker_rss"),
                           ("master RSS", "master_rss"), ("both PSS", "total_pss"))))
    return medians


def run_start(model_dir: Path, work: Path, rounds: int) -> dict:
    return print_start(start_costs(model_dir, work, rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start-rounds", type=int, default=2, help="starts of each kind (exported, converted)")
    parser.add_argument("--train-per-class", type=int, default=40, help="photos per class to train the head on")
    args = parser.parse_args()
    print(cpu_flags_line())
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        work = Path(tmp)
        run_start(build_artifact(work, args.train_per_class), work, args.start_rounds)


if __name__ == "__main__":
    main()
