"""Forwards that need torch: the backbone run by torch (DEVICE=cuda, RUNTIME=torch), and the
exported graphs made now from the artifact's modules, for an artifact without an exported model
(trained before export existed) and for training, which converts its backbone once per run.
Importing this module imports torch; the CPU service with an exported model never does.

TorchForward takes what the exported graph takes (centre crops, uint8, NHWC) and returns what it
returns (features, and the [CLS] attention map when asked), through the same module
(backbone.OnCrops), so the predictor, batch prediction and training cannot tell them apart.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from ..artifact import load_artifact
from ..backbone import OnCrops, has_cls_attention
from ..devices import autocast, check_device
from ..export import exported_graph, head_graph
from ..runtime import CPU_BATCH_SIZE, OpenVINOModel, resolve_precision, runtime_for

CUDA_MAX_BATCH_SIZE = 256  # ViT-S/16 bf16 on an H100 runs ~18,000 img/s from batch 256 up


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
        # On the CPU its flags settle "auto" now; a GPU's answer must wait for place() (CUDA).
        self.precision = resolve_precision(precision, self.device) if self.device.type == "cpu" else precision
        self.attention = has_cls_attention(backbone)
        self.input_size = preprocessing["input_size"]
        self.plain = OnCrops(backbone.eval(), preprocessing)
        self.with_attention = OnCrops(backbone, preprocessing, attention=True) if self.attention else None
        self._executor: ThreadPoolExecutor | None = None
        self._pid = -1
        self._lock = threading.Lock()

    @property
    def backbone(self) -> nn.Module:
        return self.plain.backbone

    def place(self) -> None:
        """Move the backbone to its device and settle the precision ("auto": bf16 where the
        device runs it natively); on CUDA both start CUDA in the calling process."""
        self.precision = resolve_precision(self.precision, self.device)
        # cuda:N (a torchrun rank's): pinned memory and kernels on that GPU, not on GPU 0
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.plain.to(self.device)  # the modules share the backbone: one copy moves
        if self.with_attention is not None:
            self.with_attention.to(self.device)

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

    def _ready(self) -> None:
        if self._pid != os.getpid():
            self.start(torch.get_num_threads())

    def __call__(self, crops: np.ndarray, attention: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, attention maps or None) of a uint8 NHWC batch, computed in the forward thread."""
        self._ready()
        return self._executor.submit(self._forward, crops, attention).result()

    @torch.inference_mode()
    def _forward(self, crops, attention: bool):
        module = self.with_attention if attention else self.plain
        with autocast(self.device, self.precision):
            out = module(torch.as_tensor(crops).to(self.device, non_blocking=True))
        features, maps = out if attention else (out, None)
        return features.float().cpu().numpy(), None if maps is None else maps.float().cpu().numpy()

    def map(self, batches: Iterable[tuple[object, np.ndarray]]) -> Iterator[tuple[object, np.ndarray]]:
        """(tag, features) for each (tag, batch), in order, in the forward thread, one batch
        ahead: the next batch's copy and forward are queued on the GPU before the previous
        batch's features are copied back (the copy back waits for the GPU)."""
        self._ready()
        pending = None
        for tag, crops in batches:
            features = self._executor.submit(self._queued, crops).result()
            if pending is not None:
                yield pending[0], pending[1].cpu().numpy()
            pending = (tag, features)
        if pending is not None:
            yield pending[0], pending[1].cpu().numpy()

    @torch.inference_mode()
    def _queued(self, crops) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.plain(torch.as_tensor(crops).to(self.device, non_blocking=True)).float()

    def preferred_batch(self) -> int:
        """CPU_BATCH_SIZE on the CPU; on CUDA the largest power of two up to CUDA_MAX_BATCH_SIZE
        whose forward fits in the GPU's memory (tried, halving on out-of-memory; the successful
        try doubles as the warm-up)."""
        if self.device.type != "cuda":
            return CPU_BATCH_SIZE
        self._ready()
        batch_size, side = CUDA_MAX_BATCH_SIZE, self.input_size
        while True:
            try:
                self._executor.submit(self._queued, np.zeros((batch_size, side, side, 3), np.uint8)).result()
                torch.cuda.synchronize(self.device)  # an out-of-memory error surfaces here at the latest
                return batch_size
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch_size == 1:
                    raise
                batch_size //= 2


def forward_for(backbone: nn.Module, preprocessing: dict, device, precision: str, graph=None,
                mode: str = "throughput"):
    """The one forward for a torch backbone on `device`: on the CPU the exported graph through
    OpenVINO (`graph`, export.exported_graph's made already, or converted now); elsewhere
    TorchForward."""
    if runtime_for(device) == "openvino":
        graph = graph if graph is not None else exported_graph(backbone, preprocessing)
        return OpenVINOModel(graph, resolve_precision(precision, "cpu"), mode)
    return TorchForward(backbone, preprocessing, str(device), precision)


def torch_forward(model_path, device: str, precision: str) -> TorchForward:
    """The artifact's backbone as a TorchForward (every weight checked against its version)."""
    model = load_artifact(model_path)
    return TorchForward(model.backbone, model.preprocessing, device, precision)


def converted_forward(model_path, precision: str, mode: str) -> OpenVINOModel:
    """The artifact's backbone converted to OpenVINO now, graph as export.py writes it."""
    model = load_artifact(model_path)
    return OpenVINOModel(exported_graph(model.backbone, model.preprocessing), precision, mode)


def converted_head(model_path):
    """The artifact's head converted now, graph as export.py writes it (export.head_graph)."""
    return head_graph(load_artifact(model_path).head)
