"""`docker compose up`, for real: the repository's own Dockerfiles and docker-compose.yml, unmodified,
built and run on a real Docker engine with the tiny test model mounted (MODEL_DIR), then used as
people use it: real photos through the proxy, one through the page in headless Chromium, a
replica SIGKILLed while 8 clients send requests; every container checked for what the kernel
says it runs as (read-only root, no capabilities, no privilege gain, not root); and an image
with the model baked in serving with nothing mounted. The engine is
started when none runs and stopped after; base images that cannot be pulled are built from
their stand-ins (tests/containers). Needs root and the engine (scripts/setup.sh --system,
which make test runs, installs it); skipped elsewhere, with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from harness import docker_stack as ds
from conftest import REPO, sample_photos
from vehicle_classifier import config
from vehicle_classifier.model.predictor import Predictor
from harness.live import free_port, wait_for

UNAVAILABLE = ds.unavailable()
pytestmark = [pytest.mark.system, pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))]

PROJECT = "vehicle-classifier-test"
PREDICT_IMAGE, PAGE_IMAGE = "vehicle-classifier-predict", "vehicle-classifier-page"
MAX_PREDICT_IMAGE_MB = 600


@dataclass
class Running:
    stack: ds.Stack
    proxy: str  # URLs on this machine
    page: str
    base_images: dict[str, str]
    figures: dict[str, float]

    def logs(self) -> str:
        return self.stack.logs()[-6000:]


def model_folder(trained: Path, root: Path) -> Path:
    """A copy of `trained` in a folder made as train.py makes models/ (pytest's own temporary
    folders are private to their owner; the service runs as another user)."""
    folder = root / "models"
    folder.mkdir(mode=0o755)
    for item in trained.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("stack")
    ports = {"PORT": free_port(), "PAGE_PORT": free_port()}
    settings = {"MODEL_DIR": str(model_folder(tiny_model_dir, tmp)), "REPLICAS": "2",
                **{k: str(v) for k, v in ports.items()}}
    figures = {}
    with ds.running_engine(tmp / "dockerd.log"):
        started = time.perf_counter()
        how = ds.ensure_base_images()
        figures["base_images_s"] = time.perf_counter() - started
        stack = ds.Stack(PROJECT, settings)
        stack.down()  # whatever an interrupted run left
        started = time.perf_counter()
        stack.build()
        figures["build_s"] = time.perf_counter() - started
        try:
            started = time.perf_counter()
            stack.up()
            figures["up_wait_s"] = time.perf_counter() - started
            yield Running(stack, f"http://127.0.0.1:{ports['PORT']}", f"http://127.0.0.1:{ports['PAGE_PORT']}",
                          how, figures)
        finally:
            (tmp / "compose.log").write_text(stack.logs())
            stack.down()
            print(f"\nstack: base images {how}; " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items())
                  + f"; logs in {tmp / 'compose.log'}")


def test_predict_image_is_small_and_has_no_torch(stack):
    sizes = {image: ds.image_size_mb(image) for image in (PREDICT_IMAGE, PAGE_IMAGE)}
    print(f"image sizes: {sizes} (base images: {stack.base_images})")
    assert sizes[PREDICT_IMAGE] <= MAX_PREDICT_IMAGE_MB
    for image in (PREDICT_IMAGE, PAGE_IMAGE):
        for module in ("torch", "torchvision", "timm"):
            result = ds.docker("run", "--rm", "--entrypoint", "python", image, "-c", f"import {module}", check=False)
            assert result.returncode != 0 and f"No module named '{module}'" in result.stderr, (image, result.stderr)


def test_a_baked_model_serves_without_a_volume(stack, tmp_path, tiny_model_dir):
    """`--build-arg MODEL=baked` (set in a compose file, as the deployment docs say): the image
    carries the model folder's served files and answers with nothing mounted."""
    context = tmp_path / "checkout"
    tracked = ds.run(["git", "ls-files", "-z"], cwd=REPO).stdout.split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, context / name)
    model_folder(tiny_model_dir, context)
    (context / "baked.yml").write_text(
        "services:\n  predict:\n    build: {context: ., dockerfile: image-predict.dockerfile, args: {MODEL: baked}}\n"
        "    image: vehicle-classifier-predict:baked-test\n")
    ds.run(["docker", "compose", "--project-name", "vehicle-classifier-baked", "--file", str(context / "baked.yml"),
            "build", "--quiet"], cwd=context)
    container = ds.docker("run", "--detach", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                          "vehicle-classifier-predict:baked-test").stdout.strip()
    try:
        (inspected,) = json.loads(ds.docker("inspect", container).stdout)
        (network,) = inspected["NetworkSettings"]["Networks"].values()
        url = f"http://{network['IPAddress']}:{config.DEFAULT_PORT}"
        wait_for(f"{url}/ready", timeout=120)
        (answer,) = photo_answers(url, sample_photos("Car")[:1])
        assert answer.status_code == 200 and sorted(answer.json()["probabilities"]) == ["Bike", "Car"]
        # The int8 graph is baked too: the image serves the precision the mounted folder would.
        served = requests.get(f"{url}/metadata", timeout=10).json()["serving"]["precision"]
        assert served == Predictor.from_dir(tiny_model_dir).precision
    finally:
        ds.docker("rm", "--force", container, check=False)
        ds.docker("rmi", "vehicle-classifier-predict:baked-test", check=False)


def photo_answers(url: str, photos: list[Path], attention_every: int = 0) -> list[requests.Response]:
    """POST /predict of each photo; every `attention_every`-th asks for the attention overlay too."""
    return [requests.post(f"{url}/predict", files={"file": (p.name, p.read_bytes())}, timeout=60,
                          params={"attention": 1} if attention_every and i % attention_every == 0 else {})
            for i, p in enumerate(photos)]


def test_forty_photos_through_the_proxy(stack):
    photos = sample_photos("Car")[:20] + sample_photos("Bike")[:20]
    answers = photo_answers(stack.proxy, photos, attention_every=10)
    assert [a.status_code for a in answers] == [200] * len(photos), stack.logs()
    for i, answer in enumerate(a.json() for a in answers):
        assert sorted(answer["probabilities"]) == ["Bike", "Car"]  # the tiny model's classes
        assert answer["confidence"] == max(answer["probabilities"].values()) == answer["probabilities"][answer["label"]]
        assert (answer.get("attention_png") is not None) == (i % 10 == 0)  # the overlay, drawn in the container
    # The proxy's own refusals still answer in the service's JSON shape.
    too_big = requests.post(f"{stack.proxy}/predict", files={"file": ("big.jpg", b"\0" * (21 * 1024 * 1024))},
                            timeout=60)
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]


def test_a_photo_through_the_page_in_chromium(stack, tmp_path):
    from test_browser import CHROMIUM, page_in_browser

    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}; make test installs Debian's as root")
    photo = sample_photos("Car")[0]
    with page_in_browser(stack.page, stack.proxy, [photo], tmp_path, 900, stack.logs) as (page, expected):
        assert expected[0]["label"] in ("Bike", "Car")


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def test_every_container_runs_read_only_without_capabilities_and_not_as_root(stack):
    containers = stack.stack.containers()
    assert sorted(c["Config"]["Labels"]["com.docker.compose.service"] for c in containers) == \
        ["predict", "predict", "proxy", "streamlit"]
    for container in containers:
        name, host = container["Name"], container["HostConfig"]
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"], name
        assert "no-new-privileges:true" in host["SecurityOpt"], name
        # What the kernel says of every process in it: not root, no capabilities, no gain.
        for pid, uid in ds.processes(container):
            assert uid != 0, (name, pid)
            assert int(status_field(pid, "CapEff"), 16) == 0 and status_field(pid, "NoNewPrivs") == "1", (name, pid)
        # ... and the root filesystem refuses a write.
        write = ds.docker("exec", container["Id"], "python3" if "proxy" not in name else "sh", "-c",
                          "open('/probe', 'w')" if "proxy" not in name else "touch /probe", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr, (name, write.stderr)


def test_a_replica_killed_under_load_costs_no_request(stack):
    """8 clients posting photos through the proxy; one predict container SIGKILLed (its main
    process, as a crash or the OOM killer would) a third of the way in: no request fails, and
    the restart policy brings the replica back healthy."""
    from harness.load import Recorder, run_clients  # the load benchmark's clients

    photos = [p.read_bytes() for p in sample_photos() if p.suffix.lower() in (".jpg", ".jpeg")][:16]
    victim = stack.stack.containers("predict")[0]
    recorder, seconds = Recorder(), 12.0

    def kill():
        time.sleep(seconds / 3)
        os.kill(victim["State"]["Pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    elapsed = run_clients(stack.proxy, photos, clients=8, seconds=seconds, recorder=recorder)
    killer.join()
    summary = recorder.summary(elapsed)
    print(f"kill under load: {summary}")
    assert summary["requests"] >= 16 and summary["failed"] == 0, summary

    deadline = time.monotonic() + 90
    while True:
        (state,) = [c["State"] for c in stack.stack.containers("predict") if c["Id"] == victim["Id"]]
        if state.get("Health", {}).get("Status") == "healthy" and state["Pid"] != victim["State"]["Pid"]:
            break
        assert time.monotonic() < deadline, (state, stack.logs())
        time.sleep(1)


def test_slow_header_clients_hold_nothing_behind_the_proxy(stack):
    """What bare gunicorn does not survive (docs/reliability.md): connections trickling their
    headers a line a second. Behind compose's nginx a normal request is answered at once beside
    them, and nginx cuts each trickler off (client_header_timeout, 10 s)."""
    import socket

    port = int(stack.proxy.rsplit(":", 1)[1])
    tricklers = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(6)]
    for sock in tricklers:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
    photo = next(p for p in sample_photos() if p.suffix.lower() in (".jpg", ".jpeg")).read_bytes()
    cut_off, started = set(), time.monotonic()
    answered = None
    while time.monotonic() - started < 25 and len(cut_off) < len(tricklers):
        if answered is None and time.monotonic() - started > 2:
            begun = time.monotonic()
            reply = requests.post(f"{stack.proxy}/predict", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=30)
            answered = (reply.status_code, time.monotonic() - begun)
        for i, sock in enumerate(tricklers):
            try:
                sock.sendall(b"X-a: b\r\n")
            except OSError:
                cut_off.add(i)
        time.sleep(1)
    for sock in tricklers:
        sock.close()
    assert answered is not None and answered[0] == 200 and answered[1] < 2.0, answered
    assert len(cut_off) == len(tricklers), f"{len(cut_off)} of {len(tricklers)} cut off in 25 s"
