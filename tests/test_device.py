"""The service's DEVICE setting where there is no GPU (as in CI): its values, the refusals, and
the deferred move to the device. A gunicorn master loads the model and forks its workers; a
forked child cannot use a CUDA context its parent made, so with DEVICE=cuda nothing may touch
CUDA before a worker's warm_up. Served on a real GPU: tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vehicle_classifier import config
from vehicle_classifier.serving.api import EXTENSION, create_app
from vehicle_classifier.config import ServiceConfig
from vehicle_classifier.devices import DeviceUnavailable, check_device
from vehicle_classifier.model.predictor import Predictor
from vehicle_classifier.model.torch_forward import torch_forward

pytestmark = pytest.mark.integration


class CudaTouched(Exception):
    pass


@pytest.fixture()
def cuda_off_limits(monkeypatch):
    """torch reports one GPU (so DEVICE=cuda passes its check), and starting CUDA raises:
    torch.cuda._lazy_init is what every CUDA call goes through first (moving a tensor,
    is_bf16_supported, current_device)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def touched():
        raise CudaTouched("CUDA initialised")

    monkeypatch.setattr(torch.cuda, "_lazy_init", touched)


def backbone_device(predictor: Predictor) -> str:
    """Where the torch forward's backbone is (the head graph and the references stay on the CPU)."""
    return next(predictor.forward.backbone.parameters()).device.type


def test_device_setting_values():
    assert ServiceConfig.from_env({}).device == "cpu"
    assert ServiceConfig.from_env({"DEVICE": "cpu"}) == ServiceConfig()
    assert ServiceConfig.from_env({"DEVICE": " cuda "}).device == "cuda"
    with pytest.raises(ValueError, match=r"^DEVICE must be one of cpu, cuda, not 'gpu'$"):
        ServiceConfig.from_env({"DEVICE": "gpu"})


def test_cuda_where_torch_finds_none_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(DeviceUnavailable, match=r"^cuda asked for, but torch \(.*\) finds no CUDA device here") as e:
        check_device(torch.device("cuda"))
    assert "\n" not in str(e.value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceUnavailable, match=r"^cuda:1 asked for, but torch finds 1 CUDA device\(s\) here$"):
        check_device(torch.device("cuda:1"))
    check_device(torch.device("cuda:0"))
    check_device(torch.device("cpu"))


def test_the_app_on_cuda_leaves_cuda_alone_until_a_worker_warms_up(tiny_model_dir, cuda_off_limits):
    app = create_app(ServiceConfig(model_dir=tiny_model_dir, device="cuda"))  # as in gunicorn's master
    predictor = app.extensions[EXTENSION].predictor
    assert predictor.device == "cuda" and predictor.runtime == "torch" and predictor.source == "torch"
    assert backbone_device(predictor) == "cpu"
    assert predictor.precision == "auto"  # bf16 or fp32 is the GPU's to say, in the worker
    assert predictor._batcher.max_items == config.FORWARD_BATCH_CUDA
    with pytest.raises(CudaTouched):
        predictor.warm_up()  # gunicorn.conf.py's post_worker_init, after the fork
    with pytest.raises(CudaTouched):  # or the first request, where nothing warmed it up
        predictor.predict_crops([Image.new("RGB", (32, 32))])


def test_openvino_with_cuda_is_refused(tiny_model_dir, cuda_off_limits):
    with pytest.raises(ValueError, match="the openvino runtime runs on the cpu only, not on cuda: use runtime auto "
                                         "or torch"):
        Predictor.from_dir(tiny_model_dir, device="cuda", runtime="openvino", warm_up=False)


def test_the_torch_forward_moves_to_its_device_when_started(tiny_model_dir):
    # "meta" stands in for a GPU: a device this machine has whose tensors are visibly not on
    # the CPU. Like CUDA, the forward stays on the CPU until a worker starts it.
    forward = torch_forward(tiny_model_dir / config.ARTIFACT_FILE, "meta", "fp32")
    assert next(forward.plain.parameters()).device.type == "cpu"
    forward.start(1)
    assert next(forward.plain.parameters()).device.type == "meta" and forward.plain.mean.device.type == "meta"
    assert next(forward.with_attention.parameters()).device.type == "meta"  # the same backbone, moved once


def test_a_cpu_predictor_with_torch_runs_on_the_cpu(tiny_model_dir):
    predictor = Predictor.from_dir(tiny_model_dir, runtime="torch", warm_up=False)
    assert backbone_device(predictor) == "cpu" and predictor.source == "torch"
    assert predictor.precision in ("bf16", "fp32") and predictor._batcher.max_items == config.FORWARD_BATCH
