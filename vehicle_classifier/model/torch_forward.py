"""The backbone through torch, for the service's other paths: RUNTIME=torch, DEVICE=cuda, or an
artifact without an exported model (trained before export existed: converted to OpenVINO at
start, as `python -m vehicle_classifier.export` would). Importing this module imports torch; the
CPU service with an exported model never does.

Both forwards take what the exported graph takes (centre crops, uint8, NHWC) and return what it
returns (features, and the [CLS] attention map when asked), so the predictor cannot tell them
apart.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from ..artifact import load_artifact
from ..backbone import cls_attention, has_cls_attention
from ..devices import autocast, check_device
from ..export import to_openvino
from ..runtime import OpenVINOModel, resolve_precision


class TorchForward:
    """The torch backbone's forwards, one at a time, in one thread of this process's own.

    torch's OpenMP runtime keeps a team of worker threads per calling thread: forwards called
    from a server's many request threads would start a team each, and the spinning teams
    oversubscribe the cores. One forward thread keeps one team, sized once (`start`).
    On a GPU the backbone stays on the CPU until `place()`: a forked child cannot use a CUDA
    context its parent made, so each gunicorn worker places its own copy after the fork."""

    streams = 1

    def __init__(self, backbone: nn.Module, preprocessing: dict, device: str, precision: str):
        self.device = torch.device(device)
        check_device(self.device)
        self.backbone = backbone.eval()
        # On the CPU its flags settle "auto" now; a GPU's answer must wait for place() (CUDA).
        self.precision = resolve_precision(precision, self.device) if self.device.type == "cpu" else precision
        self.attention = has_cls_attention(backbone)
        self.mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self._executor: ThreadPoolExecutor | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def place(self) -> None:
        """Move the backbone to its device and settle the precision ("auto": bf16 where the
        device runs it natively); on CUDA both start CUDA in the calling process."""
        self.precision = resolve_precision(self.precision, self.device)
        self.backbone = self.backbone.to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)

    def start(self, threads: int) -> None:
        """(Re)start the forward thread in this process with `threads` torch threads (after a
        fork, the parent's thread is gone), with the backbone on its device."""
        with self._lock:
            self.place()
            if self._executor is not None and self._pid == os.getpid():
                self._executor.shutdown(wait=True)
            self._executor = ThreadPoolExecutor(1, "torch-forward", initializer=torch.set_num_threads,
                                                initargs=(threads,))
            self._pid = os.getpid()

    def __call__(self, pixels: np.ndarray, attention: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, attention maps or None) of a uint8 NHWC batch, computed in the forward thread."""
        if self._pid != os.getpid():
            self.start(torch.get_num_threads())
        return self._executor.submit(self._forward, pixels, attention).result()

    @torch.inference_mode()
    def _forward(self, pixels: np.ndarray, attention: bool):
        batch = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float()
        batch = batch.div_(255).sub_(self.mean).div_(self.std)  # images.preprocess, on the batch
        with autocast(self.device, self.precision):
            features, maps = cls_attention(self.backbone, batch) if attention else (self.backbone(batch), None)
        return features.float().cpu().numpy(), None if maps is None else maps.float().cpu().numpy()


def torch_forward(model_path, device: str, precision: str) -> TorchForward:
    """The artifact's backbone as a TorchForward (every weight checked against its version)."""
    model = load_artifact(model_path)
    return TorchForward(model.backbone, model.preprocessing, device, precision)


def converted_forward(model_path, precision: str, mode: str) -> OpenVINOModel:
    """The artifact's backbone converted to OpenVINO now, graph as export.py writes it."""
    model = load_artifact(model_path)
    preprocessing = model.preprocessing
    graph = to_openvino(model.backbone, preprocessing["input_size"], preprocessing,
                        attention=has_cls_attention(model.backbone))
    return OpenVINOModel(graph, precision, mode)
