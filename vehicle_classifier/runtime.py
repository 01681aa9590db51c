"""How a forward runs on this machine: the precision, and the fast CPU forward through OpenVINO.
No torch here: the CPU service runs the exported backbone (export.py) with openvino alone.

Measured on this project's 2-core AMD EPYC (AVX512-BF16, no AMX), ViT-S/16 (benchmarks/):
torch eager fp32 62-82 ms per image, torch bf16 autocast 37-50 ms; OpenVINO bf16 ~33 ms at
batch 1 on one stream over both cores, ~25 ms per image with a stream per core both busy, with
[CLS] features as close to fp32 as torch's bf16 (cosine > 0.9999). int8 (the graph quantized by
NNCF, export.quantize) is faster still (~25 ms) but its fidelity depends on the model, so
'auto' serves it only where training's fidelity gate held (metrics.json "int8").

Converting takes ~0.7 s and is done once; compiling takes ~0.2 s and is done in the process
that runs the model. OpenVINO's thread pool does not survive fork(): a child of a process that
has compiled a model hangs in its first inference. So a gunicorn master reads (or converts) the
model, and each worker compiles after it forks (OpenVINOModel checks the process id).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .config import OPENVINO_MODES, PRECISIONS

# int8: the quantized graph's int8 ops run as int8 whatever the hint; the ops left float run in
# f32 (faster than bf16 around int8 ones in issue #26's trial: 24.7 against 28.6 ms).
OPENVINO_PRECISION = {"bf16": "bf16", "fp32": "f32", "int8": "f32"}
CPU_BATCH_SIZE = 16  # a stream per core: batches of 16 keep each stream busy (extraction, batch prediction)
RT_INFO_VERSION = ["vehicle_classifier", "model_version"]  # where an exported graph records its artifact


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


class OpenVINOModel:
    """An `openvino.Model` (export.exported_graph, or its saved files) run through OpenVINO, as
    every forward is called: `model(crops, attention) -> (features, maps or None)` as float32
    arrays, `model.map(batches)` to keep every stream busy, `model.outputs(batch)` for any
    graph (the head's: export.head_graph).

    mode "latency": one stream using `threads` cores, for a service answering one batch at a
    time; "throughput": one stream per core, for feeding many batches (`map`); "adaptive": both
    compiled, a call made while no other runs takes the one stream over every core (a lone
    request answered sooner), calls that overlap take a stream each (more of them per second)."""

    device = "cpu"

    def __init__(self, model, precision: str, mode: str = "latency"):
        if precision not in OPENVINO_PRECISION:
            raise ValueError(f"precision must be one of {', '.join(OPENVINO_PRECISION)}, not {precision!r}")
        if mode not in OPENVINO_MODES:
            raise ValueError(f"mode must be one of {', '.join(OPENVINO_MODES)}, not {mode!r}")
        self.precision, self.mode = precision, mode
        self.graph = model  # the openvino.Model, compiled per process
        self.attention = len(model.outputs) > 1  # export.exported_graph: features, then attention
        self._pid = -1
        self.streams = 0
        self._lock = threading.Lock()
        self._first_use = threading.Lock()
        self._running = 0  # calls under way (adaptive mode)
        self._solo = None  # the one-stream request (adaptive mode)

    def preferred_batch(self) -> int:
        return CPU_BATCH_SIZE

    def compile(self, threads: int | None = None) -> None:
        """Compile for this process with `threads` cores (default: every usable core).
        Called again after a fork, or to change the thread count (`start`, as every forward)."""
        threads = threads or usable_cores()

        def compiled(hint: str):
            return openvino_core().compile_model(self.graph, "CPU", {
                "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[self.precision],
                "PERFORMANCE_HINT": hint,
                "INFERENCE_NUM_THREADS": threads,
                # Pinning only when this process takes every core it may use: processes that share
                # the cores (Ray actors, gunicorn workers) each pin their threads to the first
                # cores, so three one-thread actors ran on one core of two (measured: 3 processes
                # 26.6 img/s pinned, 55.3 unpinned, ViT-S/16 int8, 2-core EPYC).
                "ENABLE_CPU_PINNING": threads >= usable_cores(),
            })

        with self._lock:
            main = compiled("LATENCY" if self.mode == "latency" else "THROUGHPUT")
            self.streams = main.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
            self._idle = queue.Queue()
            for _ in range(self.streams):
                self._idle.put(main.create_infer_request())
            self._solo = compiled("LATENCY").create_infer_request() if self.mode == "adaptive" else None
            self._pid = os.getpid()

    start = compile

    def _ready(self) -> None:
        if self._pid != os.getpid():  # first use in this process: compile, once
            with self._first_use:
                if self._pid != os.getpid():
                    self.compile()

    def __call__(self, crops: np.ndarray, attention: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, the [CLS] attention maps when asked for, else None) of one batch."""
        outputs = self.outputs(crops)
        return outputs[0], outputs[1] if attention else None

    def outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of one batch, as float32. Up to `streams` calls run at once (in adaptive
        mode, a call that finds none running takes the one-stream form instead); more wait for
        a stream."""
        self._ready()
        with self._lock:
            solo = self._solo is not None and self._running == 0
            self._running += 1
        request = self._solo if solo else self._idle.get()
        try:
            results = request.infer({0: np.asarray(batch)})  # a torch tensor too (a DataLoader's)
            return [np.array(results[output], dtype=np.float32) for output in request.model_outputs]
        finally:
            if not solo:
                self._idle.put(request)
            with self._lock:
                self._running -= 1

    def map(self, batches: Iterable[tuple[object, np.ndarray]]) -> Iterator[tuple[object, np.ndarray]]:
        """(tag, features) for each (tag, batch), in order: batches run on all streams at once,
        so the next ones are decoded while earlier ones are computed. Python threads wait on
        OpenVINO's synchronous calls (which release the GIL): no callbacks from its threads."""
        self._ready()
        streams = self.streams

        def run(tag, batch):
            return tag, self.outputs(batch)[0]

        with ThreadPoolExecutor(streams) as pool:
            running: deque[Future] = deque()
            for tag, batch in batches:
                running.append(pool.submit(run, tag, batch))
                while running and (running[0].done() or len(running) > streams):
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()


def read_exported(path: Path, model_version: str):
    """The exported model at `path` (export.py), if it was exported from the artifact whose
    version is `model_version`; None if it is missing or belongs to another model."""
    if not Path(path).is_file():
        return None
    model = openvino_core().read_model(str(path))
    if not model.has_rt_info(RT_INFO_VERSION) or model.get_rt_info(RT_INFO_VERSION).astype(str) != model_version:
        return None
    return model


# --- precision and cores --------------------------------------------------------------------
def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or a job scheduler's
    share, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_flags() -> set[str]:
    """The kernel's CPU flags: no torch, and nothing that starts threads before a fork."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no fast paths
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_supports_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_supports_int8() -> bool:
    """Whether the CPU has int8 dot products (VNNI or AMX), without which int8 is no faster."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_precision(requested: str, device, int8_gate: bool = False) -> str:
    """'auto' is int8 on CPUs with int8 dot products when `int8_gate` (training's fidelity gate
    held and the quantized graph is there), else bf16 where the hardware runs it natively (CUDA
    with bf16, CPUs with AVX512-BF16 or AMX: 1.3-1.6x fp32 on this project's AMD EPYC
    (benchmarks/), features within ~1e-4 cosine of fp32), else fp32. `device`: "cpu", "cuda",
    "cuda:1" or a torch.device."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "int8" and runtime_for(device) != "openvino":
        raise ValueError(f"precision int8 runs on the cpu only (the OpenVINO graph), not on {device}")
    if requested != "auto":
        return requested
    if runtime_for(device) == "torch":  # CUDA: torch is there
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if int8_gate and cpu_supports_int8():
        return "int8"
    return "bf16" if cpu_supports_bf16() else "fp32"


def runtime_for(device) -> str:
    """openvino on the CPU, torch on anything else."""
    return "openvino" if str(device).split(":")[0] == "cpu" else "torch"
