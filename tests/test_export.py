"""The exported model (export.py): what the CPU service runs without torch. Training writes it
with the artifact; it answers as the torch model does (real ImageNet features on the sample
photos, and a ViT's attention maps); `python -m vehicle_classifier.export` writes it for an
older artifact; a graph of another model is never used; and the service runs it in a process
where torch cannot be imported."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, sample_photos
from vehicle_classifier import config
from vehicle_classifier.artifact import load_artifact
from vehicle_classifier.export import main as export_main
from vehicle_classifier.model.predictor import Predictor
from vehicle_classifier.runtime import RT_INFO_VERSION

pytestmark = pytest.mark.integration


def answers_of(predictor: Predictor, crops: list[Image.Image], attention: bool = False):
    return predictor.predict_crops(crops, attention=attention)


def crops_of(predictor: Predictor, photos) -> list[Image.Image]:
    return [predictor.crop(predictor.load_image(p)) for p in photos]


def largest_difference(a, b) -> float:
    return max(abs(x.probabilities[k] - y.probabilities[k]) for x, y in zip(a, b) for k in x.probabilities)


def without_export(model_dir, target):
    """A copy of the model folder holding the artifact alone (as trained before export existed)."""
    target.mkdir()
    shutil.copy(model_dir / config.ARTIFACT_FILE, target / config.ARTIFACT_FILE)
    return target


def test_training_writes_the_export_with_the_artifact(tiny_model_dir):
    assert all((tiny_model_dir / name).stat().st_size > 0 for name in config.SERVED_FILES)
    predictor = Predictor.from_dir(tiny_model_dir, warm_up=False)
    assert predictor.source == "exported" and predictor.attention_available  # a ViT: features and attention


def test_real_features_exported_answers_equal_the_torch_paths(real_model_dir, tmp_path):
    """EfficientNet-Lite0's ImageNet weights on 100 sample photos: the exported graph against the
    artifact's torch backbone converted at start (the service's CPU path before export), both
    OpenVINO bf16 where the CPU has it; and against torch itself (RUNTIME=torch) in fp32, and in
    bf16, where the two engines' bf16 differ (measured: torch's autocast lies 0.018 from fp32 in
    probability, OpenVINO's 0.006, and 0.013 from each other: the labels agree)."""
    photos = sample_photos()[::4]
    exported = Predictor.from_dir(real_model_dir)
    converted = Predictor.from_dir(without_export(real_model_dir, tmp_path / "old"))
    assert (exported.source, converted.source) == ("exported", "converted")
    assert exported.precision == converted.precision
    crops = crops_of(exported, photos)
    served, before = answers_of(exported, crops), answers_of(converted, crops)
    assert [a.label for a in served] == [a.label for a in before]
    assert largest_difference(served, before) < 1e-3
    assert [a.in_distribution for a in served] == [a.in_distribution for a in before]

    fp32 = [answers_of(Predictor.from_dir(real_model_dir, runtime=runtime, precision="fp32"), crops)
            for runtime in ("openvino", "torch")]
    assert largest_difference(*fp32) < 1e-5  # the same graph: equal to rounding
    in_torch = answers_of(Predictor.from_dir(real_model_dir, runtime="torch", precision=exported.precision), crops)
    assert [a.label for a in served] == [a.label for a in in_torch]
    assert largest_difference(served, in_torch) < 0.03


def test_attention_maps_of_the_export_match_torchs(tiny_model_dir, photos):
    exported = Predictor.from_dir(tiny_model_dir)
    in_torch = Predictor.from_dir(tiny_model_dir, runtime="torch", precision="fp32")
    fp32 = Predictor.from_dir(tiny_model_dir, precision="fp32")
    crops = crops_of(exported, photos)
    pixels = np.stack([np.asarray(c) for c in crops])
    (_, maps), (_, reference) = fp32.forward(pixels, True), in_torch.forward(pixels, True)
    assert maps.shape == reference.shape == (len(crops), 4, 4)
    assert np.abs(maps - reference).max() < 1e-4
    for answer in answers_of(exported, crops, attention=True):
        assert Image.open(io.BytesIO(base64.b64decode(answer.attention_png))).size == crops[0].size


def test_the_export_command_writes_it_for_an_older_artifact(tiny_model_dir, tmp_path, capsys):
    old = without_export(tiny_model_dir, tmp_path / "old")
    assert Predictor.from_dir(old, warm_up=False).source == "converted"
    assert export_main(["--model-dir", str(old)]) == 0
    assert Predictor.from_dir(old, warm_up=False).source == "exported"
    assert [p.name for p in sorted(old.iterdir()) if not p.name.startswith(".")] == sorted(
        config.SERVED_FILES)
    assert export_main(["--model-dir", str(tmp_path / "nowhere")]) == 2
    assert "no model artifact at" in capsys.readouterr().err


def test_an_export_of_another_model_is_never_used(tiny_model_dir, real_model_dir, tmp_path):
    mixed = without_export(tiny_model_dir, tmp_path / "mixed")
    for name in (*config.EXPORT_FILES, *config.HEAD_FILES):  # another model's graphs beside this artifact
        shutil.copy(real_model_dir / name, mixed / name)
    predictor = Predictor.from_dir(mixed, warm_up=False)
    assert predictor.source == "converted"
    assert not predictor.model.head.has_rt_info(RT_INFO_VERSION)  # this artifact's head, converted now


def test_the_served_head_is_the_trained_head(tiny_model_dir):
    """One head: the graph every path answers with is training's MLPHead converted (export.head_graph),
    logits equal to the torch module's on random features, to float rounding."""
    import torch

    head = load_artifact(tiny_model_dir / config.ARTIFACT_FILE).head
    predictor = Predictor.from_dir(tiny_model_dir)
    features = np.random.default_rng(0).normal(size=(32, head.config["in_dim"])).astype(np.float32) * 3
    with torch.no_grad():
        expected = head(torch.from_numpy(features)).numpy()
    assert np.abs(predictor.head.outputs(features)[0] - expected).max() < 1e-4


def test_the_service_answers_where_torch_cannot_be_imported(tiny_model_dir, photos):
    """The predict image has no torch: here, a process where importing it fails serves a photo."""
    code = f"""
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError from here on
from vehicle_classifier.config import ServiceConfig
from vehicle_classifier.serving.api import create_app
client = create_app(ServiceConfig(model_dir={str(tiny_model_dir)!r})).test_client()
data = open({str(photos[0])!r}, "rb").read()
answer = client.post("/predict?attention=1", data={{"file": (__import__("io").BytesIO(data), "p.jpg")}})
print(answer.status_code, __import__("json").dumps(answer.get_json()))
print(client.get("/metadata").get_json()["serving"]["model"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    status, body = out.stdout.splitlines()[0].split(" ", 1)
    answer = json.loads(body)
    assert status == "200" and answer["label"] in ("Bike", "Car") and answer["attention_png"]
    assert out.stdout.splitlines()[1] == "exported"


def test_the_command_line_is_light_and_named_as_it_is_run():
    """--help imports neither torch nor timm (they take seconds): they load when an export runs."""
    code = "import sys, vehicle_classifier.export as e; print(sorted({'torch', 'timm'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stderr
    shown = subprocess.run([sys.executable, "-m", "vehicle_classifier.export", "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m vehicle_classifier.export ")
