"""The fast CPU forward: the frozen backbone converted once to OpenVINO, compiled per process.

Measured on this project's 2-core AMD EPYC (AVX512-BF16, no AMX), ViT-S/16 (benchmarks/):
torch eager fp32 62-82 ms per image, torch bf16 autocast 37-50 ms; OpenVINO bf16 ~33 ms at
batch 1 on one stream over both cores, ~25 ms per image with a stream per core both busy, with
[CLS] features as close to fp32 as torch's bf16 (cosine > 0.9999). int8 (NNCF) was faster still
(~22 ms) but flipped the label of up to 24 of 400 sample photos, so it is not offered.

Converting takes ~0.7 s and is done once; compiling takes ~0.2 s and is done in the process
that runs the model. OpenVINO's thread pool does not survive fork(): a child of a process that
has compiled a model hangs in its first inference. So a gunicorn master converts, and each
worker compiles after it forks (OpenVINOBackbone checks the process id).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from . import UserError
from .config import OPENVINO_MODES, PRECISIONS

OPENVINO_PRECISION = {"bf16": "bf16", "fp32": "f32"}


def import_openvino():
    """openvino, without its usage telemetry: on import and on every conversion OpenVINO's
    tools send events to Google Analytics from a child process unless the user opted out. A
    product must not phone home, and that child process outlives forks (gunicorn's workers
    fail to join it at exit). OpenVINO falls back to a stub when the telemetry package cannot
    be imported, which a None entry in sys.modules ensures."""
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino

    return openvino

_core: tuple[int, object] | None = None  # (process id, openvino.Core): one per process


def openvino_core():
    """This process's OpenVINO Core (its plugins and thread pool), made after any fork."""
    global _core
    if _core is None or _core[0] != os.getpid():
        _core = (os.getpid(), import_openvino().Core())
    return _core[1]


class OpenVINOBackbone:
    """`backbone(batch) -> features` as a float32 array, through OpenVINO.

    mode "latency": one stream using `threads` cores, for a service answering one batch at a
    time; "throughput": one stream per core, for feeding many batches (`map`); "adaptive": both
    compiled, a call made while no other runs takes the one stream over every core (a lone
    request answered sooner), calls that overlap take a stream each (more of them per second)."""

    def __init__(self, backbone: nn.Module, input_size: int, precision: str, mode: str = "latency"):
        ov = import_openvino()
        if precision not in OPENVINO_PRECISION:
            raise ValueError(f"precision must be bf16 or fp32, not {precision!r}")
        if mode not in OPENVINO_MODES:
            raise ValueError(f"mode must be one of {', '.join(OPENVINO_MODES)}, not {mode!r}")
        self.precision, self.mode = precision, mode
        example = torch.zeros(1, 3, input_size, input_size)
        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about timm's shape asserts, which hold for the one input size we serve.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
            # Traced here rather than by OpenVINO, to skip the trace check (a second forward
            # and comparison, ~1 s). Tracing and converting start no OpenVINO threads, so this
            # may run before a fork.
            traced = torch.jit.trace(backbone.eval(), example, check_trace=False)
            self._model = ov.convert_model(traced, example_input=example)
        self._pid = -1
        self.streams = 0
        self._lock = threading.Lock()
        self._first_use = threading.Lock()
        self._running = 0  # calls under way (adaptive mode)
        self._solo = None  # the one-stream request (adaptive mode)

    def compile(self, threads: int | None = None) -> None:
        """Compile for this process with `threads` cores (default: torch's thread count).
        Called again after a fork, or to change the thread count."""
        threads = threads or torch.get_num_threads()

        def compiled(hint: str):
            return openvino_core().compile_model(self._model, "CPU", {
                "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[self.precision],
                "PERFORMANCE_HINT": hint,
                "INFERENCE_NUM_THREADS": threads,
            })

        with self._lock:
            main = compiled("LATENCY" if self.mode == "latency" else "THROUGHPUT")
            self.streams = main.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
            self._idle = queue.Queue()
            for _ in range(self.streams):
                self._idle.put(main.create_infer_request())
            self._solo = compiled("LATENCY").create_infer_request() if self.mode == "adaptive" else None
            self._pid = os.getpid()

    def _ready(self) -> None:
        if self._pid != os.getpid():  # first use in this process: compile, once
            with self._first_use:
                if self._pid != os.getpid():
                    self.compile()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of one batch. Up to `streams` calls run at once (in adaptive mode, a call
        that finds none running takes the one-stream form instead); more wait for a stream."""
        self._ready()
        with self._lock:
            solo = self._solo is not None and self._running == 0
            self._running += 1
        request = self._solo if solo else self._idle.get()
        try:
            return torch.from_numpy(np.array(request.infer({0: batch.numpy()})[0], dtype=np.float32))
        finally:
            if not solo:
                self._idle.put(request)
            with self._lock:
                self._running -= 1

    def map(self, batches: Iterable[tuple[object, torch.Tensor]]) -> Iterator[tuple[object, torch.Tensor]]:
        """(tag, features) for each (tag, batch), in order: batches run on all streams at once,
        so the next ones are decoded while earlier ones are computed. Python threads wait on
        OpenVINO's synchronous calls (which release the GIL): no callbacks from its threads."""
        self._ready()
        streams = self.streams

        def run(tag, batch):
            return tag, self(batch)

        with ThreadPoolExecutor(streams) as pool:
            running: deque[Future] = deque()
            for tag, batch in batches:
                running.append(pool.submit(run, tag, batch))
                while running and (running[0].done() or len(running) > streams):
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()


# --- precision ------------------------------------------------------------------------------
def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' is bf16 where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16
    or AMX: 1.3-1.6x fp32 in torch on this project's AMD EPYC (benchmarks/), features within ~1e-4 cosine of fp32), else fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def runtime_for(device: torch.device) -> str:
    return "openvino" if device.type == "cpu" else "torch"


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's thread count for the calling thread, inside the block. OpenMP keeps the count
    per thread: a server's request threads start from OMP_NUM_THREADS, not from warm_up's."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


class DeviceUnavailable(UserError, ValueError):
    """A CUDA device was asked for where torch finds none."""


def check_device(device: torch.device) -> None:
    """Raise DeviceUnavailable, in one line, when `device` is a CUDA device torch does not have.

    Counted by torch.cuda.device_count(), not is_available(): the latter initialises the CUDA
    driver (cuInit), after which a forked child (a gunicorn worker) cannot use CUDA; the count
    comes from NVML and leaves CUDA alone wherever NVML answers (torch's docs, "poison fork")."""
    if device.type != "cuda":
        return
    if not torch.backends.cuda.is_built():
        raise DeviceUnavailable(f"{device} asked for, but this torch build ({torch.__version__}) has no CUDA "
                                "support: install a CUDA build of torch, or use the cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise DeviceUnavailable(f"{device} asked for, but torch ({torch.__version__}) finds no CUDA device here "
                                "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them): use the cpu")
    if (device.index or 0) >= count:
        raise DeviceUnavailable(f"{device} asked for, but torch finds {count} CUDA device(s) here")
