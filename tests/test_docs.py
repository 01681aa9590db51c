"""README is a front page and docs/ holds the rest: every relative link (and #anchor) resolves,
and the commands the pages show in their ```bash blocks still exist (make targets, files,
`python -m` modules, console scripts, train.py's flags). Cheap: no model, no torch import here."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300

LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FILE_TOKEN = re.compile(r"^[\w./-]+\.(?:py|sh|ipynb|ya?ml|toml|dockerfile)$")
SEPARATORS = {"&&", "||", "|", ";", "&", "(", ")", "$(", ">", ">>", "<"}
FLAGS_CHECKED = ("train.py",)  # scripts whose --help is cheap (no torch import) and whose flags pages show


def prose_and_blocks(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Lines outside fenced code, and each fenced block as (language, body)."""
    prose, blocks, fence, lang, body = [], [], None, "", []
    for line in text.splitlines():
        marker = re.match(r"^\s*(```+|~~~+)\s*([\w-]*)", line)
        if fence is None and marker:
            fence, lang, body = marker.group(1), marker.group(2), []
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((lang, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append(line)
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped, lower case, punctuation removed,
    spaces to hyphens (github-slugger's rule)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = prose_and_blocks(path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = github_slug(heading.group(1))
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """Relative links of `page` whose file, or #anchor in a Markdown file, does not exist."""
    prose, _ = prose_and_blocks(page.read_text())
    problems = []
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"^[a-z][\w+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{page.name}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{page.name}: {target}: no heading with that anchor")
    return problems


def commands(page: Path) -> list[list[str]]:
    """Each simple command (tokens, leading VAR=value assignments dropped) of the page's bash blocks."""
    _, blocks = prose_and_blocks(page.read_text())
    result = []
    for lang, body in blocks:
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            current: list[str] = []
            for token in [*lexer, ";"]:
                if token in SEPARATORS or set(token) <= set("&|;()<>"):
                    while current and re.match(r"^[A-Z_][A-Z0-9_]*=", current[0]):
                        current.pop(0)
                    if current:
                        result.append(current)
                    current = []
                else:
                    current.append(token)
    return result


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m for m in re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M)}


def module_exists(name: str) -> bool:
    """`python -m name` from the repository root, as the pages run it: a module of the checkout or
    an installed one."""
    local = REPO.joinpath(*name.split("."))
    if local.with_suffix(".py").is_file() or (local / "__init__.py").is_file():
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def help_text(script: str) -> str:
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"{script} --help failed: {result.stderr[-500:]}"
    return result.stdout


def missing_commands(command_lists: list[list[str]], help_of=help_text) -> list[str]:
    """What the commands name that is not there: make targets, files, modules, venv scripts, flags."""
    problems, targets = [], make_targets()
    for tokens in command_lists:
        program, args = tokens[0], tokens[1:]
        shown = " ".join(tokens)
        if program == "make":
            problems += [f"make target {t!r} ({shown})" for t in args if not t.startswith("-") and "=" not in t
                         and t not in targets]
        if program.startswith(".venv/bin/") and not (Path(sys.executable).parent / Path(program).name).exists():
            problems.append(f"{program}: not installed in the environment ({shown})")
        for i, token in enumerate(tokens):
            if token == "-m" and i + 1 < len(tokens) and not module_exists(tokens[i + 1]):
                problems.append(f"module {tokens[i + 1]!r} ({shown})")
            if FILE_TOKEN.match(token) and not (REPO / token).exists():
                problems.append(f"file {token!r} ({shown})")
            if Path(program).name == "gunicorn" and re.match(r"^[\w.]+:\w+$", token) \
                    and not module_exists(token.split(":")[0]):
                problems.append(f"app module {token!r} ({shown})")
        for script in FLAGS_CHECKED:
            if script in tokens:
                flags = [t.split("=")[0] for t in tokens[tokens.index(script) + 1:] if t.startswith("--")]
                options = set(re.findall(r"(?<![\w-])--[\w-]+", help_of(script))) if flags else set()
                problems += [f"{script} has no {flag} ({shown})" for flag in flags if flag not in options]
    return problems


def test_relative_links_and_anchors_resolve():
    problems = [problem for page in PAGES for problem in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(README.read_text())}
    orphans = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not orphans, f"docs pages README does not link to: {orphans}"


def test_commands_shown_still_exist():
    shown = [tokens for page in PAGES for tokens in commands(page)]
    assert any(tokens[:2] == ["make", "test"] for tokens in commands(README)), "README shows `make test`"
    assert any(tokens[:2] == ["make", "run"] for tokens in commands(README)), "README shows `make run`"
    problems = missing_commands(shown)
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_page():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"
    assert len(PAGES) - 1 >= 3


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The checkers themselves: a broken file link, a missing anchor, a missing make target,
    file, module and flag are each reported; GitHub's slug rule on this project's headings."""
    assert github_slug('Real features: accuracy, "neither a car nor a bike", calibration') == \
        "real-features-accuracy-neither-a-car-nor-a-bike-calibration"
    assert github_slug("Conda / pipenv environments") == "conda--pipenv-environments"
    assert github_slug("`make cluster` and make reload") == "make-cluster-and-make-reload"
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Part\n\n[ok](#part) [bad](#nope) [gone](missing.md) [web](https://x.org/y)\n"
                    "```bash\n[not a link](nowhere.md)\n```\n")
    assert broken_links(page) == ["page.md: #nope: no heading with that anchor", "page.md: missing.md: no such file"]
    page.write_text("```bash\nPORT=1 make run nosuchtarget  # comment: make gone\n"
                    ".venv/bin/python -m no_such_module_xyz && .venv/bin/python scripts/gone.py\n"
                    ".venv/bin/python train.py --data-dir d --no-such-flag=3 \\\n    --force\n```\n")
    problems = missing_commands(commands(page), help_of=lambda script: "usage: --data-dir X --force")
    assert problems == [
        "make target 'nosuchtarget' (make run nosuchtarget)",
        "module 'no_such_module_xyz' (.venv/bin/python -m no_such_module_xyz)",
        "file 'scripts/gone.py' (.venv/bin/python scripts/gone.py)",
        "train.py has no --no-such-flag (.venv/bin/python train.py --data-dir d --no-such-flag=3 --force)",
    ]

