"""Real servers for the client, page and browser tests: the service's own Flask app in a thread,
or real processes (gunicorn, streamlit run) that are always killed afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from harness.net import free_port, wait_for  # noqa: F401 (re-exported for the tests)

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def flask_service(model_dir: Path, **settings):
    """The real app from `create_app`, served by werkzeug on a free port; yields its URL once ready."""
    from werkzeug.serving import make_server

    from vehicle_classifier.serving.api import create_app
    from vehicle_classifier.config import ServiceConfig

    app = create_app(ServiceConfig(model_dir=Path(model_dir), **settings))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        wait_for(f"{url}/ready", timeout=120)
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def process(args: list[str], log: Path, env: dict | None = None):
    """A subprocess in its own process group, output to `log`; the whole group is killed on exit."""
    proc = spawn(args, log, env)
    try:
        yield proc
    finally:
        stop(proc)


def spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`args` started from the repository root in a process group of its own, output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, then SIGKILL if it has not ended within 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def start_gunicorn(model_dir: Path, log: Path, settings: dict | None = None,
                   timeout: float = 180) -> tuple[subprocess.Popen, str, float]:
    """The one "start gunicorn and wait for /ready": `gunicorn predict:app` as deployed
    (gunicorn.conf.py included) serving `model_dir` on a free port, `settings` more of the
    service's environment; returns (process, URL, seconds from its start until /ready answered
    200: under gunicorn, a worker has loaded and warmed up the model). The caller stops it."""
    port = free_port()
    started = time.perf_counter()
    proc = spawn([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "predict:app"], log,
                 {"MODEL_DIR": str(model_dir), **(settings or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/ready", timeout=timeout, proc=proc, log=log, interval=0.05)
    except BaseException:
        stop(proc)
        raise
    return proc, url, time.perf_counter() - started


@contextmanager
def gunicorn_service(model_dir: Path, log: Path, settings: dict | None = None):
    """`start_gunicorn` with one small worker; yields the URL, and stops it afterwards."""
    small = {"GUNICORN_WORKERS": "1", "GUNICORN_THREADS": "2", **(settings or {})}
    proc, url, _ = start_gunicorn(model_dir, log, small)
    try:
        yield url
    finally:
        stop(proc)


@contextmanager
def streamlit_page(predict_url: str, log: Path):
    """`streamlit run streamlit_app.py` against `predict_url`, on a free port; yields the page URL."""
    port = free_port()
    args = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
            "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none"]
    with process(args, log, {"PREDICT_URL": predict_url}) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/_stcore/health", timeout=120, proc=proc, log=log)
        yield url
