"""The service in production on one machine: nginx in front of gunicorn replicas.

    make cluster    nginx on $PORT (9696) in front of $REPLICAS (2) gunicorn replicas serving
                    $MODEL_DIR, in the foreground; SIGTERM or Ctrl-C stops all of it
    make reload     every replica serves the artifact now in $MODEL_DIR, one at a time, with no
                    failed request; a damaged or incompatible artifact is refused with one line

One process (`serve`) owns every other: it starts the replicas on free loopback ports, writes
nginx's configuration from deploy/nginx/vehicle-classifier.conf.template and runs nginx, then
supervises: a replica that dies is replaced. A rollout (SIGHUP, which `reload` sends) starts a
replica with the new model beside each old one, waits until it is ready, points nginx at it
(`nginx -s reload`: in-flight requests finish on the old workers), then stops the old replica
gracefully. Its state lives in `<run_dir>/<port>/`, where `reload` finds it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .. import UserError
from ..config import ARTIFACT_FILE, NGINX_BINARY, NGINX_TEMPLATE, ClusterConfig, ServiceConfig
from ..fileio import write_json

REPO = Path(__file__).resolve().parents[2]
POLL = 0.2  # seconds between looks at processes and files
# Passive health checks, per replica (see the template): out for fail_timeout after max_fails.
UPSTREAM_SERVER = "server 127.0.0.1:{port} max_fails=2 fail_timeout=5s;"


# --- configuration ----------------------------------------------------------------------------
def render(template: str, values: dict) -> str:
    """Fill `${NAME}` placeholders, as the nginx image's envsubst does; nginx's own `$name`
    variables are left alone. A placeholder without a value is an error, not an empty string."""
    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"{NGINX_TEMPLATE.name}: no value for ${{{match.group(1)}}}")
        return str(values[match.group(1)])

    return re.sub(r"\$\{(\w+)\}", fill, template)


def site_values(cfg: ClusterConfig, ports: list[int]) -> dict:
    return {
        "LISTEN": f"{cfg.host}:{cfg.port}",
        "UPSTREAM_SERVERS": "\n    ".join(UPSTREAM_SERVER.format(port=p) for p in ports),
        "MAX_UPLOAD_MB": ServiceConfig.from_env().max_upload_bytes // (1024 * 1024),
        "MAX_CONN_PER_CLIENT": cfg.max_conn_per_client,
    }


def nginx_conf(prefix: Path, site: str) -> str:
    """A whole nginx.conf for an unprivileged nginx whose every file lives under `prefix`."""
    temp = "\n".join(f"    {kind}_temp_path {prefix / 'temp' / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As root, nginx's workers would switch to `nobody`, who cannot reach a private run folder.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (f"{user}worker_processes auto;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} warn;\n"
            f"events {{\n    worker_connections 4096;\n}}\n"
            f"http {{\n    access_log off;\n    default_type application/octet-stream;\n{temp}\n\n{site}}}\n")


def nginx_binary() -> str:
    found = shutil.which(NGINX_BINARY) or shutil.which(NGINX_BINARY, path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise UserError("nginx is not installed: apt-get install nginx (Debian), "
                        "or see docs/deployment.md, make cluster")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: if the cluster process dies, even by SIGKILL, so does the child."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:  # its own session: the terminal's Ctrl-C reaches only us
        return subprocess.Popen(args, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)


def _last_error(log: Path) -> str:
    """The last `error: ...` line of a log (without the prefix), else its last line."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line.removeprefix("error:") for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1].strip()


# --- a replica --------------------------------------------------------------------------------
@dataclass
class Replica:
    """One `gunicorn predict:app` on a loopback port, with gunicorn.conf.py's settings."""

    port: int
    proc: subprocess.Popen
    log: Path
    model_version: str | None = None
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, cfg: ClusterConfig, name: str) -> "Replica":
        port = free_port()
        metrics = cfg.state_dir / f"metrics-{name}"
        metrics.mkdir(parents=True, exist_ok=True)
        log = cfg.state_dir / f"replica-{name}.log"
        env = {"MODEL_DIR": str(cfg.model_dir.resolve()), "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
        args = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "predict:app"]
        return cls(port, _spawn(args, log, env), log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float, stopping) -> None:
        """Until /ready answers; raises UserError with the replica's own last line if it dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stopping():
            if self.proc.poll() is not None:
                raise UserError(f"the new replica did not start: {_last_error(self.log)}")
            try:
                answer = requests.get(f"{self.url}/ready", timeout=2)
                if answer.status_code == 200:
                    self.model_version = answer.json()["model_version"]
                    return
            except requests.RequestException:
                pass
            time.sleep(POLL)
        self.terminate(signal.SIGKILL)
        raise UserError(f"the new replica was not ready within {timeout:g} s (log: {self.log})")

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: gunicorn finishes the requests it holds, then exits. To the whole process
        group, so that workers orphaned by a killed master go too."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def gone(self) -> bool:
        self.proc.poll()  # reaps the master, whose zombie would otherwise keep the group alive
        try:
            os.killpg(self.proc.pid, 0)
            return False
        except ProcessLookupError:
            return True


# --- the cluster ------------------------------------------------------------------------------
class Cluster:
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.dir = cfg.state_dir.resolve()
        self.replicas: list[Replica] = []
        self.retiring: list[tuple[Replica, float]] = []  # stopping gracefully, with a deadline
        self.nginx: subprocess.Popen | None = None
        self.stopping = False
        self.rollout_wanted = False
        self.rollouts = {"count": 0, "ok": None, "message": ""}
        self.started = 0

    def say(self, message: str) -> None:
        print(f"cluster: {time.strftime('%H:%M:%S')} {message}", flush=True)

    def start(self) -> None:
        binary = nginx_binary()
        _check_port_free(self.cfg.host, self.cfg.port)  # before minutes of replica start-up
        # Each proxied request takes two descriptors in nginx: allow as many as the system lets us.
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "temp").mkdir(exist_ok=True)
        self.say(f"starting {self.cfg.replicas} replica(s) of {self.cfg.model_dir / ARTIFACT_FILE}")
        self.replicas = [self._new_replica() for _ in range(self.cfg.replicas)]
        for replica in self.replicas:
            replica.wait_ready(self.cfg.start_timeout, lambda: self.stopping)
        self._write_nginx_conf()
        # -e: nginx's start-up messages go to our folder too, not to /var/log (unprivileged).
        args = [binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log")]
        check = subprocess.run([*args, "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise UserError(f"nginx refused its configuration: {check.stderr.strip().splitlines()[-1]}")
        self.nginx = _spawn([*args, "-g", "daemon off;"], self.dir / "nginx.log")
        _wait_listening(self.cfg.port, self.nginx, self.dir / "error.log")
        self._write_state()
        host = "localhost" if self.cfg.host in ("0.0.0.0", "::") else self.cfg.host
        self.say(f"serving model {self.replicas[0].model_version} on http://{host}:{self.cfg.port} "
                 f"(nginx -> replicas on ports {', '.join(str(r.port) for r in self.replicas)}); Ctrl-C stops")

    def _new_replica(self) -> Replica:
        self.started += 1
        return Replica.start(self.cfg, str(self.started))

    def _write_nginx_conf(self) -> None:
        site = render(NGINX_TEMPLATE.read_text(), site_values(self.cfg, [r.port for r in self.replicas]))
        (self.dir / "nginx.conf").write_text(nginx_conf(self.dir, site))

    def _write_state(self) -> None:
        write_json(self.dir / "state.json", {
            "pid": os.getpid(), "port": self.cfg.port, "model_dir": str(self.cfg.model_dir.resolve()),
            "replicas": [{"port": r.port, "pid": r.proc.pid, "model_version": r.model_version} for r in self.replicas],
            "rollout": self.rollouts,
        })

    def swap(self, index: int, new: Replica) -> Replica:
        """Point nginx at `new` instead of replica `index`; returns the old one, still running.
        nginx's reload lets its old workers finish the requests they hold on the old replica."""
        old, self.replicas[index] = self.replicas[index], new
        self._write_nginx_conf()
        self.nginx.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # new workers take over; the old ones stop taking requests
        self._write_state()
        return old

    def replace(self, index: int) -> None:
        """Start a replica with the model now in model_dir beside replica `index`, then swap."""
        new = self._new_replica()
        try:
            new.wait_ready(self.cfg.start_timeout, lambda: self.stopping)
        except UserError:
            self.retire(new, signal.SIGKILL)
            raise
        if self.stopping:
            self.retire(new, signal.SIGKILL)
            return
        self.retire(self.swap(index, new))

    def retire(self, replica: Replica, sig: int = signal.SIGTERM, grace: float = 30) -> None:
        """Stop `replica` without waiting for it: reap() collects it, or kills it after `grace`."""
        replica.terminate(sig)
        self.retiring.append((replica, time.monotonic() + grace))

    def reap(self) -> None:
        for replica, deadline in list(self.retiring):
            if replica.gone():
                self.retiring.remove((replica, deadline))
            elif time.monotonic() > deadline:
                replica.terminate(signal.SIGKILL)

    def rollout(self) -> None:
        """One replica at a time; the first failure stops the rollout and the old ones go on."""
        self.rollout_wanted = False
        try:
            for index in range(len(self.replicas)):
                self.replace(index)
            ok, message = True, f"every replica serves model {self.replicas[0].model_version}"
        except UserError as exc:
            versions = sorted({r.model_version for r in self.replicas})
            ok, message = False, f"{exc}; still serving model {', '.join(versions)}"
        self.rollouts = {"count": self.rollouts["count"] + 1, "ok": ok, "message": message}
        self._write_state()
        self.say(("rollout done: " if ok else "rollout refused: ") + message)

    def supervise(self) -> None:
        """Until stopped: replace replicas that died, run rollouts when asked."""
        while not self.stopping:
            if self.nginx.poll() is not None:
                raise UserError(f"nginx exited ({_last_error(self.dir / 'error.log')})")
            if self.rollout_wanted:
                self.rollout()
            self.reap()
            for index, replica in enumerate(self.replicas):
                if replica.proc.poll() is not None and not self.stopping:
                    self.say(f"replica on port {replica.port} exited ({replica.proc.returncode}); replacing it")
                    try:  # its workers, orphaned if the master was killed, are stopped after the swap
                        self.replace(index)
                    except UserError as exc:
                        self.say(f"could not replace it: {exc}; trying again in 10 s")
                        self._pause(10)
            time.sleep(POLL)

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopping:
            time.sleep(POLL)

    def stop(self) -> None:
        self.stopping = True
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)  # graceful: answers what it holds
            try:
                self.nginx.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
        for replica in self.replicas:
            self.retire(replica)
        while self.retiring:
            self.reap()
            time.sleep(POLL)
        (self.dir / "state.json").unlink(missing_ok=True)


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx binds
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another PORT") from None


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"nginx did not start: {_last_error(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(POLL)
    raise UserError(f"nginx is not listening on port {port} after {timeout:g} s")


# --- entry points -----------------------------------------------------------------------------
def serve(cfg: ClusterConfig) -> int:
    cluster = Cluster(cfg)

    def on_stop(signum, _frame):
        cluster.stopping = True

    def on_hup(_signum, _frame):
        cluster.rollout_wanted = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        cluster.start()
        cluster.supervise()
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        cluster.say("stopped")


def reload(cfg: ClusterConfig, timeout: float = 900) -> int:
    """Validate the artifact in model_dir, then have the running cluster roll it out."""
    state_file = cfg.state_dir / "state.json"
    try:
        state = json.loads(state_file.read_text())
        os.kill(state["pid"], 0)
    except (OSError, ValueError, KeyError):
        raise UserError(f"no cluster is running on port {cfg.port} (start one with: make cluster)") from None
    if Path(state["model_dir"]) != cfg.model_dir.resolve():
        raise UserError(f"the cluster on port {cfg.port} serves MODEL_DIR={state['model_dir']}, not {cfg.model_dir}")
    from ..artifact import load_artifact  # torch: only once there is a cluster to roll out to

    new_version = load_artifact(cfg.model_dir / ARTIFACT_FILE).metadata["model_version"]  # ArtifactError: one line
    if {r["model_version"] for r in state["replicas"]} == {new_version}:
        print(f"every replica already serves model {new_version}")
        return 0
    before = state["rollout"]["count"]
    os.kill(state["pid"], signal.SIGHUP)
    print(f"rolling out model {new_version} on port {cfg.port}, one replica at a time", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(POLL)
        try:
            rollout = json.loads(state_file.read_text())["rollout"]
        except (OSError, ValueError):
            raise UserError("the cluster stopped during the rollout") from None
        if rollout["count"] > before:
            print(rollout["message"] if rollout["ok"] else f"error: {rollout['message']}")
            return 0 if rollout["ok"] else 1
    raise UserError(f"the rollout did not finish within {timeout:g} s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["serve"], ["reload"]):
        print("usage: python -m vehicle_classifier.serving.cluster serve|reload "
              "(settings: see docs/deployment.md, make cluster)", file=sys.stderr)
        return 2
    try:
        cfg = ClusterConfig.from_env()
        return serve(cfg) if argv == ["serve"] else reload(cfg)
    except (UserError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
