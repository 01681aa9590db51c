"""The CUDA paths: extraction, training end to end, the Predictor, batch prediction, and
features that agree with the CPU's (OpenVINO) within bf16's error. Skipped, with the reason,
on machines without CUDA (tests marked `cuda`, see conftest.py)."""

import csv

import pytest
import torch

from conftest import TINY_SPEC, sample_photos
from vehicle_classifier import batch, config, training
from vehicle_classifier.backbone import create_backbone, preprocessing_for
from vehicle_classifier.features import FeatureCache, extract_features, fit_batch_size
from vehicle_classifier.inference import Predictor

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def vits16():
    torch.manual_seed(0)
    return create_backbone(config.BACKBONES["dino-vits16"].architecture).eval()


def extract(model, paths, device, tmp_path):
    preprocessing = preprocessing_for(model)
    with FeatureCache(tmp_path / device.type, "k") as cache:
        found, failures = extract_features(model, paths, [str(p) for p in paths], preprocessing, cache, device,
                                           "bf16")
    assert not failures
    return torch.stack([found[str(p)] for p in paths])


def test_cuda_features_agree_with_the_cpu_decode_and_runtime(vits16, tmp_path):
    """GPU extraction (pinned batches, bf16 autocast) against the CPU path serving uses."""
    paths = sample_photos()[::10]
    on_gpu = extract(vits16, paths, CUDA, tmp_path)
    on_cpu = extract(vits16.cpu(), paths, torch.device("cpu"), tmp_path)
    cosine = torch.nn.functional.cosine_similarity(on_gpu, on_cpu, dim=1)
    print(f"GPU vs CPU features over {len(paths)} photos: cosine min {cosine.min():.5f}")
    assert cosine.min() > 0.999


def test_batch_size_is_fitted_to_the_gpu(vits16):
    size = fit_batch_size(vits16.to(CUDA), 224, CUDA, "bf16")
    assert size & (size - 1) == 0 and 1 <= size <= 256


def test_training_end_to_end_on_cuda_and_the_artifact_predicts_the_same_on_cpu(tmp_path, synthetic_dataset,
                                                                                 tiny_weights):
    cfg = config.TrainConfig(backbone=TINY_SPEC.name, max_epochs=30)
    metrics = training.run_training(synthetic_dataset, tmp_path / "out", cfg, tiny_weights, tmp_path / "cache",
                                    device="cuda", spec=TINY_SPEC)
    assert metrics["summary"]["device"].startswith("cuda") and metrics["summary"]["runtime"] == "torch"
    on_gpu = Predictor.from_dir(tmp_path / "out", device="cuda")
    on_cpu = Predictor.from_dir(tmp_path / "out")
    images = [on_cpu.load_image(p) for p in sorted(synthetic_dataset.rglob("*.png"))[:8]]
    for a, b in zip(on_gpu.predict(images), on_cpu.predict(images)):
        assert a.label == b.label and abs(a.confidence - b.confidence) < 0.02


def test_predictor_on_cuda_answers_with_attention(tiny_model_dir):
    predictor = Predictor.from_dir(tiny_model_dir, device="cuda")
    assert next(predictor.torch_forward.backbone.parameters()).is_cuda and predictor.runtime == "torch"
    image = predictor.load_image(sample_photos()[0])
    (plain,) = predictor.predict([image])
    (mapped,) = predictor.predict([image], attention=True)
    assert plain.label == mapped.label and mapped.attention.sum() == pytest.approx(1.0, abs=1e-3)


def test_batch_prediction_on_cuda_matches_cpu(tiny_model_dir, synthetic_dataset, tmp_path):
    args = [str(synthetic_dataset / "Car"), "--model-dir", str(tiny_model_dir)]
    assert batch.main([*args, "--device", "cuda", "--output", str(tmp_path / "gpu.csv")]) == 0
    assert batch.main([*args, "--device", "cpu", "--output", str(tmp_path / "cpu.csv")]) == 0
    rows = {}
    for name in ("gpu", "cpu"):
        with open(tmp_path / f"{name}.csv", newline="") as f:
            rows[name] = {row["path"]: row for row in csv.DictReader(f)}
    assert rows["gpu"].keys() == rows["cpu"].keys()
    for path, row in rows["cpu"].items():
        assert rows["gpu"][path]["label"] == row["label"]
