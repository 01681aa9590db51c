# The prediction service: CPU inference behind gunicorn on port 9696 (see docker-compose.yml).
#
#   docker build -f image-predict.dockerfile -t vehicle-classifier-predict .
#   docker run --rm -p 9696:9696 -v "$PWD/models:/app/models:ro" vehicle-classifier-predict
#
# The model is not in the image by default: mount a directory holding model.safetensors at
# $MODEL_DIR (/app/models). To bake models/model.safetensors into the image instead:
#
#   docker build -f image-predict.dockerfile --build-arg MODEL=baked -t vehicle-classifier-predict .

# mounted (default) | baked
ARG MODEL=mounted

FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies before code, so that editing code does not reinstall them: the serving
# dependencies are pyproject.toml's [project] dependencies (no page, no dev extras) at the
# versions constraints.txt locks.
# torch and torchvision come from the PyTorch CPU wheel index: `torch==X` matches its `X+cpu`
# build, which ranks above PyPI's CUDA build and is a fraction of its size. The last command
# fails the build if a CUDA build got in anyway.
COPY pyproject.toml constraints.txt /tmp/build/
RUN python -c "import sys, tomllib; print(*tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies'], sep='\n')" /tmp/build/pyproject.toml > /tmp/build/requirements.txt \
    && pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -c /tmp/build/constraints.txt -r /tmp/build/requirements.txt \
    && python -c "import torch; assert torch.version.cuda is None, 'expected the CPU-only torch build'" \
    && rm -rf /tmp/build

# An unprivileged user; the code stays root-owned, so the service cannot change it.
RUN useradd --no-log-init --create-home --uid 10001 app

COPY vehicle_classifier/ vehicle_classifier/
COPY predict.py gunicorn.conf.py ./

ENV MODEL_DIR=/app/models

# The model comes from a volume mounted at $MODEL_DIR ...
FROM base AS model-mounted

# ... or from the build context (the .dockerignore lets exactly this file through), readable
# by the service's user whatever its mode on the host.
FROM base AS model-baked
COPY --chmod=444 models/model.safetensors /app/models/

# The stage is chosen by the build argument, not an image from a registry: no tag to pin.
# hadolint ignore=DL3006
FROM model-${MODEL}
USER 10001
EXPOSE 9696
# /ready answers 200 only once the model is loaded, so compose starts the page after that.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9696/ready', timeout=4)"]
# gunicorn reads gunicorn.conf.py from the working directory (workers, threads, timeouts).
CMD ["gunicorn", "--bind=0.0.0.0:9696", "predict:app"]
