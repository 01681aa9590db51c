"""The request path's pieces on their own: training and serving decode the same pixels and get
the same features; the per-request and per-worker decoded-pixel budgets; the upload deadlines;
filenames made safe to echo; the service settings read and checked in one place."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_image
from vehicle_classifier import config
from vehicle_classifier.artifact import load_artifact
from vehicle_classifier.config import ServiceConfig
from vehicle_classifier.images import load_crop, read_header
from vehicle_classifier.model.torch_forward import forward_for
from vehicle_classifier.serving.body import Deadlines
from vehicle_classifier.serving.decoding import PixelBudget, decode_uploads
from vehicle_classifier.serving.errors import BadRequest, printable
from vehicle_classifier.model.predictor import Predictor
from vehicle_classifier.runtime import cpu_supports_bf16
from vehicle_classifier.serving.uploads import Upload
from vehicle_classifier.training.features import FeatureCache, extract_features

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    # The float graph (bf16 where the CPU has it): `auto` may serve int8, whose distance from
    # the float features is the fidelity gate's and tests/test_int8.py's.
    return Predictor.from_dir(tiny_model_dir, precision="bf16" if cpu_supports_bf16() else "fp32")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_training_and_serving_see_the_same_pixels_and_features(predictor, photos, tmp_path, tiny_model_dir):
    # Real photos of each class and format, and large synthetic ones: a JPEG decoded in DCT
    # draft mode, an RGBA PNG that is box-reduced before the resize.
    rng = np.random.default_rng(0)
    large = synthetic_image("Car", rng, (1920, 1080))
    extra = {"large.jpg": encoded(large, "JPEG"), "large.png": encoded(large.convert("RGBA"), "PNG")}
    for name, data in extra.items():
        (tmp_path / name).write_bytes(data)
    paths = list(photos) + [tmp_path / name for name in extra]
    prep = predictor.model.preprocessing

    crops, _ = decode_uploads([Upload(p.name, p.read_bytes()) for p in paths], ServiceConfig(), PixelBudget(10**9),
                              prep, predictor.draft_size)
    assert predictor.source == "exported"
    served, _ = predictor.forward(np.stack([np.asarray(crop) for crop in crops]), False)

    for path, crop in zip(paths, crops):  # training's decoding (images.load_crop): this very crop
        assert np.array_equal(load_crop(path, prep), np.asarray(crop))
    digests = [str(i) for i in range(len(paths))]
    backbone = load_artifact(tiny_model_dir / config.ARTIFACT_FILE).backbone
    forward = forward_for(backbone, prep, "cpu", predictor.precision)  # training's forward, converted as it does
    with FeatureCache(tmp_path / "cache", "k") as cache:
        trained, failures = extract_features(forward, paths, digests, prep, cache)
    assert not failures
    training = torch.stack([trained[d] for d in digests])
    cosine = torch.nn.functional.cosine_similarity(training, torch.from_numpy(served))
    assert cosine.min() > 0.999, cosine  # batched kernels differ in the last bits only


def test_the_service_and_the_predictor_crop_every_photo_alike(predictor, photos):
    # The service crops in serving/decoding.py with the model's preprocessing; the predictor's
    # own predict(images) crops with Predictor.crop. A photo must give the same pixels either way.
    rng = np.random.default_rng(1)
    large = synthetic_image("Bike", rng, (1920, 1080))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    uploads = [Upload(p.name, p.read_bytes()) for p in photos] + [
        Upload("large.jpg", encoded(large, "JPEG")), Upload("tall.png", encoded(large.convert("LA"), "PNG")),
        Upload("rotated.jpg", _with_exif(large.resize((300, 200)), exif))]
    crops, _ = decode_uploads(uploads, ServiceConfig(), PixelBudget(10**9), predictor.model.preprocessing,
                              predictor.draft_size)
    for upload, crop in zip(uploads, crops):
        own = predictor.crop(predictor.load_image(upload.data))
        assert (crop.mode, crop.size) == (own.mode, own.size) and np.array_equal(np.asarray(crop), np.asarray(own))


def _with_exif(image: Image.Image, exif: Image.Exif) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def test_a_request_over_its_decoded_pixel_budget_is_refused_before_decoding(predictor):
    png = encoded(Image.new("RGBA", (3000, 2000)), "PNG")  # 6 MP each
    settings = ServiceConfig(max_request_pixels=10_000_000)
    uploads = [Upload("a.png", png), Upload("b.png", png)]
    with pytest.raises(BadRequest, match="decode to 12,000,000 pixels, over the limit of 10,000,000") as caught:
        decode_uploads(uploads, settings, PixelBudget(10**9), predictor.model.preprocessing, predictor.draft_size)
    assert caught.value.status == 413
    crops, pixels = decode_uploads(uploads[:1], settings, PixelBudget(10**9), predictor.model.preprocessing,
                                   predictor.draft_size)
    assert pixels == 6_000_000 and crops[0].size == (32, 32)


def test_jpegs_count_their_draft_size_against_the_budget():
    jpeg = encoded(Image.new("RGB", (4000, 3000)), "JPEG")
    header = read_header(jpeg, draft_size=256)
    assert header.size == (500, 375)  # 1/8 scale: the smallest DCT scale covering 256


def test_the_worker_budget_holds_back_decodes_that_do_not_fit():
    budget = PixelBudget(100)
    events = []
    inside = threading.Event()

    def hold(name, pixels, seconds):
        with budget.reserve(pixels):
            events.append(("in", name, budget.in_use))
            inside.set()
            time.sleep(seconds)
        events.append(("out", name))

    first = threading.Thread(target=hold, args=("first", 70, 0.3))
    first.start()
    inside.wait(5)
    second = threading.Thread(target=hold, args=("second", 60, 0))
    huge = threading.Thread(target=hold, args=("huge", 10**6, 0))  # larger than all: waits to be alone
    second.start(), huge.start()
    for thread in (first, second, huge):
        thread.join(10)
    assert events[:2] == [("in", "first", 70), ("out", "first")]
    assert max(e[2] for e in events if e[0] == "in") <= 100 and budget.in_use == 0


def test_deadlines_fire_for_blocks_still_running_and_only_for_them():
    deadlines, fired = Deadlines(), []
    started = time.monotonic()
    with deadlines.guard(0.05, lambda: fired.append("quick")):
        pass  # ends in time: never fires
    with deadlines.guard(0.4, lambda: fired.append(("late", time.monotonic() - started))):
        with deadlines.guard(0.1, lambda: fired.append(("early", time.monotonic() - started))):
            time.sleep(0.6)
    time.sleep(0.2)
    assert [name for name, _ in fired] == ["early", "late"]
    assert 0.09 < fired[0][1] < 0.35 and 0.39 < fired[1][1] < 0.65


def test_deadlines_work_in_a_forked_child():
    import multiprocessing

    deadlines = Deadlines()
    with deadlines.guard(10, lambda: None):  # the parent's thread, which the child does not inherit
        pass
    context = multiprocessing.get_context("fork")
    fired = context.Event()

    def child():
        with deadlines.guard(0.05, fired.set):
            time.sleep(0.5)

    process = context.Process(target=child)
    process.start()
    process.join(10)
    assert (fired.is_set(), process.exitcode) == (True, 0)


@pytest.mark.parametrize("raw, shown", [
    ("car\u202egpj.exe", "cargpj.exe"),            # bidi override
    ("a\nb\r\tc.jpg", "a b c.jpg"),                 # line breaks
    ("\x1b[31mred\x00.png", "[31mred.png"),         # escape and NUL
    ("zero\u200bwidth.jpg", "zerowidth.jpg"),
    ("фото машины.jpg", "фото машины.jpg"),         # ordinary non-ASCII stays
    ("x" * 500, "x" * 119 + "…"),
])
def test_printable(raw, shown):
    assert printable(raw, 120) == shown


def test_settings_are_read_and_checked_in_one_place():
    settings = ServiceConfig.from_env({"MAX_UPLOAD_MB": "3", "GUNICORN_THREADS": "4", "RUNTIME": "torch",
                                       "MAX_REQUEST_PIXELS": " 5000 "})
    assert (settings.max_upload_bytes, settings.threads, settings.runtime, settings.max_request_pixels) == \
        (3 * 1024 * 1024, 4, "torch", 5000)
    assert ServiceConfig.from_env({}) == ServiceConfig()
    with pytest.raises(ValueError, match="GUNICORN_THREADS must be at least 1, not 0"):
        ServiceConfig.from_env({"GUNICORN_THREADS": "0"})


def test_the_torch_runtime_runs_every_forward_in_its_one_forward_thread(tiny_model_dir):
    predictor = Predictor.from_dir(tiny_model_dir, runtime="torch")
    assert predictor.source == "torch" and predictor.openvino_mode is None
    seen = set()
    predictor.forward.backbone.register_forward_hook(lambda *_: seen.add(threading.current_thread().name))
    answers = []
    blank = [Image.new("RGB", (32, 32))]
    callers = [threading.Thread(target=lambda: answers.append(predictor.predict_crops(blank))) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    with_attention = predictor.predict_crops(blank, attention=True)[0]
    assert len(answers) == 4 and all(a[0].label == answers[0][0].label for a in answers)
    assert Image.open(io.BytesIO(base64.b64decode(with_attention.attention_png))).size == (32, 32)
    assert len(seen) == 1 and seen.pop().startswith("torch-forward")


def test_deadlines_outlive_an_action_that_fails():
    deadlines, fired = Deadlines(), threading.Event()

    def broken():
        raise RuntimeError("boom")

    with deadlines.guard(0.02, broken):
        time.sleep(0.1)
    with deadlines.guard(0.02, fired.set):
        time.sleep(0.1)
    assert fired.wait(2)
