"""The CUDA paths: extraction, training end to end, the Predictor (its torch forward on the
GPU), batch prediction, the service with DEVICE=cuda under gunicorn, and features, answers and
attention maps that agree with the CPU's (OpenVINO: the exported graph) within bf16's error.
Skipped, with the reason, on machines without CUDA (tests marked `cuda`, see conftest.py)."""

import base64
import csv
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from conftest import REPO, TINY_SPEC, sample_photos
from harness.live import gunicorn_service
from vehicle_classifier import config, registry
from vehicle_classifier.offline import batch
from vehicle_classifier.training.job import Job
from vehicle_classifier.training.run import run_training
from vehicle_classifier.backbone import create_backbone, preprocessing_for
from vehicle_classifier.model.torch_forward import forward_for
from vehicle_classifier.training.features import FeatureCache, extract_features
from vehicle_classifier.model.predictor import Predictor

pytestmark = [pytest.mark.system, pytest.mark.cuda]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def vits16():
    torch.manual_seed(0)
    return create_backbone(registry.BACKBONES["dino-vits16"].architecture).eval()


def extract(model, paths, device, tmp_path):
    preprocessing = preprocessing_for(model)
    forward = forward_for(model, preprocessing, device, "bf16")
    with FeatureCache(tmp_path / device.type, "k") as cache:
        found, failures = extract_features(forward, paths, [str(p) for p in paths], preprocessing, cache)
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
    size = forward_for(vits16, preprocessing_for(vits16), CUDA, "bf16").preferred_batch()
    assert size & (size - 1) == 0 and 1 <= size <= 256


def test_training_end_to_end_on_cuda_and_the_artifact_predicts_the_same_on_cpu(tmp_path, synthetic_dataset,
                                                                                 tiny_weights):
    cfg = config.TrainConfig(backbone=TINY_SPEC.name, max_epochs=30)
    metrics = run_training(Job(synthetic_dataset, tmp_path / "out", cfg, tiny_weights, tmp_path / "cache",
                               device="cuda", spec=TINY_SPEC))
    assert metrics["summary"]["device"].startswith("cuda") and metrics["summary"]["runtime"] == "torch"
    on_gpu = Predictor.from_dir(tmp_path / "out", device="cuda")
    on_cpu = Predictor.from_dir(tmp_path / "out")
    images = [on_cpu.load_image(p) for p in sorted(synthetic_dataset.rglob("*.png"))[:8]]
    for a, b in zip(on_gpu.predict(images), on_cpu.predict(images)):
        assert a.label == b.label and abs(a.confidence - b.confidence) < 0.02


def test_predictor_on_cuda_answers_with_attention_as_the_cpu_does(tiny_model_dir):
    predictor = Predictor.from_dir(tiny_model_dir, device="cuda")
    assert predictor.source == "torch" and predictor.runtime == "torch"
    assert next(predictor.forward.backbone.parameters()).is_cuda  # placed by warm_up
    image = predictor.load_image(sample_photos()[0])
    (plain,) = predictor.predict([image])
    (mapped,) = predictor.predict([image], attention=True)
    assert plain.label == mapped.label and plain.attention_png is None
    overlay = Image.open(io.BytesIO(base64.b64decode(mapped.attention_png)))
    assert overlay.format == "PNG" and overlay.size == predictor.crop(image).size
    # The map under the overlay: the GPU's (torch) against the CPU service's (the exported graph).
    pixels = np.array(predictor.crop(image))[None]
    _, on_gpu = predictor.forward(pixels, True)
    cpu = Predictor.from_dir(tiny_model_dir)
    assert cpu.source == "exported"
    _, on_cpu = cpu.forward(pixels, True)
    assert on_gpu.shape == on_cpu.shape == (1, 4, 4)  # the tiny ViT: 32 px in patches of 8
    assert np.abs(on_gpu - on_cpu).max() < 0.01, (on_gpu, on_cpu)


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


# A process that made the service's app with DEVICE=cuda forks (as gunicorn's master does),
# and the child uses CUDA: torch refuses that in a child whose parent had started CUDA.
FORK_AFTER_LOADING = """
import os, predict, torch
pid = os.fork()
if pid == 0:
    try:
        torch.ones(1, device="cuda").add_(1).item()
        os._exit(0)
    except BaseException as exc:
        print(exc, flush=True)
        os._exit(1)
print(torch.cuda.is_initialized(), os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_the_service_loads_for_cuda_without_starting_it_so_forked_workers_can(tiny_model_dir):
    # OMP_NUM_THREADS=1: no OpenMP pool before the fork either, as gunicorn.conf.py has it.
    env = {**os.environ, "MODEL_DIR": str(tiny_model_dir), "DEVICE": "cuda", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", FORK_AFTER_LOADING], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False 0", out.stdout


def test_gunicorn_on_cuda_answers_concurrent_requests_as_the_cpu_does(tiny_model_dir, tmp_path):
    """DEVICE=cuda as deployed: the master loads on the CPU, each of two workers moves its copy
    to the GPU after the fork (a worker that could not would fail to boot, and gunicorn with
    it); concurrent multi-photo requests share forwards and answer as the CPU does."""
    photos = sample_photos()[::20]
    cpu = Predictor.from_dir(tiny_model_dir)  # the default service's answers: OpenVINO on the CPU
    expected = dict(zip(photos, cpu.predict([cpu.load_image(p) for p in photos])))
    groups = [photos[i:i + 3] for i in range(0, len(photos), 3)] * 3
    settings = {"DEVICE": "cuda", "GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "8"}
    with gunicorn_service(tiny_model_dir, tmp_path / "gunicorn.log", settings) as url:
        serving = requests.get(f"{url}/metadata", timeout=10).json()["serving"]

        def post(group):
            files = [("file", (p.name, p.read_bytes())) for p in group]
            response = requests.post(f"{url}/predict", files=files, timeout=60)
            assert response.status_code == 200, response.text
            answer = response.json()
            return list(zip(group, answer["predictions"] if len(group) > 1 else [answer]))

        with ThreadPoolExecutor(8) as pool:
            answers = [pair for pairs in pool.map(post, groups) for pair in pairs]
    assert serving["device"] == "cuda" and serving["runtime"] == "torch" and serving["precision"] in ("bf16", "fp32")
    assert len(answers) == 3 * len(photos)
    for path, answer in answers:
        on_cpu = expected[path]
        assert answer["probabilities"] == pytest.approx(on_cpu.probabilities, abs=0.02), path
        if on_cpu.confidence > 0.55:  # bf16 on either side may flip a coin toss, nothing more
            assert answer["label"] == on_cpu.label, path
