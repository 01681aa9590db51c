"""End to end in a real browser: gunicorn serving the tiny model, `streamlit run` in front of it,
headless Debian Chromium uploading real photos and reading the answers off the page."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import NEITHER_DIR, sample_photos
from harness.live import gunicorn_service, streamlit_page
from vehicle_classifier.client import PredictionClient

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
ANSWER = re.compile(r"^((Bike|Car) · \d{1,3}\.\d%|Neither a car nor a bike\?)$")

pytestmark = [pytest.mark.system, pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}; install Debian's "
                                "chromium package (make test does, as root)")]


def heading(answer: dict) -> str:
    if answer["in_distribution"] is False:  # the tiny model's synthetic stripes are nothing like photos
        return "Neither a car nor a bike?"
    return f"{answer['label']} · {answer['confidence']:.1%}"


def keep(screenshot: Path, name: str) -> None:
    """Beside the other test output: the pytest tmp dir, and $TEST_OUTPUT_DIR when CI sets one."""
    if os.environ.get("TEST_OUTPUT_DIR"):
        Path(os.environ["TEST_OUTPUT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(os.environ["TEST_OUTPUT_DIR"]) / name)
    print(f"screenshot: {screenshot}")


@contextmanager
def answered_page(model_dir: Path, tmp_path: Path, photos: list[Path], height: int):
    """gunicorn serving `model_dir`, the page in front of it, headless Chromium on the page with
    `photos` uploaded and their answers shown, each heading as the service answers it directly:
    (the page, the service's answers). A failure leaves a screenshot and prints both logs."""
    def logs() -> str:
        return "".join(f"--- {log}\n" + (tmp_path / log).read_text(errors="replace")[-4000:]
                       for log in ("gunicorn.log", "streamlit.log"))

    with gunicorn_service(model_dir, tmp_path / "gunicorn.log") as service, \
            streamlit_page(service, tmp_path / "streamlit.log") as page_url:
        with page_in_browser(page_url, service, photos, tmp_path, height, logs) as (page, expected):
            yield page, expected


@contextmanager
def page_in_browser(page_url: str, service_url: str, photos: list[Path], tmp_path: Path, height: int,
                    logs: Callable[[], str]):
    """Headless Chromium on the page at `page_url` with `photos` uploaded and their answers
    shown, each heading as the service at `service_url` answers it directly: (the page, the
    service's answers). A failure leaves a screenshot and prints `logs()`."""
    from playwright.sync_api import expect, sync_playwright

    expected = [PredictionClient(service_url).predict(p.read_bytes(), p.name) for p in photos]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": height})
        try:
            page.set_default_timeout(60_000)
            page.goto(page_url)
            expect(page.get_by_text("Ready", exact=True)).to_be_visible(timeout=90_000)  # the sidebar
            page.locator("input[type=file]").set_input_files([str(p) for p in photos])
            headings = page.locator("h3").filter(has_text=ANSWER)
            expect(headings).to_have_count(len(photos), timeout=120_000)
            shown = [headings.nth(i).inner_text().strip() for i in range(len(photos))]
            assert shown == [heading(a) for a in expected]
            yield page, expected
        except Exception:
            page.screenshot(path=str(tmp_path / "browser-failure.png"), full_page=True)
            print(logs())  # shown by pytest with the failure
            print(f"failure screenshot: {tmp_path / 'browser-failure.png'}")
            raise
        finally:
            browser.close()


def test_upload_photos_in_a_browser_and_see_the_answers(tiny_model_dir, tmp_path):
    from playwright.sync_api import expect

    photos = [sample_photos("Car")[0], sample_photos("Bike")[0]]
    with answered_page(tiny_model_dir, tmp_path, photos, height=1400) as (page, _):
        # Where the model looked: the first photo's overlay, fetched from the service on demand.
        page.get_by_text("Show where the model looked").first.click()
        expect(page.get_by_text(f"{photos[0].name}: attention overlay")).to_be_visible(timeout=60_000)
        expect(page.get_by_text(f"{photos[1].name}: attention overlay")).to_have_count(0)
        screenshot = tmp_path / "browser.png"
        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    keep(screenshot, "browser.png")


def test_a_photo_of_neither_in_a_browser(real_model_dir, tmp_path):
    """The real model behind the real page: a car is called a car, a portrait is "neither a car
    nor a bike?". The screenshot is the docs' picture of that state (imgs/page_neither.png)."""
    from playwright.sync_api import expect

    photos = [sample_photos("Car")[0], NEITHER_DIR / "portrait.jpg"]
    with answered_page(real_model_dir, tmp_path, photos, height=1100) as (page, expected):
        assert [a["in_distribution"] for a in expected] == [True, False]
        expect(page.get_by_text("This photo lies far from every photo")).to_be_visible()
        screenshot = tmp_path / "page_neither.png"
        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    keep(screenshot, "page_neither.png")
