"""gunicorn settings, read automatically by `gunicorn predict:app` from the working directory.

Sized for a 2-core CPU box (figures in docs/reliability.md, Operations): one worker process owns both cores
for the model. Its request threads read uploads (with a deadline, UPLOAD_TIMEOUT) and decode
photos; requests waiting together share a forward, which OpenVINO runs on both cores when it
runs alone and on one core each when two overlap (OPENVINO_MODE, see docs/serving.md). The
app is preloaded in the master, so a missing artifact stops gunicorn at once with one line, and
a replacement worker (after a crash or SIGKILL) forks with the model already in memory, compiles
it and serves again in about a second. SIGHUP to the master (make reload) reads the model now in
MODEL_DIR: the master loads it first, and only a model that loads replaces the served one (see
on_reload); gunicorn then starts new workers and retires the old ones gracefully.

Settings come from the environment through vehicle_classifier.config.ServiceConfig (the one
list of them, checked once): GUNICORN_BIND (the port: default 0.0.0.0:9696), GUNICORN_PIDFILE, GUNICORN_WORKERS, GUNICORN_THREADS,
GUNICORN_TIMEOUT, GUNICORN_BACKLOG, GUNICORN_ACCESSLOG, TORCH_THREADS (per worker, default:
cores / workers); PROMETHEUS_MULTIPROC_DIR (prometheus_client's own; default: a fresh
temporary directory).
"""

import gc
import glob
import os
import sys
import tempfile

from vehicle_classifier.config import ServiceConfig

try:
    settings = ServiceConfig.from_env()
except ValueError as exc:  # a bad setting: one line, as predict.py does
    print(f"error: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)

cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

bind = settings.bind
pidfile = settings.pidfile  # where make reload finds the master
workers = settings.workers
# gthread: request threads read uploads and decode photos, so a slow or stalled upload holds one
# thread, not the worker (forwards run in OpenVINO's threads, or in the predictor's one torch
# forward thread with RUNTIME=torch).
worker_class = "gthread"
threads = settings.threads
# A worker takes on no more connections than it has threads: requests beyond that wait in the
# kernel's listen queue, where a worker that dies (SIGKILL, OOM) cannot lose them; only the
# ones it was already handling fail. Hence no keep-alive either (an idle kept-alive
# connection would hold a thread's place).
worker_connections = threads
keepalive = 0
backlog = settings.backlog  # bounded: beyond it, connections are refused
timeout = settings.timeout
graceful_timeout = 15
preload_app = True
torch_threads = settings.torch_threads or max(1, cores // max(1, workers))
accesslog = settings.accesslog
# No control socket: gunicorn 27 puts it at one fixed path per user, so a second instance on the
# host (a test's, a benchmark's) would take over the first one's and delete it on exit.
# Instances are managed by signals (make reload, Docker, Kubernetes).
control_socket_disable = True

# Prometheus counters shared by all workers: prometheus_client reads PROMETHEUS_MULTIPROC_DIR,
# which must exist, and be set, before it is imported anywhere.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vehicle-classifier-metrics-")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
    os.remove(stale)  # counts of a previous run

# No thread pool may start in the master before fork(): forked workers would hang in it. The
# master only reads the model (the exported graph, or torch's with RUNTIME=torch/DEVICE=cuda);
# OpenMP, should torch be loaded, starts single-threaded, and each worker compiles (or places)
# its own forward with its share of the cores in post_worker_init.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pre_fork(server, worker):
    # What the master loaded (libraries, the model) lives as long as each worker: frozen out of
    # the collector's reach (Python's gc docs, for fork without exec), a worker's full
    # collections skip those ~82k objects (67-83 ms each on 2 cores: rare slow requests) and
    # leave their pages shared with the master.
    gc.freeze()


def post_worker_init(worker):
    # Compile and warm up with this worker's thread count before the worker takes its first
    # request, so that /ready answering means a forward has run in this worker. With DEVICE=cuda
    # this is also where the model moves to the GPU: CUDA starts in each worker, after the fork
    # (a forked child cannot use a CUDA context made by its parent; the master loads on the CPU).
    service = getattr(worker.wsgi, "extensions", {}).get("vehicle_classifier")
    if service is not None:
        service.predictor.warm_up(torch_threads)


def on_reload(server):
    # SIGHUP: gunicorn calls this in the master before it starts the new workers, which fork from
    # the master's app (preload_app). So the new model is loaded here, once: if it loads, the new
    # workers serve it; if not (damaged, incompatible, half-copied), the app stays the old one and
    # every worker, old or new, keeps answering with the old model.
    from vehicle_classifier import UserError
    from vehicle_classifier.serving.api import EXTENSION, create_app

    try:
        app = create_app(ServiceConfig.from_env())
    except (UserError, ValueError, OSError) as exc:
        server.log.error("SIGHUP: refused the model in %s, still serving the loaded one: %s", settings.model_dir, exc)
        return
    server.app.callable = app  # what gunicorn's wsgi() hands each worker forked from now on
    gc.unfreeze()  # the old model was frozen before the last forks (pre_fork): collectable again
    gc.collect()
    server.log.info("SIGHUP: loaded model %s from %s; workers restart with it",
                    app.extensions[EXTENSION].predictor.metadata["model_version"], settings.model_dir)


def when_ready(server):
    server.log.info("serving with %d worker(s) x %d thread(s), %d forward thread(s) per worker",
                    workers, threads, torch_threads)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
