"""gunicorn settings, read automatically by `gunicorn predict:app` from the working directory.

Sized for a 2-core CPU box: one worker process owns both cores for torch (batch-1 latency is
best when one forward uses every core), and handles each request in its main thread: torch's
OpenMP pool is fastest there (measured here: the same forward from another thread, as gunicorn's
gthread workers run it, takes ~1.5x as long). For throughput under many concurrent clients
rather than single-request latency, use GUNICORN_WORKERS=2 (one torch thread each).
GUNICORN_THREADS > 1 switches to threaded workers (forwards are still serialised).
The app is preloaded in the master, so a missing artifact stops gunicorn at once with one line,
and a replacement worker (after a crash or SIGKILL) forks with the model already in memory
and is serving again in about a second.

Environment: GUNICORN_WORKERS, GUNICORN_THREADS, GUNICORN_TIMEOUT, TORCH_THREADS (per worker,
default: cores / workers), PROMETHEUS_MULTIPROC_DIR (default: a fresh temporary directory).
"""

import glob
import os
import tempfile


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:9696")  # --bind on the command line wins
workers = _env_int("GUNICORN_WORKERS", 1)
threads = _env_int("GUNICORN_THREADS", 1)
worker_class = "gthread" if threads > 1 else "sync"
timeout = _env_int("GUNICORN_TIMEOUT", 60)
graceful_timeout = 15
keepalive = 5
preload_app = True
torch_threads = _env_int("TORCH_THREADS", max(1, cores // max(1, workers)))
accesslog = os.environ.get("GUNICORN_ACCESSLOG")  # e.g. "-" for stdout; off by default

# Prometheus counters shared by all workers: the directory must exist, and be set, before
# prometheus_client is imported anywhere.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vehicle-classifier-metrics-")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
    os.remove(stale)  # counts of a previous run

# torch in the master runs single-threaded: an OpenMP thread pool started before fork()
# makes forked workers hang. Each worker sets its own thread count in post_fork.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)


def post_fork(server, worker):
    torch.set_num_threads(torch_threads)


def post_worker_init(worker):
    # Warm up with this worker's thread count before it accepts its first request.
    app = worker.wsgi
    predictor = getattr(app, "extensions", {}).get("vehicle_classifier", {}).get("predictor")
    if predictor is not None:
        predictor.warm_up()


def when_ready(server):
    server.log.info("serving with %d worker(s) x %d thread(s), %d torch thread(s) per worker",
                    workers, threads, torch_threads)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
