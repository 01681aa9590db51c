"""The containers on a real Docker engine: image sizes, one predict replica from container start to
/ready, and `docker compose up` to the first answer through the proxy, beside the figures of
issue 20 before the serving image lost torch (6.37 GB, 6.1 s, 22.6 s).

    .venv/bin/python benchmarks/bench_containers.py [--model-dir models] [--runs 3]

As root, with the engine and Compose installed (scripts/setup.sh --system): starts dockerd when
none runs (and stops it after), builds the stand-in base images when the real ones cannot be
pulled (tests/containers), builds the repository's images with `docker compose build`, then,
--runs times each, with nothing of the project running before:
  1. one replica (`REPLICAS=1 docker compose up --no-deps predict`): from the container's start
     (the engine's StartedAt) to the first 200 from /ready, polled every 20 ms at the
     container's address;
  2. the whole stack (`docker compose up`, two replicas, proxy, page): from the command to the
     first 200 from POST /predict through the proxy (a real photo), polled every 50 ms.
Without --model-dir, the model is ViT-S/16 with random weights (the DINO architecture the
service defaults to) and a head trained on 20 sample photos per class. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
from harness import docker_stack as ds
from harness.live import free_port

from vehicle_classifier import config

BEFORE = {"predict image": "6.37 GB", "start to /ready": "6.1 s", "compose up to first answer": "22.6 s"}
PROJECT = "vehicle-classifier-bench"


def started_at(container: dict) -> float:
    """The engine's StartedAt (RFC 3339, nanoseconds) as a Unix time."""
    stamp = container["State"]["StartedAt"]
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float(f"0.{fraction or 0}")


def address(container: dict) -> str:
    (network,) = container["NetworkSettings"]["Networks"].values()
    return network["IPAddress"]


def poll(fn, timeout: float, every: float) -> float:
    """Call `fn` until it returns True; the Unix time when it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if fn():
                return time.time()
        except requests.RequestException:
            pass
        time.sleep(every)
    raise TimeoutError(f"not ready within {timeout:g} s")


def replica_start_to_ready(stack: ds.Stack) -> float:
    stack.compose("up", "--detach", "--no-deps", "predict")
    try:
        deadline = time.monotonic() + 30
        while not (containers := stack.containers("predict")) or not containers[0]["State"]["Running"]:
            assert time.monotonic() < deadline, "the replica did not start"
            time.sleep(0.02)
        (container,) = containers
        url = f"http://{address(container)}:{config.DEFAULT_PORT}/ready"
        ready = poll(lambda: requests.get(url, timeout=1).status_code == 200, 120, 0.02)
        return ready - started_at(container)
    finally:
        stack.down()


def up_to_first_answer(stack: ds.Stack, proxy: str, photo: Path) -> tuple[float, float]:
    """(seconds to the first answer through the proxy, seconds until `up --wait` returned)."""
    started = time.time()
    up = subprocess.Popen(["docker", "compose", "--project-name", stack.project, "--file", str(ds.COMPOSE_FILE),
                           "up", "--detach", "--wait"], cwd=REPO, env=stack.env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        files = {"file": (photo.name, photo.read_bytes())}
        answered = poll(lambda: requests.post(f"{proxy}/predict", files=files, timeout=5).status_code == 200,
                        180, 0.05)
        up.wait(timeout=180)
        return answered - started, time.time() - started
    finally:
        stack.down()


def model(work: Path) -> Path:
    from common import build_artifact  # beside this script

    return build_artifact(work, per_class=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a trained model (default: ViT-S/16, random weights)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if reason := ds.unavailable():
        sys.exit(f"cannot run the containers here: {reason}")
    photo = sorted((config.SAMPLE_DIR / "Car").iterdir())[0]

    with tempfile.TemporaryDirectory() as tmp, ds.running_engine(Path(tmp) / "dockerd.log"):
        model_dir = args.model_dir.resolve() if args.model_dir else model(Path(tmp))
        ports = {"PORT": free_port(), "PAGE_PORT": free_port()}
        stack = ds.Stack(PROJECT, {"MODEL_DIR": str(model_dir), **{k: str(v) for k, v in ports.items()}})
        print(f"base images: {ds.ensure_base_images()}")
        stack.down()
        started = time.perf_counter()
        stack.build()
        print(f"docker compose build: {time.perf_counter() - started:.1f} s (layers cached from earlier runs reused)")

        sizes = {image: ds.image_size_mb(image) for image in ("vehicle-classifier-predict", "vehicle-classifier-page")}
        one_replica = ds.Stack(PROJECT, {**stack.env, "REPLICAS": "1"})
        starts = [replica_start_to_ready(one_replica) for _ in range(args.runs)]
        ups = [up_to_first_answer(stack, f"http://127.0.0.1:{ports['PORT']}", photo) for _ in range(args.runs)]

    print(f"\n{'':34} {'now':>12} {'issue 20 (before)':>18}")
    print(f"{'predict image':34} {sizes['vehicle-classifier-predict']:>9.0f} MB {BEFORE['predict image']:>18}")
    print(f"{'page image':34} {sizes['vehicle-classifier-page']:>9.0f} MB {'':>18}")
    print(f"{'one replica: start to /ready':34} {statistics.median(starts):>10.2f} s {BEFORE['start to /ready']:>18}"
          f"   (runs: {', '.join(f'{s:.2f}' for s in starts)})")
    first = [a for a, _ in ups]
    print(f"{'compose up to first answer':34} {statistics.median(first):>10.2f} s "
          f"{BEFORE['compose up to first answer']:>18}   (runs: {', '.join(f'{s:.2f}' for s in first)})")
    print(f"{'compose up --wait returns':34} {statistics.median(w for _, w in ups):>10.2f} s")


if __name__ == "__main__":
    main()
