"""int8: the exported graph quantized by NNCF (export.quantize) answers as fp32 does. ViT-S/16
(random weights) keeps its features; EfficientNet-Lite0's real ImageNet features keep the held-out
answers on the 400 sample photos; training writes the fidelity gate, and the service serves int8
with the default settings where the gate held on a CPU with int8 dot products."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sample_photos
from vehicle_classifier import config
from vehicle_classifier.config import ServiceConfig
from vehicle_classifier.serving.api import create_app
from vehicle_classifier.backbone import create_backbone, preprocessing_for
from vehicle_classifier.model.predictor import Predictor
from vehicle_classifier.runtime import OpenVINOModel, cpu_supports_int8
from vehicle_classifier.export import exported_graph
from vehicle_classifier.training.int8 import crops, quantized

pytestmark = pytest.mark.integration


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_vit_s16_int8_features_match_fp32():
    torch.manual_seed(0)
    backbone = create_backbone("vit_small_patch16_224.dino").eval()
    preprocessing = preprocessing_for(backbone)
    photos = sample_photos()
    graph = exported_graph(backbone, preprocessing)
    graphs = graph, quantized(graph, preprocessing, photos[0::2], transformer=True)  # calibrated on one half
    held_out = crops(photos[1::10], preprocessing)  # measured on the other
    exact, fast = (OpenVINOModel(g, p)(held_out)[0] for g, p in zip(graphs, ("fp32", "int8")))
    similarity = cosine(exact, fast)
    print(f"ViT-S/16 int8 feature cosine on {len(held_out)} held-out crops: median {np.median(similarity):.5f}, "
          f"min {similarity.min():.5f}")  # shown with -s
    assert np.median(similarity) >= 0.999


def test_training_writes_the_int8_graph_and_its_gate(tiny_model_dir):
    gate = json.loads((tiny_model_dir / config.METRICS_FILE).read_text())["int8"]
    assert all((tiny_model_dir / name).is_file() for name in config.INT8_FILES)
    assert gate["photos"] > 0 and 0 <= gate["top1_agreement"] <= 1 and -1 <= gate["feature_cosine_min"] <= 1
    assert gate["passed"] == (gate["top1_agreement"] >= config.INT8_MIN_AGREEMENT)


def test_metadata_reports_int8_served_by_default_where_the_gate_held(tiny_model_dir):
    gate = json.loads((tiny_model_dir / config.METRICS_FILE).read_text())["int8"]
    app = create_app(ServiceConfig(model_dir=tiny_model_dir))  # the default settings: precision auto
    served = app.test_client().get("/metadata").get_json()["serving"]["precision"]
    assert served == ("int8" if gate["passed"] and cpu_supports_int8() else Predictor.from_dir(tiny_model_dir).precision)
    if cpu_supports_int8():  # this project's Xeon (AMX, VNNI): the tiny model's gate holds
        assert gate["passed"] and served == "int8"


def held_out_answers(model_dir, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) class indices of the test split's photos through `precision`."""
    split = json.loads((model_dir / config.SPLIT_FILE).read_text())
    predictor = Predictor.from_dir(model_dir, precision=precision)
    names = predictor.model.metadata["class_names"]
    paths = [Path(split["data_dir"]) / p for p in split["test"]]
    answers = predictor.predict_crops([predictor.crop(predictor.load_image(p)) for p in paths])
    return np.array([names.index(a.label) for a in answers]), np.array([names.index(p.parent.name) for p in paths])


def test_lite0_real_features_keep_held_out_answers_in_int8(real_model_dir):
    int8, truth = held_out_answers(real_model_dir, "int8")
    fp32, _ = held_out_answers(real_model_dir, "fp32")
    print(f"Lite0 held-out photos {len(truth)}: accuracy fp32 {(fp32 == truth).mean():.4f}, int8 "
          f"{(int8 == truth).mean():.4f}, top-1 agreement {(int8 == fp32).mean():.4f}")  # shown with -s
    assert (int8 == truth).mean() >= (fp32 == truth).mean() - 0.005
    assert (int8 == fp32).mean() >= 0.995
