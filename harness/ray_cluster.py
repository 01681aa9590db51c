"""Run inside `unshare -n` by test_ray_batch.py: a two-node Ray cluster on loopback only (a head
and a worker node, each its own `ray start --block`), the batch command run against it, once
plainly and once with the worker node's raylet SIGKILLed two seconds in (plus at most one
rerun). Prints one JSON line: each run's exit codes. Every Ray process is ended by its PID.

    python harness/ray_cluster.py SPEC.json      SPEC: {"inputs": [...], "model_dir": ..., "out": DIR}
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from harness.net import free_port

RAY = str(Path(sys.executable).with_name("ray"))
ENV = os.environ | {"RAY_USAGE_STATS_ENABLED": "0",
                    # no token: nothing outside this loopback-only namespace can reach the cluster
                    "RAY_AUTH_MODE": "disabled",
                    # a dead node is noticed in ~3 s rather than ~15 s: the fault test's wall time
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def start_cluster(temp: str) -> tuple[list[subprocess.Popen], int]:
    """The head and the worker node, 2 logical CPUs each; (their `ray start` processes, port)."""
    port = free_port()
    common = ["--num-cpus=2", "--disable-usage-stats", "--block", "--node-ip-address=127.0.0.1"]
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--object-store-memory=300000000",
                             f"--temp-dir={temp}", "--include-dashboard=false", *common], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = [head]
    try:
        wait_for_nodes(port, 1, head)
        nodes.append(subprocess.Popen([RAY, "start", f"--address=127.0.0.1:{port}",
                                       "--object-store-memory=300000000", *common], env=ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_nodes(port, 2, head)
    except BaseException:
        stop(nodes)
        raise
    return nodes, port


def wait_for_nodes(port: int, count: int, head: subprocess.Popen, timeout: float = 90) -> None:
    """Until the cluster has `count` live nodes (asked of the GCS by a short driver)."""
    probe = ("import ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))" % port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and head.poll() is None:
        done = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=60)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the cluster did not reach {count} nodes")


def stop(nodes: list[subprocess.Popen]) -> None:
    """SIGKILL each node's `ray start` and everything under it, by PID (never `ray stop`)."""
    for node in reversed(nodes):
        try:
            tree = psutil.Process(node.pid).children(recursive=True) + [psutil.Process(node.pid)]
        except psutil.NoSuchProcess:
            continue
        for process in tree:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        node.wait()


def raylet_of(node: subprocess.Popen) -> psutil.Process:
    return next(p for p in psutil.Process(node.pid).children(recursive=True) if p.name() == "raylet")


def batch(spec: dict, port: int, output: str, after=None) -> int:
    """The batch command against the cluster; `after(seconds_in)` is called once at ~2 s."""
    command = [sys.executable, "-m", "vehicle_classifier.offline.batch", *spec["inputs"], "--model-dir",
               spec["model_dir"], "--features", "--ray", f"127.0.0.1:{port}", "--output", output]
    with open(Path(output).with_suffix(".log"), "a") as log:
        run = subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        if after is not None:
            time.sleep(2)
            after()
        return run.wait(timeout=300)


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    out = Path(spec["out"])
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as temp:
        nodes, port = start_cluster(temp)
        try:
            plain = batch(spec, port, str(out / "plain.parquet"))
            raylet = raylet_of(nodes[1])
            killed = [batch(spec, port, str(out / "killed.parquet"), after=lambda: os.kill(raylet.pid, signal.SIGKILL))]
            if killed[0] not in (0, 1):  # the one rerun the fault may cost (1: unreadable files, as asked)
                killed.append(batch(spec, port, str(out / "killed.parquet")))
        finally:
            stop(nodes)
    print(json.dumps({"plain": plain, "killed": killed}))


if __name__ == "__main__":
    main(sys.argv[1])
