"""The predictor: an artifact loaded once, images in, labels and calibrated probabilities out
(CPU by default), whether each photo is like the training photos ("in_distribution", ood.py),
and the backbone's [CLS] attention rendered over the image on request (ViT backbones).

On CPU the backbone runs through OpenVINO (runtime.py: by default a lone forward on every core,
overlapping forwards on a core each), and requests that arrive together share one batched
forward (Batcher, one batch per OpenVINO stream). Attention maps come from the torch backbone
(on request only, and they need the attention weights)."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import UserError, config
from .artifact import Model, load_artifact
from .backbone import cls_attention, has_cls_attention
from .features import autocast, resolve_precision, runtime_for
from .images import center_crop, open_image, preprocess
from .ood import ood_scores
from .runtime import OpenVINOBackbone


@dataclass
class Prediction:
    label: str
    confidence: float
    probabilities: dict[str, float]
    attention: np.ndarray | None = None  # (grid_h, grid_w), sums to 1
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


class Predictor:
    def __init__(self, model: Model, precision: str = "auto", device: str = "cpu", runtime: str = "auto",
                 max_image_pixels: int = config.MAX_IMAGE_PIXELS, max_batch: int = config.FORWARD_BATCH,
                 openvino_mode: str = "adaptive", warm_up: bool = True, ood_check: bool = True):
        """`warm_up=False` leaves compiling and warming up to a later `warm_up()` call: a
        gunicorn master must not start OpenVINO's threads before it forks (runtime.py).
        `ood_check=False` leaves every answer's `in_distribution` and `ood_score` None."""
        self.model = model
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        if runtime not in ("auto", "openvino", "torch"):
            raise ValueError(f"runtime must be auto, openvino or torch, not {runtime!r}")
        self.runtime = runtime_for(self.device) if runtime == "auto" else runtime
        if self.runtime == "openvino" and self.device.type != "cpu":
            raise ValueError("the openvino runtime runs on cpu only")
        self.max_image_pixels = max_image_pixels
        # The service's probabilities are the calibrated ones (temperature fitted on validation).
        self.temperature = float((model.metadata.get("calibration") or {}).get("temperature", 1.0))
        ood = model.metadata.get("ood")
        self.ood_threshold = ood["threshold"] if ood_check and ood and model.ood_references is not None else None
        self.ood_references = model.ood_references.to(self.device) if self.ood_threshold is not None else None
        self.attention_available = has_cls_attention(model.backbone)
        self.backbone = model.backbone.to(self.device).eval()
        self.head = model.head.to(self.device).eval()
        self.fast_backbone = None
        if self.runtime == "openvino":
            self.fast_backbone = OpenVINOBackbone(self.backbone, model.preprocessing["input_size"], self.precision,
                                                  mode=openvino_mode)
        self._batcher = Batcher(self._predict_many, max_batch)  # one batch per stream: set by warm_up
        # One torch forward at a time: gunicorn's threads share this predictor, and two
        # concurrent ones would each spread over all torch threads and oversubscribe the cores.
        self._forward_lock = threading.Lock()
        self.num_threads = torch.get_num_threads()  # per forward; warm_up takes the current count
        # Where forwards run: here by default. With the torch runtime under gunicorn's gthread
        # worker, gunicorn.conf.py hands them to the worker's main thread (run_in_main_thread),
        # where torch's OpenMP pool runs them ~1.5x faster than from any other thread.
        self.run_forward: Callable[[Callable], object] = lambda forward: forward()
        if warm_up:
            self.warm_up()

    @classmethod
    def from_dir(cls, model_dir: Path = config.OUTPUT_DIR, **kwargs) -> "Predictor":
        return cls(load_artifact(Path(model_dir) / config.ARTIFACT_FILE), **kwargs)

    @property
    def metadata(self) -> dict:
        return self.model.metadata

    def warm_up(self) -> None:
        """Compile for this process and run forwards (plain and with attention), so the
        first request does not pay for kernel selection. Run again after a fork or after
        changing torch's thread count."""
        self.num_threads = torch.get_num_threads()
        if self.fast_backbone is not None:
            self.fast_backbone.compile(self.num_threads)
            self._batcher.concurrency = self.fast_backbone.streams
        size = self.model.preprocessing["input_size"]
        blank = torch.zeros(1, 3, size, size)
        self.predict_tensors(blank)
        if self.attention_available:
            maps = self.predict_tensors(blank, attention=True)[0].attention
        # Other batch sizes need no warm-up: OpenVINO's first call at a new shape costs ~5 ms
        # more, and every warm-up forward delays a replacement worker's first answer.
        self.predict_tensors(blank)
        if self.attention_available:  # the overlay's first call imports matplotlib's colormaps
            attention_overlay_png(Image.new("RGB", (size, size)), maps, self.model.preprocessing)

    def load_image(self, source: bytes | str | Path) -> Image.Image:
        """Decode an upload (raises images.ImageError with a message fit for the user)."""
        return open_image(source, self.model.preprocessing["resize_size"], self.max_image_pixels)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.model.preprocessing)

    def predict_tensors(self, batch: torch.Tensor, attention: bool = False) -> list[Prediction]:
        return self.run_forward(lambda: self._predict_tensors(batch, attention))

    def predict(self, images: list[Image.Image], attention: bool = False) -> list[Prediction]:
        if attention and not self.attention_available:
            raise AttentionUnavailable(self.model.metadata.get("backbone", {}).get("architecture", "this backbone"))
        tensors = [self.to_tensor(im) for im in images]
        if attention:
            return self._predict_many(tensors, attention=True)
        return self._batcher(tensors)  # batched with the requests waiting beside it

    def _predict_many(self, tensors: list[torch.Tensor], attention: bool = False) -> list[Prediction]:
        # torch.stack is a parallel copy: done where the forward runs, with its thread count.
        return self.run_forward(lambda: self._predict_tensors(tensors, attention))

    @torch.inference_mode()
    def _predict_tensors(self, batch: torch.Tensor | list[torch.Tensor], attention: bool) -> list[Prediction]:
        # torch's forwards run one at a time, each over every core; OpenVINO's run one per
        # stream, in its own threads, and torch only stacks the batch and runs the head: one
        # thread, so that no request thread keeps an OpenMP team spinning beside OpenVINO.
        torch_forward = attention or self.fast_backbone is None
        exclusive = self._forward_lock if torch_forward else contextlib.nullcontext()
        with exclusive, torch_threads(self.num_threads if torch_forward else 1):
            batch = (torch.stack(batch) if isinstance(batch, list) else batch).to(self.device)
            with autocast(self.device, self.precision):
                if attention:
                    features, maps = cls_attention(self.backbone, batch)
                elif self.fast_backbone is not None:
                    features, maps = self.fast_backbone(batch), None
                else:
                    features, maps = self.backbone(batch), None
            features = features.float()  # the head in fp32
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
                attention=None if maps is None else maps[i].cpu().numpy(),
                in_distribution=None if scores is None else scores[i] <= self.ood_threshold,
                ood_score=None if scores is None else scores[i],
            ))
        return predictions


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


def attention_overlay_png(image: Image.Image, attention: np.ndarray, preprocessing: dict) -> bytes:
    """The attention map as a heat overlay on the centre crop the backbone saw, as PNG bytes."""
    from matplotlib import colormaps

    shown = center_crop(image, preprocessing)
    crop = shown.size[0]
    heat = attention - attention.min()
    heat = heat / heat.max() if heat.max() > 0 else heat
    heat_image = Image.fromarray((heat * 255).astype(np.uint8)).resize((crop, crop), Image.Resampling.BILINEAR)
    colored = (colormaps["inferno"](np.asarray(heat_image) / 255.0)[..., :3] * 255).astype(np.uint8)
    blended = Image.blend(shown.convert("RGB"), Image.fromarray(colored), alpha=0.55)
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG")
    return buffer.getvalue()


def run_in_main_thread(defer: Callable) -> Callable[[Callable], object]:
    """A `Predictor.run_forward` that runs each forward through `defer(callback)` (gunicorn
    gthread's `worker.method_queue.defer`, which runs callbacks in the worker's main thread)
    and waits for it in the calling request thread. Forwards are serialised there for free."""

    def run(forward: Callable):
        done: Future = Future()

        def call():
            try:
                done.set_result(forward())
            except BaseException as exc:  # hand it to the request thread, which answers for it
                done.set_exception(exc)

        defer(call)
        return done.result()

    return run
