"""The suite's and the code's own conventions, read from the files: every test module names its
tier (unit, integration or system: `pytest -m "not system"` is the quick loop); tests/ and
benchmarks/ import the harness package by name, never by editing sys.path; one `free_port`;
and no function outside tests/ longer than 40 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit

TIERS = {"unit", "integration", "system"}
MAX_FUNCTION_LINES = 40
# The code outside tests/: the package, the harness, benchmarks/, scripts/ and the top-level scripts.
CODE_DIRS = ("vehicle_classifier", "harness", "benchmarks", "scripts")
SYS_PATH_INSERT = "sys.path." + "insert"  # spelt in two so that this file does not match itself
DEF_FREE_PORT = "def " + "free_port("


def python_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py"))


def marks(tree: ast.Module) -> set[str]:
    """The names of `pytest.mark.X` in the module's `pytestmark = ...` assignment."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            return {n.attr for n in ast.walk(node.value)
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"}
    return set()


def test_every_test_module_has_exactly_one_tier():
    untiered = {}
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tiers = marks(ast.parse(path.read_text())) & TIERS
        if len(tiers) != 1:
            untiered[path.name] = sorted(tiers)
    assert not untiered, f"test modules need one of {sorted(TIERS)} in pytestmark: {untiered}"


def test_no_sys_path_edits_in_tests_or_benchmarks():
    """The harness and the package are installed (pyproject's package discovery); a script's own
    folder is on sys.path already when it runs."""
    found = [f"{p.relative_to(REPO)}:{n}" for p in python_files("tests", "benchmarks")
             for n, line in enumerate(p.read_text().splitlines(), 1) if SYS_PATH_INSERT in line]
    assert not found, found


def test_free_port_is_defined_once():
    defined = [p.relative_to(REPO).as_posix() for p in python_files(".")
               if ".venv" not in p.parts and DEF_FREE_PORT in p.read_text()]
    assert defined == ["harness/net.py"], defined


def test_no_function_outside_tests_is_longer_than_40_lines():
    files = python_files(*CODE_DIRS) + sorted(REPO.glob("*.py"))
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - start + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
