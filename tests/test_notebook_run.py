"""notebook.ipynb executes headless, top to bottom, in a kernel of its own, in quick mode on the
real sample photos with real pretrained features (EfficientNet-Lite0), as a user runs it: the
system tier (tests/test_notebook.py checks it is committed without outputs)."""

from __future__ import annotations

import base64
import io
import json
import re
import sys

import nbformat
import pytest
from conftest import LITE0_BACKBONE, REPO, SAMPLE_DIR, sample_photos
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from PIL import Image
from test_notebook import NOTEBOOK

from vehicle_classifier import config

pytestmark = pytest.mark.system

KERNEL = "vehicle-classifier-test"


def venv_kernel(tmp_path, env: dict) -> AsyncKernelManager:
    """A kernel running this very interpreter (the .venv's), whatever kernelspecs the machine
    has; the notebook's parameters travel in its environment."""
    kernel_dir = tmp_path / "kernels" / KERNEL
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vehicle-classifier test", "language": "python", "env": env,
    }))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def outputs(nb, tag: str) -> list[dict]:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}"
    return cells[0].outputs


def text_of(nb, tag: str) -> str:
    return "".join(o.get("text", "") for o in outputs(nb, tag) if o.output_type == "stream")


def pngs_of(nb, tag: str) -> list[Image.Image]:
    found = []
    for o in outputs(nb, tag):
        data = o.get("data", {})
        if "image/png" in data:
            image = Image.open(io.BytesIO(base64.b64decode(data["image/png"])))
            image.load()
            found.append(image)
    return found


def test_notebook_executes_in_quick_mode(tmp_path, lite0_weights, real_feature_cache):
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"real sample photos not found at {SAMPLE_DIR}")
    per_class = {label: len(sample_photos(label)) for label in ("Bike", "Car")}
    assert min(per_class.values()) >= 40
    # Real pretrained features, from the cache the other real-feature tests fill.
    km = venv_kernel(tmp_path, {
        "NB_QUICK": "1", "NB_DATA_DIR": str(SAMPLE_DIR), "NB_WEIGHTS": str(lite0_weights),
        "NB_BACKBONE": LITE0_BACKBONE, "NB_CACHE_DIR": str(real_feature_cache), "NB_AUDIT_DIR": str(tmp_path / "audit"),
    })
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the failing cell and its traceback, on any error.
    NotebookClient(nb, km=km, timeout=900, resources={"metadata": {"path": str(REPO)}}).execute()

    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert "files per class: Bike: 40, Car: 40" in text_of(nb, "class-balance")
    assert "0 unreadable files" in text_of(nb, "unreadable-duplicates")

    # The split is train.py's: 15 % + 15 % of 40 per class held out.
    features = text_of(nb, "features")
    assert "80 photos with features" in features and "1280-d" in features
    assert "split: train 56, val 12, test 12" in features
    assert re.search(r"\d+ near-duplicate pairs, \d+ of them across splits", text_of(nb, "leakage"))
    # The data audit of the whole folder (400 photos), as python -m vehicle_classifier.audit runs it.
    audit = text_of(nb, "audit")
    assert f"{sum(per_class.values())} photos audited in " in audit and "Bike/Bike (1411).jpeg" in audit
    assert (tmp_path / "audit" / config.AUDIT_FILE).is_file()

    # The quick sweep: train.py's defaults and three other grid points, ranked.
    html = next(o.data["text/html"] for o in outputs(nb, "sweep-results") if "text/html" in o.get("data", {}))
    rows = html.split("<tbody>")[1].split("</tbody>")[0]
    assert rows.count("<tr>") == 4
    for column in ("lr", "hidden_dim", "dropout", "weight_decay", "val_loss", "val_accuracy"):
        assert f">{column}</th>" in html
    assert rows.count(">True</td>") == 1  # exactly one row is the defaults
    verdict = [o for o in outputs(nb, "choice") if "text/markdown" in o.get("data", {})]
    assert verdict and "Verdict" in verdict[0].data["text/markdown"]
    # A real model, even from 56 training photos: at most one of the 12 test photos wrong.
    test = re.search(r"test: accuracy ([01]\.\d{3}), ROC-AUC ([01]\.\d{3}) on 12 photos", text_of(nb, "test"))
    assert test and float(test[1]) >= 11 / 12 - 1e-3 and float(test[2]) >= 0.95, text_of(nb, "test")

    for tag in ("class-balance", "sizes", "sample-grid", "audit", "projection", "validation-curves", "attention"):
        images = pngs_of(nb, tag)
        assert images and all(min(im.size) > 100 for im in images), tag
