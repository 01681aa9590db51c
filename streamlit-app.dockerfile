# The web page: Streamlit on port 8501, talking to the prediction service at $PREDICT_URL.
# No model and no torch: the page only speaks HTTP (see docker-compose.yml).
#
#   docker build -f streamlit-app.dockerfile -t vehicle-classifier-page .
#   docker run --rm -p 8501:8501 --read-only --cap-drop ALL -e PREDICT_URL=http://HOST:9696 \
#       vehicle-classifier-page

# The page's dependencies, pyproject.toml's `page` extra (Streamlit and requests) at the
# versions constraints.txt locks, in a virtual environment built apart: pip's work stays out
# of the image, and editing code does not reinstall them.
FROM python:3.11-slim AS dependencies
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml constraints.txt /tmp/build/
RUN python -c "import sys, tomllib; print(*tomllib.load(open(sys.argv[1], 'rb'))['project']['optional-dependencies']['page'], sep='\n')" /tmp/build/pyproject.toml > /tmp/build/requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install -c /tmp/build/constraints.txt -r /tmp/build/requirements.txt \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY --from=dependencies /opt/venv /opt/venv

# An unprivileged user; the code stays root-owned, so the page cannot change it.
RUN useradd --no-log-init --no-create-home --home-dir /tmp --uid 10001 app

# Only what the page needs: the page, its HTTP client (not the model code) and its config.
COPY vehicle_classifier/__init__.py vehicle_classifier/client.py vehicle_classifier/config.py vehicle_classifier/
COPY streamlit_app.py ./
COPY .streamlit/config.toml .streamlit/
# Compiled now: a read-only container could not keep the bytecode (Streamlit compiles the page itself).
RUN python -m compileall -q vehicle_classifier

USER 10001
EXPOSE 8501
# Polled every 2 s, so that `docker compose up --wait` returns soon after the page is up.
HEALTHCHECK --interval=2s --timeout=2s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=2)"]
CMD ["streamlit", "run", "streamlit_app.py", "--server.port=8501", "--server.address=0.0.0.0", "--server.headless=true", "--server.fileWatcherType=none"]
