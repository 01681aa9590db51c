"""What a Python environment of a few packages loads: run a script with only the packages a
requirement list installs (linked from the .venv's site-packages, its .pth files left out) and
report every module it loaded and where from. tests/test_environments.py uses it to show that
the command-line client needs no more than the Pipfile brings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SITE_PACKAGES = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
BASE_IMAGE_DISTS = {"pip", "setuptools", "wheel"}  # what a fresh Python environment has besides the stdlib


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
            f"{req.name} {dist.version} installed here, the requirement is {req}"
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
    """A site-packages directory holding only what `pip install -r requirements` installs
    (linked from the .venv's): an import of anything else fails as it would there."""
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


# What runs in the working directory: the script, with the chosen packages but not the .venv's
# .pth files; then every loaded module's file, written to a JSON file.
BOOTSTRAP = r"""
import json, os, runpy, sys
sys.path[:] = sys.path[1:] + os.environ.pop("PROBE_SITE_PACKAGES").split(os.pathsep)
os.chdir(os.environ.pop("PROBE_WORKDIR"))
program, out = sys.argv[1:]
sys.path.insert(0, "")
sys.argv = [program]
try:
    runpy.run_path(program, run_name="__probe__")
finally:
    modules = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
    with open(out, "w") as f:
        json.dump(modules, f)
"""


def probe(tmp: Path, workdir: Path, script: str, env: dict, site_packages: Path) -> dict[str, str | None]:
    """Run `script` in `workdir` with only the packages in `site_packages` (see site_view) and
    the environment `env`; returns the modules it loaded, by name, with their files."""
    (tmp / "bootstrap.py").write_text(BOOTSTRAP)
    (workdir / "probe_script.py").write_text(script)
    out = tmp / "modules.json"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    environ.update(env, PROBE_SITE_PACKAGES=str(site_packages), PROBE_WORKDIR=str(workdir))
    result = subprocess.run([sys.executable, "-S", str(tmp / "bootstrap.py"), "probe_script.py", str(out)],
                            env=environ, capture_output=True, text=True, check=False, timeout=300)
    (workdir / "probe_script.py").unlink()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    modules = json.loads(out.read_text())
    for name in ("__main__", "__probe__"):
        modules.pop(name, None)
    return {name: file for name, file in modules.items() if not (file or "").endswith("probe_script.py")}
