# The prediction service: CPU inference behind gunicorn on port 9696, one image for every machine
# (see docker-compose.yml). No torch, torchvision or timm: the service runs the model that
# training exported for OpenVINO (beside model.safetensors), with the serving dependencies alone.
#
#   docker build -f image-predict.dockerfile -t vehicle-classifier-predict .
#   docker run --rm -p 9696:9696 --read-only --tmpfs /tmp --cap-drop ALL \
#       -v "$PWD/models:/app/models:ro" vehicle-classifier-predict
#
# The model is not in the image by default: mount the folder train.py wrote (models/) at
# $MODEL_DIR (/app/models). To bake that model into the image instead:
#
#   docker build -f image-predict.dockerfile --build-arg MODEL=baked -t vehicle-classifier-predict .

# mounted (default) | baked
ARG MODEL=mounted

# The serving dependencies, in a virtual environment built apart: pip's work stays out of the
# image. They are pyproject.toml's [project] dependencies (no training, page or dev extras) at
# the versions constraints.txt locks; only these two files come in first, so that editing code
# does not reinstall them.
FROM python:3.11-slim AS dependencies
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml constraints.txt /tmp/build/
RUN python -c "import sys, tomllib; print(*tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies'], sep='\n')" /tmp/build/pyproject.toml > /tmp/build/requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c /tmp/build/constraints.txt -r /tmp/build/requirements.txt \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    MODEL_DIR=/app/models
WORKDIR /app
COPY --from=dependencies /opt/venv /opt/venv

# An unprivileged user whose home is /tmp, the one place it may write (a tmpfs where the root
# filesystem is read-only: gunicorn's worker files, the workers' metric counts, matplotlib's
# cache); the code stays root-owned, so the service cannot change it.
RUN useradd --no-log-init --no-create-home --home-dir /tmp --uid 10001 app

COPY vehicle_classifier/ vehicle_classifier/
COPY predict.py gunicorn.conf.py ./
# Compiled now: a read-only container could not keep the bytecode, and would compile at every start.
RUN python -m compileall -q vehicle_classifier predict.py gunicorn.conf.py

# The model comes from a volume mounted at $MODEL_DIR ...
FROM base AS model-mounted

# ... or from the build context: the artifact and the backbone and head training exported for OpenVINO
# (the .dockerignore lets exactly these files through), readable by the service's user
# whatever their mode on the host. The int8 graph, where training on a CPU wrote it, comes too
# (a wildcard, so that a model trained on a GPU, which has none, still builds): without it
# `auto` would serve bf16 where the mounted folder serves int8.
FROM base AS model-baked
COPY --chmod=444 models/model.safetensors models/backbone.xml models/backbone.bin models/head.xml models/head.bin \
    models/backbone-int8.xm[l] models/backbone-int8.bi[n] /app/models/

# The stage is chosen by the build argument, not an image from a registry: no tag to pin.
# hadolint ignore=DL3006
FROM model-${MODEL}
USER 10001
EXPOSE 9696
# /ready answers 200 once the model is loaded and has answered once: `docker compose up --wait`
# and the proxy's start wait for it. Polled every 2 s, so that both follow soon after.
HEALTHCHECK --interval=2s --timeout=2s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9696/ready', timeout=2)"]
# gunicorn reads gunicorn.conf.py from the working directory (workers, threads, timeouts).
CMD ["gunicorn", "predict:app"]
