"""The predictor: a model folder read once, photos in, answers out: the label and calibrated
probabilities, whether each photo is like the training photos ("in_distribution", ood.py), and
the backbone's [CLS] attention drawn over the crop on request (ViT backbones).

    photo -> centre crop (uint8) -> forward (features, attention) -> head -> temperature -> answer
                                                                   \\-> distance to the training photos

On the CPU (the default) the forward is the exported OpenVINO model that training wrote beside
the artifact (export.py), run with openvino alone: no torch in this process; the head is its own
small exported graph (training's head.MLPHead, converted); the calibration and the "neither"
check are a division and a distance, in numpy.
The other forwards (model/torch_forward.py, which imports torch) take the same crops and
return the same outputs: RUNTIME=torch, DEVICE=cuda, or an artifact without an exported model.
Requests that arrive together share one batched forward (Batcher, one batch per stream).

Nothing that starts threads or CUDA happens before `warm_up()`: a gunicorn master reads the
model, and each forked worker compiles (and on a GPU places) its own copy.
"""

from __future__ import annotations

import base64
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import UserError, config
from ..artifact import OOD_REFERENCES, Described, read_metadata, read_tensors
from ..images import attention_overlay_png, center_crop, open_image
from ..ood import ood_scores
from ..runtime import OpenVINOModel, read_exported, resolve_precision, runtime_for, usable_cores
from .batcher import Batcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One photo's answer, as plain values (serving/schemas.py documents each field for the API)."""

    label: str
    confidence: float
    probabilities: dict[str, float]
    in_distribution: bool | None = None
    ood_score: float | None = None
    attention_png: str | None = None  # base64 PNG, only when attention was asked for

    def as_dict(self) -> dict:
        """The answer's fields, without attention_png when none was asked for."""
        fields = dict(self.__dict__)
        if fields["attention_png"] is None:
            del fields["attention_png"]
        return fields


class SettingUnavailable(UserError, ValueError):
    """A runtime or precision was asked for that this model or device cannot run."""


class AttentionUnavailable(UserError, ValueError):
    """Attention maps were asked of a backbone without [CLS] self-attention (a CNN)."""

    def __init__(self, architecture: str):
        super().__init__(f"attention maps are not available for this backbone ({architecture}): it has no [CLS] "
                         "self-attention; ask without attention=1")


@dataclass
class ServedModel(Described):
    """What an answer needs besides the forward, read without torch: the metadata, the head's
    graph (export.head_graph: training's own head.MLPHead, converted), the training features
    the "neither" check measures against."""

    metadata: dict
    head: object  # an openvino.Model: features in, logits out
    ood_references: np.ndarray | None

    @classmethod
    def read(cls, path: Path) -> "ServedModel":
        """The model in `path`'s folder; its head graph converted now (torch) when the folder
        holds none of this artifact's (exported before the head was)."""
        metadata = read_metadata(path)
        tensors = read_tensors(path, lambda name: name == OOD_REFERENCES)
        head = read_exported(path.parent / config.HEAD_FILES[0], metadata["model_version"])
        if head is None:
            from .torch_forward import converted_head  # torch: only for such a folder

            head = converted_head(path)
        return cls(metadata, head, tensors.get(OOD_REFERENCES))


class Predictor:
    def __init__(self, model: ServedModel, forward=None, ood_check: bool = True, max_batch: int = config.FORWARD_BATCH,
                 device: str = "cpu", precision: str | None = None, source: str = "exported"):
        """`forward(pixels, attention) -> (features, maps)`; None for a predictor that only
        answers from features (predict_features: batch prediction's result columns).
        `ood_check=False` leaves every answer's `in_distribution` and `ood_score` None."""
        self.model, self.forward = model, forward
        self.device, self.source = device, source
        self._precision = precision  # a forward's own, when it has one
        self.runtime = runtime_for(device) if source != "torch" else "torch"
        self.temperature = float((self.metadata.get("calibration") or {}).get("temperature", 1.0))
        ood = self.metadata.get("ood")
        usable = ood_check and ood and model.ood_references is not None
        self.ood_threshold = ood["threshold"] if usable else None
        self.attention_available = bool(getattr(forward, "attention", False))
        self.head = OpenVINOModel(model.head, "fp32")
        self._batcher = Batcher(self._predict_batch, max_batch)
        self._warm = False
        self._warming = threading.Lock()

    @classmethod
    def from_dir(cls, model_dir: Path = config.OUTPUT_DIR, precision: str = "auto", device: str = "cpu",
                 runtime: str = "auto", openvino_mode: str = config.OPENVINO_MODES[0], ood_check: bool = True,
                 threads: int = 0, warm_up: bool = True) -> "Predictor":
        """The predictor for the model in `model_dir`, with the forward the settings ask for:
        the exported model on the CPU when there is one, else torch's (see torch_forward.py).
        `warm_up=False` leaves compiling and warming up to `warm_up()` (a gunicorn master)."""
        path = Path(model_dir) / config.ARTIFACT_FILE
        model = ServedModel.read(path)
        forward, source = _make_forward(model, path, device, runtime, precision, openvino_mode)
        max_batch = config.FORWARD_BATCH_CUDA if device.startswith("cuda") else config.FORWARD_BATCH
        predictor = cls(model, forward, ood_check, max_batch, device, source=source)
        if warm_up:
            predictor.warm_up(threads)
        return predictor

    @property
    def metadata(self) -> dict:
        return self.model.metadata

    @property
    def precision(self) -> str:
        """bf16 or fp32 ("auto" on a GPU until a worker starts the forward there)."""
        return self._precision or self.forward.precision

    @property
    def openvino_mode(self) -> str | None:
        return self.forward.mode if isinstance(self.forward, OpenVINOModel) else None

    def warm_up(self, threads: int = 0) -> None:
        """Compile (or place) the forward for this process with `threads` cores (0: every usable
        one) and run it, plain and with attention, so the first request pays for nothing."""
        with self._warming:
            self._warm_up(threads)

    def _warm_up(self, threads: int) -> None:
        self.forward.start(threads or usable_cores())
        self.head.start(1)  # a few small matmuls: one thread, no team to wake
        self._batcher.concurrency = self.forward.streams
        size = self.model.preprocessing["input_size"]
        blank = [Image.new("RGB", (size, size))]
        self._answer(blank)
        # Other batch sizes need no warm-up: OpenVINO's first call at a new shape costs ~5 ms
        # more, and every warm-up forward delays a replacement worker's first answer.
        if self.attention_available:  # also imports matplotlib's colormaps for the overlay
            self._answer(blank, attention=True)
        self._warm = True

    def load_image(self, source: bytes | str | Path, max_pixels: int = config.MAX_IMAGE_PIXELS) -> Image.Image:
        """Decode an image (raises images.ImageError with a message fit for the user)."""
        return open_image(source, self.model.preprocessing["resize_size"], max_pixels)

    @property
    def draft_size(self) -> int:
        """The smallest size a photo may be decoded at (JPEG draft mode) and still cover the crop."""
        return self.model.preprocessing["resize_size"]

    def check_attention(self, attention: bool) -> None:
        """Raise AttentionUnavailable if attention maps are asked of a backbone without them."""
        if attention and not self.attention_available:
            raise AttentionUnavailable(self.metadata.get("backbone", {}).get("architecture", "this backbone"))

    def crop(self, image: Image.Image) -> Image.Image:
        """What the backbone sees of `image`: its centre crop, at the input size."""
        return center_crop(image, self.model.preprocessing)

    def predict(self, images: list[Image.Image], attention: bool = False) -> list[Prediction]:
        return self.predict_crops([self.crop(image) for image in images], attention)

    def predict_crops(self, crops: list[Image.Image], attention: bool = False) -> list[Prediction]:
        """Answers for centre crops (`crop`); without attention, batched with the calls of
        other threads waiting beside this one."""
        self.check_attention(attention)
        if not self._warm:  # nothing warmed it up (not under gunicorn): the first caller does, once
            with self._warming:
                if not self._warm:
                    self._warm_up(0)
        return self._answer(crops, attention)

    def _answer(self, crops: list[Image.Image], attention: bool = False) -> list[Prediction]:
        if attention:
            return self._predict_batch(crops, attention=True)
        return self._batcher(crops)

    def _predict_batch(self, crops: list[Image.Image], attention: bool = False) -> list[Prediction]:
        pixels = np.stack([np.asarray(crop, dtype=np.uint8) for crop in crops])
        features, maps = self.forward(pixels, attention)
        overlays = None if maps is None else [attention_overlay_png(c, m) for c, m in zip(crops, maps)]
        return self.predict_features(features, overlays)

    def predict_features(self, features: np.ndarray, overlays: list[bytes] | None = None) -> list[Prediction]:
        """Answers from the backbone's features (one row per image)."""
        logits = self.head.outputs(features)[0] / self.temperature
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = (exp / exp.sum(axis=1, keepdims=True)).tolist()
        scores = None if self.ood_threshold is None else ood_scores(features, self.model.ood_references).tolist()
        answers, names = [], self.model.class_names
        for i, probs in enumerate(probabilities):
            best = int(np.argmax(probs))
            overlay = {} if overlays is None else {"attention_png": base64.b64encode(overlays[i]).decode()}
            answers.append(Prediction(
                label=names[best], confidence=probs[best], probabilities=dict(zip(names, probs)),
                in_distribution=None if scores is None else scores[i] <= self.ood_threshold,
                ood_score=None if scores is None else scores[i], **overlay))
        return answers


def _cpu_precision(model: ServedModel, path: Path, requested: str) -> str:
    """The CPU's precision (its flags: nothing starts); 'auto' is int8 only where training's
    fidelity gate held for this model and its int8 graph is there, and says why if not."""
    gate = model.metadata.get("int8") or {}
    held = bool(gate.get("passed")) and (path.parent / config.INT8_FILES[0]).is_file()
    precision = resolve_precision(requested, "cpu", int8_gate=held)
    if requested == "auto":
        why = ("the fidelity gate held" if precision == "int8" else
               "this CPU has no int8 dot products (VNNI/AMX)" if held else
               "no int8 graph or gate for this model" if not gate else
               f"the fidelity gate failed (top-1 agreement {gate['top1_agreement']:.2%})")
        log.info("serving %s: %s", precision, why)
    return precision


def _make_forward(model: ServedModel, path: Path, device: str, runtime: str, precision: str, mode: str):
    """(forward, where it came from): the exported model on the CPU when it belongs to this
    artifact; torch's forwards otherwise (imported only then)."""
    if runtime not in config.RUNTIMES:
        raise SettingUnavailable(f"runtime must be one of {', '.join(config.RUNTIMES)}, not {runtime!r}")
    runtime = runtime_for(device) if runtime == "auto" else runtime
    if runtime == "openvino" and runtime_for(device) != "openvino":
        raise SettingUnavailable(f"the openvino runtime runs on the cpu only, not on {device}: use runtime auto or torch")
    if runtime == "openvino":
        precision = _cpu_precision(model, path, precision)
        name = config.INT8_FILES[0] if precision == "int8" else config.EXPORT_FILES[0]
        exported = read_exported(path.parent / name, model.metadata["model_version"])
        if exported is not None:
            return OpenVINOModel(exported, precision, mode), "exported"
        if precision == "int8":
            raise SettingUnavailable(f"precision int8 needs {name} of this model beside it (training on the cpu "
                                     "writes it): use precision auto, bf16 or fp32")
    elif precision == "int8":
        raise SettingUnavailable(f"precision int8 runs on the cpu only (the OpenVINO graph), not on {device}")
    from .torch_forward import converted_forward, torch_forward  # torch: only on these paths

    if runtime == "openvino":
        return converted_forward(path, precision, mode), "converted"
    return torch_forward(path, device, precision), "torch"
