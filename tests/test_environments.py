"""The conda environments and the Pipfile agree with pyproject.toml's pins, and the Pipfile's
environment (Streamlit and requests, no torch) is enough for the page's client and test.py."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from test_containers import BASE_IMAGE_DISTS, installed_closure, module_owners, probe, site_view

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pins(requirements: list[str]) -> dict[str, str]:
    """{canonical name: exact version}; anything but `name==version` fails the test."""
    out = {}
    for line in requirements:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"{line!r} is not pinned to one version"
        out[canonicalize_name(req.name)] = spec.version
    return out


PROJECT_PINS = pins(PROJECT["dependencies"]) | pins(PROJECT["optional-dependencies"]["page"]) \
    | pins(PROJECT["optional-dependencies"]["dev"])


def test_pyproject_pins_agree_with_themselves():
    """A package named in two lists (requests: serving and page) has one version."""
    lists = [PROJECT["dependencies"], *PROJECT["optional-dependencies"].values()]
    seen: dict[str, str] = {}
    for requirements in lists:
        for name, version in pins(requirements).items():
            assert seen.setdefault(name, version) == version, f"{name}: {seen[name]} and {version} in pyproject.toml"


def conda_env(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("filename, env_name", [("conda-cpu.yaml", "dev-env-cpu"), ("conda-gpu.yaml", "dev-env-gpu")])
def test_conda_environment_matches_pyproject(filename, env_name):
    env = conda_env(filename)
    assert env["name"] == env_name
    conda_deps = [d for d in env["dependencies"] if isinstance(d, str)]
    (pip_section,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    python = next(d for d in conda_deps if re.match(r"python\b", d))
    version = re.sub(r"^python\s*=*\s*", "", python)
    assert SpecifierSet(PROJECT["requires-python"]).contains(f"{version}.0") and version == "3.11", python
    assert "pip" in conda_deps
    # torch and everything else from pip at pyproject's pins: no conda package of them to disagree.
    assert not {canonicalize_name(re.split(r"[=<> ]", d)[0]) for d in conda_deps} - {"python", "pip"}

    options = [line for line in pip_section if line.startswith("-")]
    assert pins([line for line in pip_section if not line.startswith("-")]) == PROJECT_PINS
    if "cpu" in filename:
        assert options == [f"--extra-index-url {CPU_INDEX}"]  # torch==X resolves to X+cpu
    else:
        assert options == []  # PyPI's Linux torch wheels are the CUDA builds


def test_pipfile_is_the_page_extra():
    pipfile = tomllib.loads((REPO / "Pipfile").read_text())
    packages = {canonicalize_name(name): spec for name, spec in pipfile["packages"].items()}
    page_extra = pins(PROJECT["optional-dependencies"]["page"])
    assert packages == {name: f"=={version}" for name, version in page_extra.items()}
    assert all(PROJECT_PINS[name] == spec[2:] for name, spec in packages.items())
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
