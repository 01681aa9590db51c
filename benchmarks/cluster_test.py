"""Attacks and faults through the proxy: `make cluster` (nginx in front of gunicorn replicas) on
loopback, real photos. Bounded in count and time; stops everything it started by itself.

    .venv/bin/python benchmarks/cluster_test.py                # the full run (~3 minutes)
    .venv/bin/python benchmarks/cluster_test.py --seconds 10 --slow 20

Phases, each with --clients normal clients posting photos (one connection per request):
  1. slow: --slow connections each sending their header a byte a second, as many sending a body
     a byte a second, and as many sending nothing, held (reopened when the proxy closes them)
     for --seconds beside 2 normal clients;
  2. worker: a replica's gunicorn worker SIGKILLed half-way;
  3. master: a replica's gunicorn master SIGKILLed half-way (the cluster replaces the replica);
  4. reload: a new artifact written into the model folder and `make reload` run a third of the
     way in; the new version must be served by every replica after.
Prints figures; with --json also writes them to a file (the test suite runs a reduced version).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import pss_mb, rss_mb, worker_pids  # noqa: E402
from load_test import Recorder, print_phase, run_clients  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vehicle_classifier.serving.cluster import free_port  # noqa: E402
from vehicle_classifier.config import ARTIFACT_FILE, SAMPLE_DIR  # noqa: E402


# --- the cluster --------------------------------------------------------------------------------
def start_cluster(model_dir: Path, run_dir: Path, replicas: int, log: Path,
                  settings: dict | None = None) -> tuple[subprocess.Popen, dict, str]:
    """`make cluster` on a free port; returns once it serves. `settings`: more environment."""
    port = free_port()
    env = {**os.environ, "PORT": str(port), "CLUSTER_HOST": "127.0.0.1", "REPLICAS": str(replicas),
           "MODEL_DIR": str(model_dir), "CLUSTER_DIR": str(run_dir), **(settings or {})}
    proc = subprocess.Popen([sys.executable, "-m", "vehicle_classifier.serving.cluster", "serve"], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    state_file = run_dir / str(port) / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"make cluster exited:\n{log.read_text()[-3000:]}")
        if state_file.exists():
            return proc, env, f"http://127.0.0.1:{port}"
        time.sleep(0.3)
    sys.exit("the cluster was not serving within 300 s")


def state(env: dict) -> dict:
    return json.loads((Path(env["CLUSTER_DIR"]) / env["PORT"] / "state.json").read_text())


def stop_cluster(proc: subprocess.Popen) -> float:
    """SIGTERM, as Ctrl-C or a service manager would; seconds until everything exited."""
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    return time.perf_counter() - started


# --- attackers ----------------------------------------------------------------------------------
SLOW_HEADER = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
SLOW_BODY = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
             b"Content-Length: 2097152\r\n\r\n\xff\xd8\xff")


class Attackers:
    """`count` connections of each kind, a byte a second each, reopened when the proxy closes one."""

    KINDS = {"slow_header": (SLOW_HEADER, b"a"), "slow_body": (SLOW_BODY, b"\x00"), "silent": (b"", b"")}

    def __init__(self, port: int, count: int):
        self.port, self.count = port, count
        self.socks: dict[str, list[socket.socket]] = {kind: [] for kind in self.KINDS}
        self.closed = {kind: 0 for kind in self.KINDS}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, kind: str) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if self.KINDS[kind][0]:
            s.sendall(self.KINDS[kind][0])
        s.setblocking(False)
        self.socks[kind].append(s)

    def _tick(self, kind: str) -> None:
        for s in list(self.socks[kind]):
            try:
                if self.KINDS[kind][1]:
                    s.send(self.KINDS[kind][1])
                try:
                    s.recv(4096)  # an answer (408, 429) or end of stream: the proxy is done with it
                    raise ConnectionResetError
                except BlockingIOError:
                    continue
            except OSError:
                self.closed[kind] += 1
                self.socks[kind].remove(s)
                s.close()
        while len(self.socks[kind]) < self.count and not self.stop_event.is_set():
            self._open(kind)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            for kind in self.KINDS:
                self._tick(kind)
            self.stop_event.wait(1.0)

    def __enter__(self) -> "Attackers":
        for kind in self.KINDS:
            for _ in range(self.count):
                self._open(kind)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(10)
        for s in (s for socks in self.socks.values() for s in socks):
            s.close()

    def held(self) -> int:
        return sum(len(s) for s in self.socks.values())


# --- faults -------------------------------------------------------------------------------------
def later(after: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(after), action()), daemon=True)
    thread.start()
    return thread


def new_artifact(model_dir: Path) -> str:
    """Publish a different model (the head's weights moved a little) into model_dir as training
    does: the artifact, its "neither" references and its exported backbone, as one set (a
    reload then serves the exported model, not one converted from torch at start); its version."""
    import torch

    from vehicle_classifier.artifact import OOD_REFERENCES, encode_artifact, load_artifact
    from vehicle_classifier.export import export_files
    from vehicle_classifier.fileio import publish

    model = load_artifact(model_dir / ARTIFACT_FILE)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    metadata = {k: v for k, v in model.metadata.items() if k not in ("model_version", "created_at")}
    extra = None if model.ood_references is None else {OOD_REFERENCES: model.ood_references}
    data, stored = encode_artifact(model.backbone, model.head, metadata, extra)
    publish(model_dir, {ARTIFACT_FILE: data, **export_files(model.backbone, stored)})
    return stored["model_version"]


def run_reload(env: dict, report: dict) -> None:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vehicle_classifier.serving.cluster", "reload"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    report.update(reload_rc=done.returncode, reload_s=time.perf_counter() - started,
                  reload_output=(done.stdout + done.stderr).strip().splitlines()[-1:])


def served_versions(url: str, tries: int = 20) -> list[str]:
    """The versions /metadata reports through the proxy (round-robin: every replica in turn)."""
    return sorted({requests.get(f"{url}/metadata", timeout=10).json()["model_version"] for _ in range(tries)})


def served_models(url: str, tries: int = 20) -> list[str]:
    """Which backbone the replicas run, as /metadata says: "exported" (the OpenVINO files beside
    the artifact), "converted" (from torch at start: they are missing or of another model)."""
    return sorted({requests.get(f"{url}/metadata", timeout=10).json()["serving"]["model"] for _ in range(tries)})


def memory(env: dict) -> list[dict]:
    out = []
    for replica in state(env)["replicas"]:
        pids = [replica["pid"], *worker_pids(replica["pid"])]
        out.append({"rss_mb": sum(rss_mb(p) for p in pids), "pss_mb": sum(pss_mb(p) for p in pids)})
    return out


# --- phases -------------------------------------------------------------------------------------
def phase_slow(url: str, photos: list[bytes], count: int, seconds: float) -> dict:
    port = int(url.rsplit(":", 1)[1])
    with Attackers(port, count) as attackers:
        time.sleep(1)
        rec = Recorder()
        elapsed = run_clients(url, photos, 2, seconds, rec)
        held = attackers.held()
    return {**rec.summary(elapsed), "attackers_per_kind": count, "held_at_end": held,
            "closed_by_proxy": attackers.closed}


def phase_kill(url: str, env: dict, photos: list[bytes], clients: int, seconds: float, what: str) -> dict:
    replica = state(env)["replicas"][0]
    victim = worker_pids(replica["pid"])[0] if what == "worker" else replica["pid"]
    report = {"killed": what, "killed_pid": victim}
    killer = later(seconds / 2, lambda: os.kill(victim, signal.SIGKILL))
    rec = Recorder()
    elapsed = run_clients(url, photos, clients, seconds, rec)
    killer.join()
    deadline = time.monotonic() + 120  # the cluster replaces a dead replica: wait until it has
    while what == "master" and time.monotonic() < deadline \
            and replica["pid"] in [r["pid"] for r in state(env)["replicas"]]:
        time.sleep(0.3)
    report["replicas_after"] = [r["pid"] for r in state(env)["replicas"]]
    return {**rec.summary(elapsed), **report}


def phase_reload(url: str, env: dict, photos: list[bytes], clients: int, seconds: float) -> dict:
    """The load runs at least `seconds`, and until 3 s after the rollout ended: all of it under load."""
    before = served_versions(url)
    report: dict = {"version_before": before, "version_new": new_artifact(Path(env["MODEL_DIR"]))}
    finished = threading.Event()
    started = time.perf_counter()

    def reload_then_stop():
        time.sleep(seconds / 3)
        try:
            run_reload(env, report)
        finally:
            time.sleep(max(3.0, seconds - (time.perf_counter() - started)))
            finished.set()

    reloader = threading.Thread(target=reload_then_stop, daemon=True)
    reloader.start()
    rec = Recorder()
    elapsed = run_clients(url, photos, clients, 900, rec, stop=finished)
    reloader.join(60)
    report["versions_after"] = served_versions(url)
    report["models_after"] = served_models(url)
    return {**rec.summary(elapsed), **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16, help="normal clients in the fault phases")
    parser.add_argument("--seconds", type=float, default=30, help="length of each phase")
    parser.add_argument("--slow", type=int, default=50, help="attacking connections of each kind")
    parser.add_argument("--model-dir", type=Path, help="serve a copy of this model (default: build a ViT-S/16 one)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    photos = [p.read_bytes() for d in sorted(SAMPLE_DIR.glob("*/")) for p in sorted(d.iterdir())[:20]]
    if not photos:
        sys.exit(f"no sample photos at {SAMPLE_DIR}")
    figures: dict = {"replicas": args.replicas, "clients": args.clients, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="cluster-test-") as tmp:
        work = Path(tmp)
        model_dir = work / "served"
        if args.model_dir:
            shutil.copytree(args.model_dir, model_dir)
        else:
            from bench_service import build_artifact

            shutil.copytree(build_artifact(work, 40), model_dir)
        log = work / "cluster.log"
        started = time.perf_counter()
        proc, env, url = start_cluster(model_dir, work / "run", args.replicas, log)
        figures["start_s"] = time.perf_counter() - started
        try:
            run_phases(url, env, photos, args, figures)
        finally:
            figures["stop_s"] = stop_cluster(proc)
            figures["cluster_log_tail"] = log.read_text(errors="replace").splitlines()[-12:]
    print(f"\nstopped in {figures['stop_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def run_phases(url: str, env: dict, photos: list[bytes], args, figures: dict) -> None:
    print(f"cluster of {args.replicas} replicas serving at {url} after {figures['start_s']:.1f} s")
    run_clients(url, photos, args.clients, 3, Recorder())  # warm-up
    figures["memory_per_replica"] = memory(env)
    print("memory per replica (master + workers): " + ", ".join(
        f"RSS {m['rss_mb']:.0f} MB, PSS {m['pss_mb']:.0f} MB" for m in figures["memory_per_replica"]))

    figures["slow"] = phase_slow(url, photos, args.slow, args.seconds)
    print_phase(f"2 clients beside {args.slow} slow-header + {args.slow} slow-body + {args.slow} silent "
                f"connections (closed by the proxy: {figures['slow']['closed_by_proxy']})", figures["slow"])
    for what in ("worker", "master"):
        figures[f"kill_{what}"] = phase_kill(url, env, photos, args.clients, args.seconds, what)
        print_phase(f"{args.clients} clients, a replica's {what} SIGKILLed at {args.seconds / 2:g} s",
                    figures[f"kill_{what}"])
        if what == "worker":  # the other replica has served the whole load by now
            figures["memory_after_load"] = memory(env)
            print("after the load, per replica: " + ", ".join(
                f"RSS {m['rss_mb']:.0f} MB, PSS {m['pss_mb']:.0f} MB" for m in figures["memory_after_load"]))
    figures["reload"] = phase_reload(url, env, photos, args.clients, args.seconds)
    r = figures["reload"]
    print_phase(f"{args.clients} clients, make reload at {args.seconds / 3:g} s: {r['version_before']} -> "
                f"{r['versions_after']} ({', '.join(r['models_after'])} model) in {r.get('reload_s', 0):.1f} s "
                f"({r.get('reload_output')})", r)


if __name__ == "__main__":
    main()
