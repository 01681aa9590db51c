"""pyproject.toml declares compatible ranges and constraints.txt the exact versions tested (the
lock); setup, CI, the Dockerfiles (test_containers.py), the conda environments and the Pipfile
use the lock; installing the package beside another torch keeps that torch; and the Pipfile's
environment (Streamlit and requests, no torch) is enough for the page's client and test.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from harness.package_probe import BASE_IMAGE_DISTS, installed_closure, module_owners, probe, site_view

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REQUIREMENTS = [PROJECT["dependencies"], *PROJECT["optional-dependencies"].values()]


def pins(requirements: list[str]) -> dict[str, str]:
    """{canonical name: exact version}; anything but `name==version` fails the test."""
    out = {}
    for line in requirements:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"{line!r} is not pinned to one version"
        out[canonicalize_name(req.name)] = spec.version
    return out


LOCK = pins([line for line in (REPO / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")])


def test_pyproject_declares_ranges_that_the_lock_satisfies():
    """Every requirement is a range (no exact pin to clash with a user's own torch), each
    locked version falls in it, and the lock holds exactly the packages pyproject names."""
    named = set()
    for requirements in REQUIREMENTS:
        for line in requirements:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            named.add(name)
            assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{line!r} is a pin, not a range"
            assert req.specifier.contains(LOCK[name]), f"constraints.txt has {name}=={LOCK[name]}, outside {line!r}"
    assert named == set(LOCK), f"in one file, not the other: {sorted(named ^ set(LOCK))}"
    # A GPU workstation's torch: another minor version, a CUDA build, Python 3.12.
    torch_range = next(Requirement(r).specifier for r in PROJECT["optional-dependencies"]["train"] if r.startswith("torch"))
    assert torch_range.contains("2.11.0+cu128") and torch_range.contains(LOCK["torch"])
    for python in ("3.11.0", "3.12.0"):
        assert SpecifierSet(PROJECT["requires-python"]).contains(python)


def test_setup_and_ci_install_the_lock():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert re.search(r"pip install --log \.venv/pip\.log -c constraints\.txt -e \"\.\[train,dev,page,cluster\]\"", setup)
    assert "make test" in (REPO / ".ci" / "run").read_text()  # CI sets up through scripts/setup.sh
    assert "constraints.txt" in (REPO / "Makefile").read_text().split("scripts/setup.sh")[0]


def test_installing_beside_another_torch_keeps_it(tmp_path):
    """pip itself, asked to install the package into an environment that already holds a CUDA
    torch of another version (and, through a .pth file, everything else it needs from this
    .venv), plans to install the package alone: torch is neither replaced nor downgraded."""
    env = tmp_path / "gpu-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = Path(subprocess.run([env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name, version in (("torch", "2.11.0+cu128"), ("torchvision", "0.26.0+cu128")):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    (site / "project-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")  # after its own torch
    source = tmp_path / "source"
    (source / "vehicle_classifier").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "vehicle_classifier/__init__.py"):
        shutil.copy(REPO / name, source / name)
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install",
                             "--dry-run", "--no-index", "--no-build-isolation", "--quiet", "--report", str(report),
                             f"{source}[train,dev,page]"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    planned = [(item["metadata"]["name"], item["metadata"]["version"]) for item in json.loads(report.read_text())["install"]]
    assert planned == [("vehicle-classifier", PROJECT["version"])]


def conda_env(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("filename, env_name", [("conda-cpu.yaml", "dev-env-cpu"), ("conda-gpu.yaml", "dev-env-gpu")])
def test_conda_environment_installs_the_lock(filename, env_name):
    env = conda_env(filename)
    assert env["name"] == env_name
    conda_deps = [d for d in env["dependencies"] if isinstance(d, str)]
    (pip_section,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    python = next(d for d in conda_deps if re.match(r"python\b", d))
    version = re.sub(r"^python\s*=*\s*", "", python)
    assert SpecifierSet(PROJECT["requires-python"]).contains(f"{version}.0") and version == "3.11", python
    assert "pip" in conda_deps
    # torch and everything else from pip at the lock's versions: no conda package of them to disagree.
    assert not {canonicalize_name(re.split(r"[=<> ]", d)[0]) for d in conda_deps} - {"python", "pip"}

    options = [line for line in pip_section if line.startswith("-")]
    assert pins([line for line in pip_section if not line.startswith("-")]) == LOCK
    if "cpu" in filename:
        assert options == [f"--extra-index-url {CPU_INDEX}"]  # torch==X resolves to X+cpu
    else:
        assert options == []  # PyPI's Linux torch wheels are the CUDA builds


def test_pipfile_is_the_page_extra():
    pipfile = tomllib.loads((REPO / "Pipfile").read_text())
    packages = {canonicalize_name(name): spec for name, spec in pipfile["packages"].items()}
    page_extra = {canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"]["page"]}
    assert packages == {name: f"=={LOCK[name]}" for name in page_extra}
    assert "torch" not in packages
    python = pipfile["requires"]["python_version"]
    assert python == "3.11" and SpecifierSet(PROJECT["requires-python"]).contains(f"{python}.0")
    assert [source["url"] for source in pipfile["source"]] == ["https://pypi.org/simple"]


CLI_PROBE = r"""
import runpy, sys
cli = runpy.run_path("test.py", run_name="cli")
try:
    cli["parse_args"](["--help"])
except SystemExit as exit:
    assert exit.code == 0
# The client with no service: a ServiceError, readable, not a traceback from requests.
client = cli["PredictionClient"]("http://127.0.0.1:9")
try:
    client.ready()
except cli["ServiceError"] as error:
    assert "cannot reach" in str(error), error
else:
    raise AssertionError("no error without a service")
"""


def test_pipfile_environment_is_enough_for_the_command_line_client(tmp_path):
    """test.py in the Pipfile's environment: what it loads is the repository's own torch-free
    modules and Streamlit/requests with what they bring."""
    workdir = tmp_path / "checkout"
    shutil.copytree(REPO / "vehicle_classifier", workdir / "vehicle_classifier",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "test.py", workdir / "test.py")
    pipfile = tomllib.loads((REPO / "Pipfile").read_text())
    requirements = [f"{name}{spec}" for name, spec in pipfile["packages"].items()]
    modules = probe(tmp_path, workdir, CLI_PROBE, {}, site_view(tmp_path, requirements))
    dists, project, unexplained = module_owners(modules, workdir)
    assert not unexplained, sorted(unexplained)
    installed = installed_closure(requirements) | BASE_IMAGE_DISTS
    assert dists <= installed, f"test.py needs packages the Pipfile does not bring: {sorted(dists - installed)}"
    assert "torch" not in {name.split(".")[0] for name in modules}
    assert {"vehicle_classifier/client.py", "vehicle_classifier/config.py"} <= project
