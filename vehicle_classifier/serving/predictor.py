"""The predictor: an artifact loaded once, images in, labels and calibrated probabilities out
(CPU by default), whether each photo is like the training photos ("in_distribution", ood.py),
and the backbone's [CLS] attention rendered over the image on request (ViT backbones).

One forward path per runtime: OpenVINO on CPU (runtime.py: by default a lone forward on every
core, overlapping forwards on a core each), torch otherwise (RUNTIME=torch, or CUDA), in a
thread of its own (TorchForward). Requests that arrive together share one batched forward
(Batcher, one batch per OpenVINO stream). Attention maps come from the torch backbone (on
request only: they need the attention weights); the answer is the runtime's, with or without
them. On a GPU a predictor that is not warmed up at once keeps the model on the CPU until it
is (Predictor.place): a gunicorn master loads it, each forked worker starts CUDA for itself."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import UserError, config
from ..artifact import Model, load_artifact
from ..backbone import cls_attention, has_cls_attention
from ..images import open_image, preprocess
from ..ood import ood_scores
from ..runtime import OpenVINOBackbone, autocast, check_device, resolve_precision, runtime_for, torch_threads


@dataclass
class Prediction:
    label: str
    confidence: float
    probabilities: dict[str, float]
    # (grid_h, grid_w): the last block's [CLS]-to-patch attention, averaged over heads (the
    # [CLS]-to-[CLS] weight is left out, so it sums to a little less than 1).
    attention: np.ndarray | None = None
    # False: the photo lies farther from the training photos than the threshold (neither a car
    # nor a bike?); None when the check is off or the artifact has no reference features.
    in_distribution: bool | None = None
    ood_score: float | None = None  # mean cosine distance to the nearest training features

    def to_json(self) -> dict:
        return {"label": self.label, "confidence": self.confidence, "probabilities": self.probabilities,
                "in_distribution": self.in_distribution, "ood_score": self.ood_score}


class AttentionUnavailable(UserError, ValueError):
    """Attention maps were asked of a backbone without [CLS] self-attention (a CNN)."""

    def __init__(self, architecture: str):
        super().__init__(f"attention maps are not available for this backbone ({architecture}): it has no [CLS] "
                         "self-attention; ask without attention=1")


class Batcher:
    """`batcher(items) -> results`, one result per item, from many threads at once: the items
    of calls that wait together go through one `run(all_items)` (up to `max_items`, and at
    least one call's worth), with up to `concurrency` batches running at once. A waiting
    caller runs each batch; no thread of its own."""

    def __init__(self, run: Callable[[list], list], max_items: int, concurrency: int = 1):
        self.run, self.max_items, self.concurrency = run, max_items, concurrency
        self._waiting: list[tuple[list, Future]] = []
        self._running = 0
        self._changed = threading.Condition()

    def __call__(self, items: list) -> list:
        mine: Future = Future()
        with self._changed:
            self._waiting.append((items, mine))
        while True:
            with self._changed:
                # Wait while the slots are full, or while this caller's items are in a batch
                # that another caller runs (nothing waits).
                while (self._running >= self.concurrency or not self._waiting) and not mine.done():
                    self._changed.wait()
                if mine.done():
                    return mine.result()
                self._running += 1
                batch, count = [], 0
                while self._waiting and (not batch or count + len(self._waiting[0][0]) <= self.max_items):
                    batch.append(self._waiting.pop(0))
                    count += len(batch[-1][0])
            try:
                results = self.run([item for items_, _ in batch for item in items_])
                start = 0
                for items_, future in batch:
                    future.set_result(results[start:start + len(items_)])
                    start += len(items_)
            except BaseException as exc:  # every caller in the batch answers for it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            finally:
                with self._changed:
                    self._running -= 1
                    self._changed.notify_all()


class TorchForward:
    """The torch backbone's forwards, one at a time, in one thread of this process's own.

    torch's OpenMP runtime keeps a team of worker threads per calling thread: forwards called
    from a server's many request threads would start a team each, and the spinning teams
    oversubscribe the cores. One forward thread keeps one team, sized once (`start`)."""

    def __init__(self, backbone: nn.Module, device: torch.device, precision: str):
        self.backbone, self.device, self.precision = backbone, device, precision
        self._executor: ThreadPoolExecutor | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def start(self, threads: int) -> None:
        """(Re)start the forward thread in this process with `threads` torch threads (after a
        fork, the parent's thread is gone)."""
        with self._lock:
            if self._executor is not None and self._pid == os.getpid():
                self._executor.shutdown(wait=True)
            self._executor = ThreadPoolExecutor(1, "torch-forward", initializer=torch.set_num_threads,
                                                initargs=(threads,))
            self._pid = os.getpid()

    def __call__(self, tensors: list[torch.Tensor], attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, attention maps or None) of the images, computed in the forward thread."""
        if self._pid != os.getpid():
            self.start(torch.get_num_threads())
        return self._executor.submit(self._forward, tensors, attention).result()

    @torch.inference_mode()
    def _forward(self, tensors: list[torch.Tensor], attention: bool):
        batch = torch.stack(tensors).to(self.device)  # a parallel copy: in this thread's team
        with autocast(self.device, self.precision):
            if attention:
                return cls_attention(self.backbone, batch)
            return self.backbone(batch), None


class Predictor:
    def __init__(self, model: Model, precision: str = "auto", device: str = "cpu", runtime: str = "auto",
                 max_batch: int | None = None, openvino_mode: str = config.OPENVINO_MODES[0],
                 warm_up: bool = True, ood_check: bool = True):
        """`warm_up=False` leaves compiling and warming up to a later `warm_up()` call: a
        gunicorn master must start no OpenVINO or OpenMP threads before it forks (runtime.py).
        On a GPU (any device but the CPU) it also leaves the model on the CPU until then (or until
        `place()`, or the first use): a forked child cannot use a CUDA context its parent made,
        so each worker makes its own. `ood_check=False` leaves every answer's `in_distribution` and `ood_score` None.
        `max_batch`: images per shared forward (default config.FORWARD_BATCH, or _CUDA)."""
        self.model = model
        self.device = torch.device(device)
        check_device(self.device)
        if precision not in config.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(config.PRECISIONS)}, not {precision!r}")
        self.precision = precision  # "auto" is resolved for the device by place()
        if runtime not in config.RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(config.RUNTIMES)}, not {runtime!r}")
        self.runtime = runtime_for(self.device) if runtime == "auto" else runtime
        if self.runtime == "openvino" and self.device.type != "cpu":
            raise ValueError(f"the openvino runtime runs on the cpu only, not on {self.device}: use runtime auto "
                             "or torch")
        self._openvino_mode = openvino_mode  # for the OpenVINO backbone, made by place()
        # The service's probabilities are the calibrated ones (training.calibrate fitted the temperature).
        self.temperature = float((model.metadata.get("calibration") or {}).get("temperature", 1.0))
        ood = model.metadata.get("ood")
        self.ood_threshold = ood["threshold"] if ood_check and ood and model.ood_references is not None else None
        self.attention_available = has_cls_attention(model.backbone)
        # Set by place(): the model's parts on the device, and its forwards.
        self.head: nn.Module | None = None
        self.ood_references: torch.Tensor | None = None
        self.torch_forward: TorchForward | None = None
        self.openvino: OpenVINOBackbone | None = None
        self._placed = False
        self._placing = threading.Lock()
        if max_batch is None:
            max_batch = config.FORWARD_BATCH_CUDA if self.device.type == "cuda" else config.FORWARD_BATCH
        self._batcher = Batcher(self._predict_batch, max_batch)  # one batch per stream: set by warm_up
        if warm_up or self.device.type == "cpu":
            self.place()
        if warm_up:
            self.warm_up()

    @classmethod
    def from_dir(cls, model_dir: Path = config.OUTPUT_DIR, **kwargs) -> "Predictor":
        return cls(load_artifact(Path(model_dir) / config.ARTIFACT_FILE), **kwargs)

    @property
    def metadata(self) -> dict:
        return self.model.metadata

    @property
    def openvino_mode(self) -> str | None:
        return self.openvino.mode if self.openvino is not None else None

    def place(self) -> None:
        """Put the head, the reference features and the backbone on the device, settle the
        precision ("auto": bf16 where the device runs it natively) and make the forwards, once.
        On CUDA this starts CUDA in the calling process: a gunicorn worker does it in warm_up,
        after the fork, never the master."""
        if self._placed:
            return
        with self._placing:
            if self._placed:
                return
            self.precision = resolve_precision(self.precision, self.device)
            self.head = self.model.head.to(self.device).eval()
            if self.ood_threshold is not None:
                self.ood_references = self.model.ood_references.to(self.device)
            backbone = self.model.backbone.to(self.device).eval()
            self.torch_forward = TorchForward(backbone, self.device, self.precision)
            if self.runtime == "openvino":
                self.openvino = OpenVINOBackbone(backbone, self.model.preprocessing["input_size"], self.precision,
                                                 mode=self._openvino_mode)
            self._placed = True

    def warm_up(self) -> None:
        """Place the model (see place), compile for this process and run forwards (plain and
        with attention), so the first request does not pay for kernel selection. Run again
        after a fork or after changing torch's thread count."""
        self.place()
        threads = torch.get_num_threads()
        self.torch_forward.start(threads)
        if self.openvino is not None:
            self.openvino.compile(threads)
            self._batcher.concurrency = self.openvino.streams
        size = self.model.preprocessing["input_size"]
        blank = [torch.zeros(3, size, size)]
        self.predict_tensors(blank)
        if self.attention_available:
            maps = self.predict_tensors(blank, attention=True)[0].attention
        # Other batch sizes need no warm-up: OpenVINO's first call at a new shape costs ~5 ms
        # more, and every warm-up forward delays a replacement worker's first answer.
        self.predict_tensors(blank)
        if self.attention_available:  # the overlay's first call imports matplotlib's colormaps
            attention_overlay_png(Image.new("RGB", (size, size)), maps)

    def load_image(self, source: bytes | str | Path, max_pixels: int = config.MAX_IMAGE_PIXELS) -> Image.Image:
        """Decode an image (raises images.ImageError with a message fit for the user)."""
        return open_image(source, self.model.preprocessing["resize_size"], max_pixels)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.model.preprocessing)

    def predict(self, images: list[Image.Image], attention: bool = False) -> list[Prediction]:
        if attention and not self.attention_available:
            raise AttentionUnavailable(self.model.metadata.get("backbone", {}).get("architecture", "this backbone"))
        return self.predict_tensors([self.to_tensor(im) for im in images], attention)

    def predict_tensors(self, tensors: list[torch.Tensor], attention: bool = False) -> list[Prediction]:
        """Predictions for preprocessed images (CHW tensors); without attention, batched with
        the calls of other threads waiting beside this one."""
        self.place()  # a no-op once placed (warm_up places before the first request under gunicorn)
        if attention:
            return self._predict_batch(tensors, attention=True)
        return self._batcher(tensors)

    def _predict_batch(self, tensors: list[torch.Tensor], attention: bool = False) -> list[Prediction]:
        if self.openvino is None:
            features, maps = self.torch_forward(tensors, attention)
        else:  # OpenVINO runs in its own threads; torch only stacks, on this thread alone
            with torch_threads(1):
                features, maps = self.openvino(torch.stack(tensors)), None
            if attention:  # the map needs torch's attention weights; the answer stays the one without it
                maps = self.torch_forward(tensors, attention=True)[1]
        return self.predict_features(features, maps)

    def predict_features(self, features: torch.Tensor, maps: torch.Tensor | None = None) -> list[Prediction]:
        """Predictions from the backbone's features (one row per image, on any device). Batch
        prediction computes the features itself (features.backbone_features) and ends here."""
        self.place()
        with torch.inference_mode(), torch_threads(1):  # the head, in fp32: a few small matmuls
            features = features.float().to(self.device)
            probabilities = (self.head(features) / self.temperature).softmax(dim=1).cpu()
            scores = None if self.ood_threshold is None else ood_scores(features, self.ood_references).tolist()
        names = self.model.class_names
        predictions = []
        for i, probs in enumerate(probabilities.tolist()):
            best = int(np.argmax(probs))
            predictions.append(Prediction(
                label=names[best],
                confidence=probs[best],
                probabilities=dict(zip(names, probs)),
                attention=None if maps is None else maps[i].float().cpu().numpy(),
                in_distribution=None if scores is None else scores[i] <= self.ood_threshold,
                ood_score=None if scores is None else scores[i],
            ))
        return predictions


def attention_overlay_png(crop: Image.Image, attention: np.ndarray) -> bytes:
    """The attention map as a heat overlay on `crop` (the centre crop the backbone saw:
    images.center_crop), as PNG bytes."""
    from matplotlib import colormaps

    size = crop.size
    heat = attention - attention.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    heat_image = Image.fromarray((heat * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    colored = (colormaps["inferno"](np.asarray(heat_image) / 255.0)[..., :3] * 255).astype(np.uint8)
    blended = Image.blend(crop.convert("RGB"), Image.fromarray(colored), alpha=0.55)
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG")
    return buffer.getvalue()
