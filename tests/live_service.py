"""Real servers for the client, page and browser tests: the service's own Flask app in a thread,
or real processes (gunicorn, streamlit run) that are always killed afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
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


def wait_for(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail early, with the log's tail, if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready within {timeout:g} s\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def gunicorn_service(model_dir: Path, log: Path, settings: dict | None = None):
    """`gunicorn predict:app` as deployed (gunicorn.conf.py included), one small worker, free port;
    `settings`: more of the service's environment variables."""
    port = free_port()
    env = {"MODEL_DIR": str(model_dir), "GUNICORN_WORKERS": "1", "GUNICORN_THREADS": "2", **(settings or {})}
    with process([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "predict:app"], log, env) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/ready", timeout=180, proc=proc, log=log)
        yield url


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
