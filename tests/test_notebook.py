"""notebook.ipynb is committed without outputs (tests/test_notebook_run.py executes it, headless,
in quick mode on the real sample photos: the system tier); scripts/make_figures.py writes the
figures in docs/training.md from a real run."""

from __future__ import annotations

import importlib.util

import nbformat
import pytest
from conftest import REPO, TINY_SPEC
from PIL import Image

from vehicle_classifier import config

pytestmark = pytest.mark.integration

NOTEBOOK = REPO / "notebook.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code)


# --- scripts/make_figures.py ----------------------------------------------------------------
def load_make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", REPO / "scripts" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_figures_trains_then_reuses_and_writes_every_png(tmp_path, synthetic_dataset, tiny_weights, capsys):
    make_figures = load_make_figures()
    model_dir, out = tmp_path / "model", tmp_path / "imgs"
    argv = ["--data-dir", str(synthetic_dataset), "--weights", str(tiny_weights), "--backbone", TINY_SPEC.name,
            "--model-dir", str(model_dir), "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--per-class", "4", "--banner-per-class", "2"]
    assert make_figures.main(argv) == 0
    assert "training a model" in capsys.readouterr().out
    sizes = {}
    for name in make_figures.FIGURES:
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            image.load()  # decodes: a complete file, not just a header
            sizes[name] = image.size
    assert sizes["sample_grid.png"][0] > sizes["sample_grid.png"][1]  # 4 columns, 2 class rows
    assert sizes["attention_banner.png"][0] > sizes["attention_banner.png"][1]  # 4 photos side by side
    assert not list(out.glob(".*.tmp*"))  # atomic writes leave no temporaries

    artifact = model_dir / config.ARTIFACT_FILE
    trained_at = artifact.stat().st_mtime_ns
    assert make_figures.main(argv) == 0
    assert "reusing the model" in capsys.readouterr().out
    assert artifact.stat().st_mtime_ns == trained_at


def test_make_figures_bad_data_dir_is_one_line(tmp_path, tiny_weights, capsys):
    make_figures = load_make_figures()
    code = make_figures.main(["--data-dir", str(tmp_path / "missing"), "--weights", str(tiny_weights),
                              "--backbone", TINY_SPEC.name, "--model-dir", str(tmp_path / "m"),
                              "--out-dir", str(tmp_path / "imgs")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: data directory not found") and err.count("\n") == 1
    assert not (tmp_path / "imgs").exists()
