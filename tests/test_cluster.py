"""make cluster / make reload for real: nginx (Debian's) in front of gunicorn replicas serving the
tiny model on loopback. The proxy's template is checked by nginx itself, with the values of
both deployments that use it (make cluster and compose); then one cluster goes through the
phases of benchmarks/cluster_test.py, shorter: attackers, a killed worker and a killed replica,
a refused and a good rollout, each beside normal clients; and it stops on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from conftest import REPO, sample_photos
from live_service import free_port

from vehicle_classifier.serving import cluster
from vehicle_classifier.config import ARTIFACT_FILE, NGINX_TEMPLATE, ClusterConfig

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx not installed (make test installs Debian's as root)")
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
sys.path.insert(0, str(REPO / "benchmarks"))
import cluster_test as bench  # noqa: E402  (the benchmark's phases, run shorter here)


def nginx_accepts(conf: str, prefix: Path) -> subprocess.CompletedProcess:
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(conf)
    args = [NGINX, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


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


@needs_nginx
def test_cluster_on_a_busy_port_stops_at_once_with_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "PORT": str(port), "CLUSTER_HOST": "127.0.0.1", "CLUSTER_DIR": str(tmp_path)}
        done = subprocess.run([sys.executable, "-m", "vehicle_classifier.serving.cluster", "serve"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port} (Address already in use); "
                                                "choose another PORT"]
    assert not list(tmp_path.glob("*/replica-*.log"))  # no replica was started


def test_reload_without_a_cluster_says_so_in_one_line(tmp_path, tiny_model_dir):
    env = {**os.environ, "PORT": str(free_port()), "CLUSTER_DIR": str(tmp_path), "MODEL_DIR": str(tiny_model_dir)}
    done = subprocess.run([sys.executable, "-m", "vehicle_classifier.serving.cluster", "reload"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: no cluster is running on port {env['PORT']} "
                                                "(start one with: make cluster)"]


# --- one cluster (2 replicas, tiny model) for the rest of this module, in the order below ------
@pytest.fixture(scope="module")
def running(tmp_path_factory, tiny_model_dir):
    if NGINX is None:
        pytest.skip("nginx not installed (make test installs Debian's as root)")
    work = tmp_path_factory.mktemp("cluster")
    model_dir = work / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    log = work / "cluster.log"
    # HOME: where gunicorn 27 puts its control socket by default, ~/.gunicorn/gunicorn.ctl, while
    # it runs (none is wanted; checked below).
    (work / "home").mkdir()
    settings = {"MAX_UPLOAD_MB": "2", "GUNICORN_THREADS": "3", "HOME": str(work / "home"), "XDG_RUNTIME_DIR": ""}
    proc, env, url = bench.start_cluster(model_dir, work / "run", 2, log, settings)
    photos = [p.read_bytes() for p in sample_photos()[::20]]  # skips without the real photos
    try:
        yield SimpleNamespace(proc=proc, env=env, url=url, log=log, photos=photos, model_dir=model_dir,
                              home=work / "home", state_file=work / "run" / env["PORT"] / "state.json")
    finally:
        if proc.poll() is None:
            bench.stop_cluster(proc)


def test_attackers_do_not_slow_normal_clients(running):
    slow = bench.phase_slow(running.url, running.photos, count=10, seconds=4)
    assert slow["requests"] > 5 and slow["failed"] == 0, slow
    assert slow["held_at_end"] == 30, slow  # held open by the proxy, not turned away


def test_proxy_limits_uploads_and_a_damaged_rollout_is_refused(running):
    big = requests.post(f"{running.url}/predict", data=b"\xff" * (3 * 1024 * 1024),
                        headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert big.status_code == 413 and big.json() == {"error": "request larger than the 2 MB limit"}

    state = json.loads(running.state_file.read_text())
    version = bench.served_versions(running.url, tries=4)
    artifact = running.model_dir / ARTIFACT_FILE
    good = artifact.read_bytes()
    artifact.write_bytes(good[: len(good) // 2])  # a truncated copy, as an interrupted upload leaves
    try:
        done = subprocess.run([sys.executable, "-m", "vehicle_classifier.serving.cluster", "reload"], cwd=REPO,
                              env=running.env, capture_output=True, text=True, timeout=120)
        # Past that check (a SIGHUP straight to the cluster), the new replica itself refuses it.
        os.kill(state["pid"], signal.SIGHUP)
        deadline = time.monotonic() + 120
        while (rollout := json.loads(running.state_file.read_text())["rollout"])["count"] == 0:
            assert time.monotonic() < deadline, "the rollout did not end"
            time.sleep(0.3)
    finally:
        artifact.write_bytes(good)
    assert rollout["ok"] is False and "damaged or incomplete" in rollout["message"], rollout
    assert rollout["message"].endswith(f"still serving model {version[0]}")
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and ARTIFACT_FILE in line and done.stdout == ""
    # Refused before any replica was touched: the same ones serve the same model.
    assert json.loads(running.state_file.read_text())["replicas"] == state["replicas"]
    assert bench.served_versions(running.url, tries=4) == version


@pytest.mark.parametrize("what", ["worker", "master"])
def test_a_killed_worker_or_replica_costs_no_request(running, what):
    phase = bench.phase_kill(running.url, running.env, running.photos, clients=6, seconds=4, what=what)
    # What the killed process held is retried on the other replica by nginx. Not once a
    # replica's answer has begun to reach the client: a kill in that instant most likely costs
    # that one request (1 failure seen in ~2,000 killed-worker requests on this machine).
    assert phase["requests"] > 10 and phase["failed"] <= 1, (phase["failures"], phase)
    if what == "master":  # the cluster replaced the dead replica
        assert phase["killed_pid"] not in phase["replicas_after"] and len(phase["replicas_after"]) == 2


def test_reload_under_load_serves_the_new_model_with_no_failed_request(running):
    phase = bench.phase_reload(running.url, running.env, running.photos, clients=2, seconds=4)
    assert phase["reload_rc"] == 0 and phase["failed"] == 0, phase
    assert phase["version_before"] != [phase["version_new"]]
    assert phase["versions_after"] == [phase["version_new"]], phase
    assert phase["models_after"] == ["exported"], phase  # published with the artifact, as training does
    replicas = json.loads(running.state_file.read_text())["replicas"]
    assert [r["model_version"] for r in replicas] == [phase["version_new"]] * 2


def test_sighup_keeps_the_model_and_says_so_and_sigterm_stops_everything(running):
    replicas = json.loads(running.state_file.read_text())["replicas"]
    # No control socket for the replicas to share and delete (gunicorn.conf.py turns it off).
    assert not list(running.home.rglob("*.ctl"))
    os.kill(replicas[0]["pid"], signal.SIGHUP)  # on one gunicorn, behind the cluster's back
    deadline = time.monotonic() + 30
    logs = running.state_file.parent.glob("replica-*.log")
    while not any("SIGHUP: workers restart with the model loaded at start" in p.read_text() for p in logs):
        assert time.monotonic() < deadline, "no SIGHUP warning in the replicas' logs"
        time.sleep(0.2)
        logs = running.state_file.parent.glob("replica-*.log")

    stop_s = bench.stop_cluster(running.proc)  # SIGTERM, as Ctrl-C or a service manager would
    assert running.proc.returncode == 0 and stop_s < 45
    assert re.search(r"^cluster: [\d:]+ stopped$", running.log.read_text(), re.MULTILINE)
    for replica in replicas:
        with pytest.raises(ProcessLookupError):
            os.killpg(replica["pid"], 0)  # no replica, nor any of its workers, outlived it
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{running.url}/health", timeout=5)  # nginx is gone too
    assert not running.state_file.exists()
