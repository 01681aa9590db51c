"""make cluster / make reload for real: nginx (Debian's) in front of gunicorn replicas serving the
tiny model on loopback. The proxy's template is checked by nginx itself, with the values of
both deployments that use it (make cluster and compose); a reduced run of
benchmarks/cluster_test.py puts attackers, killed processes and a rollout beside normal clients."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import REPO, sample_photos
from live_service import free_port, wait_for

from vehicle_classifier import cluster
from vehicle_classifier.config import ARTIFACT_FILE, NGINX_TEMPLATE, ClusterConfig

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx not installed (make test installs Debian's as root)")
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def nginx_accepts(conf: str, prefix: Path) -> subprocess.CompletedProcess:
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(conf)
    return subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
                          capture_output=True, text=True, timeout=30)


@needs_nginx
def test_one_template_serves_make_cluster_and_compose(tmp_path):
    template = NGINX_TEMPLATE.read_text()
    cfg = ClusterConfig(port=free_port(), host="127.0.0.1")
    site = cluster.render(template, cluster.site_values(cfg, [free_port(), free_port()]))
    assert not re.search(r"\$\{\w+\}", site) and "$binary_remote_addr" in site  # nginx's own variables left alone
    check = nginx_accepts(cluster.nginx_conf(tmp_path / "local", site), tmp_path / "local")
    assert check.returncode == 0, check.stderr

    # compose: the official image fills the template from the proxy's environment; every
    # placeholder has a value there, and the result is a site nginx accepts (the replicas'
    # compose name stands for loopback here).
    proxy = COMPOSE["services"]["proxy"]
    source, target, mode = proxy["volumes"][0].split(":")
    assert (REPO / source).resolve() == NGINX_TEMPLATE and mode == "ro"
    assert target == "/etc/nginx/templates/default.conf.template"  # replaces the image's default site
    env = {k: str(v) for k, v in proxy["environment"].items()}
    assert env["MAX_UPLOAD_MB"] == str(COMPOSE["services"]["predict"]["environment"]["MAX_UPLOAD_MB"])
    site = cluster.render(template, env).replace("server predict:", "server 127.0.0.1:")
    check = nginx_accepts(cluster.nginx_conf(tmp_path / "compose", site), tmp_path / "compose")
    assert check.returncode == 0, check.stderr
    with pytest.raises(KeyError, match="no value for"):
        cluster.render(template, {})


def test_reload_without_a_cluster_says_so_in_one_line(tmp_path, tiny_model_dir):
    env = {**os.environ, "PORT": str(free_port()), "CLUSTER_DIR": str(tmp_path), "MODEL_DIR": str(tiny_model_dir)}
    done = subprocess.run([sys.executable, "-m", "vehicle_classifier.cluster", "reload"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: no cluster is running on port {env['PORT']} "
                                                "(start one with: make cluster)"]


def pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@needs_nginx
def test_cluster_refuses_a_damaged_rollout_limits_uploads_and_stops_everything(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "REPLICAS": "1", "MODEL_DIR": str(model_dir),
           "CLUSTER_DIR": str(tmp_path / "run"), "MAX_UPLOAD_MB": "1", "GUNICORN_THREADS": "2"}
    url, log = f"http://127.0.0.1:{port}", tmp_path / "cluster.log"
    proc = subprocess.Popen([sys.executable, "-m", "vehicle_classifier.cluster", "serve"], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        state_file = tmp_path / "run" / str(port) / "state.json"
        deadline = time.monotonic() + 180
        while not state_file.exists():  # written once the cluster serves
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        state = json.loads(state_file.read_text())
        wait_for(f"{url}/ready", timeout=10)
        version = requests.get(f"{url}/metadata", timeout=10).json()["model_version"]

        # Over the upload limit: nginx answers 413 in the service's JSON shape.
        big = requests.post(f"{url}/predict", data=b"\xff" * (2 * 1024 * 1024),
                            headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert big.status_code == 413 and "1 MB" in big.json()["error"]

        # A damaged artifact: refused in one line before any replica is touched.
        (model_dir / ARTIFACT_FILE).write_bytes(b"not a model")
        done = subprocess.run([sys.executable, "-m", "vehicle_classifier.cluster", "reload"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stdout + done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("error: ") and ARTIFACT_FILE in line and "Traceback" not in done.stderr
        assert requests.get(f"{url}/metadata", timeout=10).json()["model_version"] == version
        assert json.loads(state_file.read_text())["replicas"] == state["replicas"]

        # SIGHUP on a gunicorn replica restarts its workers with the model it has, and says so.
        os.kill(state["replicas"][0]["pid"], signal.SIGHUP)
        deadline = time.monotonic() + 30
        replica_log = tmp_path / "run" / str(port) / "replica-1.log"
        while "SIGHUP: workers restart with the model loaded at start" not in replica_log.read_text():
            assert time.monotonic() < deadline, replica_log.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C or a service manager would
        proc.wait(timeout=60)
    assert "cluster: stopped" in log.read_text()
    pgids = [r["pid"] for r in state["replicas"]]
    assert not any(pgid_alive(p) for p in pgids), "a replica outlived the cluster"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=5)  # nginx is gone too
    assert not state_file.exists()


@needs_nginx
def test_proxy_keeps_normal_clients_served_through_attacks_kills_and_a_rollout(tmp_path, tiny_model_dir):
    """A reduced cluster_test.py: 3 x 10 attacking connections, a worker and a master
    SIGKILLed, a rollout, each beside normal clients for a few seconds."""
    sample_photos()  # skips without the real photos
    out = tmp_path / "figures.json"
    env = {**os.environ, "GUNICORN_THREADS": "3"}
    result = subprocess.run(
        [sys.executable, "benchmarks/cluster_test.py", "--model-dir", str(tiny_model_dir), "--replicas", "2",
         "--clients", "6", "--seconds", "6", "--slow", "10", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())

    slow = figures["slow"]
    assert slow["requests"] > 5 and slow["failed"] == 0, slow
    assert slow["held_at_end"] == 30, slow  # the attackers were held open, not turned away
    for what in ("kill_worker", "kill_master"):
        phase = figures[what]
        # The requests the killed process held are retried on the other replica by nginx.
        assert phase["requests"] > 10 and phase["failed"] == 0, phase
    assert figures["kill_master"]["killed_pid"] not in figures["kill_master"]["replicas_after"]
    assert len(figures["kill_master"]["replicas_after"]) == 2  # the dead replica was replaced

    rollout = figures["reload"]
    assert rollout["reload_rc"] == 0, rollout
    assert rollout["failed"] == 0, rollout
    assert rollout["version_before"] != [rollout["version_new"]]
    assert rollout["versions_after"] == [rollout["version_new"]], rollout
    assert figures["stop_s"] < 30
