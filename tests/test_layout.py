"""The house's rules, read from the code's own imports: the core imports no part; model/ (the
predictor and its forwards) stands on the core alone; training/, serving/ and offline/ stand on the
model layer and never on each other; audit/ stands on training/. (That the CPU service runs where
torch cannot be imported is tests/test_export.py's.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit

PACKAGE = REPO / "vehicle_classifier"
HALVES = ("model", "training", "serving", "offline", "audit")


def imported(path: Path, source: str | None = None) -> set[str]:
    """Every vehicle_classifier module `path` (or `source` as if it were there) imports,
    anywhere in it (imports inside functions too), as a dotted name."""
    parts = path.relative_to(REPO).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.update(f"{module}.{alias.name}" for alias in node.names)
            names.add(module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("vehicle_classifier")}


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE).parts
    return relative[0] if len(relative) > 1 else "core"


def uses(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in HALVES else None


MODULES = sorted(PACKAGE.rglob("*.py"))


def violations(path: Path, source: str | None = None) -> set[str]:
    """The parts of the package that `path` imports but its own part may not."""
    part = part_of(path)
    reached = {uses(name) for name in imported(path, source)} - {None, part}
    allowed = {"core": set(), "model": set(), "training": {"model"}, "serving": {"model"},
               "offline": {"model"}, "audit": {"training", "model"}}[part]
    return reached - allowed


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    assert not violations(path), f"{path.relative_to(REPO)} imports {sorted(violations(path))}"


def test_the_rule_sees_a_forbidden_import():
    """The check itself: serving importing training, or the core importing serving, is caught,
    whether at the top or inside a function."""
    api, config = PACKAGE / "serving" / "api.py", PACKAGE / "config.py"
    assert violations(api, api.read_text() + "\nfrom ..training.run import run_training\n") == {"training"}
    inside = config.read_text() + "\ndef f():\n    from .serving import api\n"
    assert violations(config, inside) == {"serving"}


def test_the_model_layer_imports_no_http_library():
    """The predictor answers in plain dataclasses: importing it (and batch prediction, which
    stands on it) loads none of the service's HTTP libraries."""
    import subprocess
    import sys

    probe = ("import sys, vehicle_classifier.model.predictor, vehicle_classifier.offline.batch\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'flask', 'werkzeug', 'pydantic', 'spectree', "
             "'multipart', 'python_multipart'}))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_no_module_of_the_package_mentions_nginx_and_serving_is_http_only():
    assert not [p for p in MODULES if "nginx" in p.read_text().lower()]
    offline = {"batch", "cluster", "figures", "predictor", "torch_forward", "batcher"}
    assert not [p.stem for p in (PACKAGE / "serving").glob("*.py") if p.stem in offline]
