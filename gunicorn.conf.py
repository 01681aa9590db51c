"""gunicorn settings, read automatically by `gunicorn predict:app` from the working directory.

Sized for a 2-core CPU box (figures in README, Operations): one worker process owns both cores
for the model. Its request threads read uploads (with a deadline, UPLOAD_TIMEOUT) and decode
photos; requests waiting together share a forward, which OpenVINO runs on both cores when it
runs alone and on one core each when two overlap (OPENVINO_MODE, see the README). The
app is preloaded in the master, so a missing artifact stops gunicorn at once with one line, and
a replacement worker (after a crash or SIGKILL) forks with the model already in memory, compiles
it and serves again in about a second.

Environment: GUNICORN_WORKERS, GUNICORN_THREADS, GUNICORN_TIMEOUT, GUNICORN_BACKLOG, TORCH_THREADS (per worker,
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
# gthread: request threads read uploads and decode photos, so a slow or stalled upload holds one
# thread, not the worker (forwards run in OpenVINO's threads; with RUNTIME=torch, in the worker's
# main thread: post_worker_init).
worker_class = "gthread"
threads = _env_int("GUNICORN_THREADS", 6)
# A worker takes on no more connections than it has threads: requests beyond that wait in the
# kernel's listen queue, where a worker that dies (SIGKILL, OOM) cannot lose them; only the
# ones it was already handling fail. Hence no keep-alive either (an idle kept-alive
# connection would hold a thread's place).
worker_connections = threads
keepalive = 0
backlog = _env_int("GUNICORN_BACKLOG", 256)  # bounded: beyond it, connections are refused
timeout = _env_int("GUNICORN_TIMEOUT", 60)
graceful_timeout = 15
preload_app = True
torch_threads = _env_int("TORCH_THREADS", max(1, cores // max(1, workers)))
accesslog = os.environ.get("GUNICORN_ACCESSLOG")  # e.g. "-" for stdout; off by default
# No control socket: gunicorn 27 puts it at one fixed path per user, so a second instance on the
# host (make cluster runs several) would take over the first one's and delete it on exit.
# Instances are managed by signals (make cluster, Docker, Kubernetes).
control_socket_disable = True

# Prometheus counters shared by all workers: the directory must exist, and be set, before
# prometheus_client is imported anywhere.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vehicle-classifier-metrics-")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
    os.remove(stale)  # counts of a previous run

# The master loads the model (preload) but must not compile it: OpenVINO's thread pool does not
# survive fork(). Each worker compiles and warms up in post_worker_init.
os.environ["VEHICLE_CLASSIFIER_PREFORK"] = "1"

# torch in the master runs single-threaded: an OpenMP thread pool started before fork()
# makes forked workers hang. Each worker sets its own thread count in post_fork.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)


def post_fork(server, worker):
    torch.set_num_threads(torch_threads)


def post_worker_init(worker):
    app = worker.wsgi
    predictor = getattr(app, "extensions", {}).get("vehicle_classifier", {}).get("predictor")
    if predictor is None:
        return
    # Compile and warm up with this worker's thread count, here in the main thread, before the
    # first request.
    predictor.warm_up()
    # With the torch runtime (RUNTIME=torch): torch's OpenMP pool runs a forward ~1.5x faster
    # from the process's main thread than from any other (measured: 40 vs 60 ms for ViT-S/16
    # bf16), so the request threads hand each forward to the worker's main thread through
    # gthread's own wake-up queue.
    # OpenVINO's forwards run in its own threads, one per stream, called from the request
    # threads: the main thread stays free to accept connections while they run.
    if hasattr(worker, "method_queue") and predictor.fast_backbone is None:
        from vehicle_classifier.inference import run_in_main_thread

        predictor.run_forward = run_in_main_thread(worker.method_queue.defer)


def on_reload(server):
    # SIGHUP restarts the workers from the master, which holds the model it loaded at start
    # (preload_app): a new model.safetensors is not read. Say so instead of leaving it silent.
    server.log.warning("SIGHUP: workers restart with the model loaded at start; a new artifact needs a "
                       "restart of gunicorn (or make reload behind the proxy, see README)")


def when_ready(server):
    server.log.info("serving with %d worker(s) x %d thread(s), %d torch thread(s) per worker",
                    workers, threads, torch_threads)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
