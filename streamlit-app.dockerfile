# The web page: Streamlit on port 8501, talking to the prediction service at $PREDICT_URL.
# No torch: the page only speaks HTTP (see docker-compose.yml).
#
#   docker build -f streamlit-app.dockerfile -t vehicle-classifier-page .
#   docker run --rm -p 8501:8501 -e PREDICT_URL=http://HOST:9696 vehicle-classifier-page

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies before code (cached until pyproject.toml or constraints.txt changes):
# pyproject.toml's `page` extra, Streamlit and requests, at the versions constraints.txt locks.
COPY pyproject.toml constraints.txt /tmp/build/
RUN python -c "import sys, tomllib; print(*tomllib.load(open(sys.argv[1], 'rb'))['project']['optional-dependencies']['page'], sep='\n')" /tmp/build/pyproject.toml > /tmp/build/requirements.txt \
    && pip install --no-cache-dir -c /tmp/build/constraints.txt -r /tmp/build/requirements.txt \
    && rm -rf /tmp/build

RUN useradd --no-log-init --create-home --uid 10001 app

# Only what the page needs: the page, its HTTP client (not the model code) and its config.
COPY vehicle_classifier/__init__.py vehicle_classifier/client.py vehicle_classifier/
COPY streamlit_app.py ./
COPY .streamlit/config.toml .streamlit/

USER 10001
EXPOSE 8501
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
CMD ["streamlit", "run", "streamlit_app.py", "--server.port=8501", "--server.address=0.0.0.0", "--server.headless=true", "--server.fileWatcherType=none"]
