"""The page's logic with Streamlit's AppTest, over real HTTP: the real service app with the tiny
model (up), a port with nothing listening (down), a server that never answers (slow), and the
service's own rejection of a file that is not a photo (error)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from harness.live import REPO, free_port
from vehicle_classifier.client import PredictionClient

pytestmark = pytest.mark.integration

PAGE = str(REPO / "streamlit_app.py")


@pytest.fixture(autouse=True)
def _fresh_cache():
    st.cache_data.clear()  # the page's caches live in this process, across tests
    yield
    st.cache_data.clear()


def open_page(monkeypatch, url: str) -> AppTest:
    monkeypatch.setenv("PREDICT_URL", url)
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception, at.exception
    return at


def upload(at: AppTest, files) -> AppTest:
    at.file_uploader[0].set_value([(p.name, p.read_bytes(), "image/*") if hasattr(p, "read_bytes") else p
                                   for p in files]).run()
    assert not at.exception, at.exception
    return at


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def image_captions(at: AppTest) -> list[str]:
    return [img.caption for element in at.main.get("image") for img in element.proto.imgs]


def expected_heading(answer: dict) -> str:
    """The label and confidence; for a photo unlike the training photos (the tiny model's synthetic
    stripes are nothing like real photos), the page's "neither" headline instead."""
    if answer["in_distribution"] is False:
        return "Neither a car nor a bike?"
    return f"{answer['label']} · {answer['confidence']:.1%}"


def test_sidebar_shows_the_ready_service_and_its_model(monkeypatch, service, tiny_model_dir):
    at = open_page(monkeypatch, service)
    metadata = PredictionClient(service).metadata()
    assert texts(at.sidebar.success) == ["Ready"]
    model_info = " ".join(texts(at.sidebar.markdown))
    assert "**Classes:** Bike, Car" in model_info
    assert f"**Backbone:** {metadata['backbone']['name']} (`{metadata['backbone']['architecture']}`)" in model_info
    assert f"**Test accuracy:** {metadata['metrics']['test']['accuracy']:.1%}" in model_info
    assert metadata["model_version"] in model_info
    assert texts(at.info) == ["Drop one or more photos (JPG, PNG or WebP) above."]
    assert at.file_uploader[0].accept_multiple_files
    assert set(at.file_uploader[0].allowed_type) == {".jpg", ".jpeg", ".png", ".webp"}


def test_one_photo_label_confidence_chart_and_attention_overlay(monkeypatch, service, photos):
    photo = photos[0]
    answer = PredictionClient(service).predict(photo.read_bytes(), photo.name)
    at = upload(open_page(monkeypatch, service), [photo])
    assert texts(at.subheader) == [expected_heading(answer)]
    assert len(at.main.get("vega_lite_chart")) == 1
    assert image_captions(at) == [photo.name]
    assert not at.main.error

    at.toggle[0].set_value(True).run()
    assert not at.exception, at.exception
    assert image_captions(at) == [f"{photo.name}: attention overlay"]
    assert texts(at.subheader) == [expected_heading(answer)]  # the same answer, now with its overlay
    at.toggle[0].set_value(False).run()
    assert image_captions(at) == [photo.name]


def test_several_photos_each_get_their_own_answer_and_toggle(monkeypatch, service, photos):
    expected = PredictionClient(service).predict_many([(p.name, p.read_bytes()) for p in photos])
    at = upload(open_page(monkeypatch, service), photos)
    assert len(photos) >= 4
    assert texts(at.subheader) == [expected_heading(a) for a in expected]
    assert len(at.main.get("vega_lite_chart")) == len(photos)
    assert image_captions(at) == [p.name for p in photos]

    at.toggle[1].set_value(True).run()  # only the second photo shows its overlay
    captions = image_captions(at)
    assert captions[1] == f"{photos[1].name}: attention overlay"
    assert captions[:1] + captions[2:] == [p.name for p in photos[:1] + photos[2:]]


def test_a_file_the_service_rejects_is_reported_and_the_others_still_answered(monkeypatch, service, photos):
    bad = ("notes.jpg", b"this is not a photo", "image/jpeg")
    at = upload(open_page(monkeypatch, service), [bad, photos[0]])
    assert len(at.main.error) == 1
    assert at.main.error[0].value.startswith("notes.jpg: rejected by the service: ")
    assert "Traceback" not in at.main.error[0].value
    answer = PredictionClient(service).predict(photos[0].read_bytes(), photos[0].name)
    assert texts(at.subheader) == [expected_heading(answer)]


def test_service_down_is_said_in_plain_words_and_the_page_stays_usable(monkeypatch, photos):
    url = f"http://127.0.0.1:{free_port()}"
    at = open_page(monkeypatch, url)
    down = f"cannot reach the prediction service at {url}: connection refused; is it running?"
    assert texts(at.sidebar.error) == [f"Not available: {down}"]
    at = upload(at, photos[:3])
    # One error, not one per photo: the other photos would fail the same way.
    assert texts(at.main.error) == [f"{photos[0].name}: {down}"]
    assert "Check again" in at.main.warning[0].value
    assert not at.subheader
    at.sidebar.button[0].click().run()  # "Check again" still works
    assert not at.exception and texts(at.sidebar.error) == [f"Not available: {down}"]


def test_a_service_that_never_answers_times_out(monkeypatch, photos):
    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("PREDICT_TIMEOUT", "1.5")
        at = upload(open_page(monkeypatch, url), photos[:2])
    slow = f"the prediction service at {url} did not answer within 1.5 s; it may be overloaded"
    assert texts(at.sidebar.error) == [f"Not available: {slow}"]
    assert texts(at.main.error) == [f"{photos[0].name}: {slow}"]


def test_the_page_needs_neither_torch_nor_the_model_code(service, photos):
    """The page's container holds Streamlit, requests, the client module and the config it takes
    its defaults from, nothing else of ours and no torch: run the page with everything else made
    unimportable."""
    script = textwrap.dedent(f"""
        import sys
        PAGE_MODULES = ("vehicle_classifier.client", "vehicle_classifier.config")  # streamlit-app.dockerfile's
        class PageContainer:
            def find_spec(self, name, path=None, target=None):
                ours = name.startswith("vehicle_classifier.") and name not in PAGE_MODULES
                if ours or name.split(".")[0] in ("torch", "torchvision", "timm"):
                    raise ImportError(f"{{name}} is not in the page's container")
        sys.meta_path.insert(0, PageContainer())
        import os
        os.environ["PREDICT_URL"] = {service!r}
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({PAGE!r}, default_timeout=120).run()
        at.file_uploader[0].set_value(({photos[0].name!r}, open({str(photos[0])!r}, "rb").read(), "image/*")).run()
        assert not at.exception, at.exception
        print(at.subheader[0].value)
        at.toggle[0].set_value(True).run()
        assert not at.exception, at.exception
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = PredictionClient(service).predict(photos[0].read_bytes(), photos[0].name)
    assert result.stdout.strip() == expected_heading(answer)


def test_neither_a_car_nor_a_bike_with_real_features(monkeypatch, real_model_dir):
    """The real model: a car gets its label, a portrait (a pedestrian, to a road camera) the
    "neither" headline with the closer class in words; a CNN backbone offers no overlay toggle."""
    from conftest import NEITHER_DIR, sample_photos
    from harness.live import flask_service

    car, portrait = sample_photos("Car")[0], NEITHER_DIR / "portrait.jpg"
    with flask_service(real_model_dir) as url:
        answers = PredictionClient(url).predict_many([(p.name, p.read_bytes()) for p in (car, portrait)])
        at = upload(open_page(monkeypatch, url), [car, portrait])
    assert [a["in_distribution"] for a in answers] == [True, False]
    assert texts(at.subheader) == [f"Car · {answers[0]['confidence']:.1%}", "Neither a car nor a bike?"]
    captions = texts(at.main.caption)
    assert any(c.startswith("This photo lies far from every photo the model was trained on") and
               f"the closer of its classes is {answers[1]['label']}" in c for c in captions)
    assert captions.count("Attention maps are not available for this backbone (it has no [CLS] self-attention).") == 2
    assert not at.toggle
