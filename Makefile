# Two commands do everything on a fresh machine; each sets up .venv first (once, and again
# whenever pyproject.toml or constraints.txt changes).
#   make run    train a model if there is none in models/, then serve it on :9696
#   make test   the test suite (installs, as root, what it runs besides Python: Chromium, nginx,
#               the Docker engine and Compose, from Debian and PyPI)
#   make page   the web page on :8501 (talks to the service that make run serves)
#   make cluster  production on this machine: nginx on $PORT (9696) in front of $REPLICAS (2)
#                 gunicorn replicas serving $MODEL_DIR (models), in the foreground
#   make reload   roll the artifact now in $MODEL_DIR out to that cluster, one replica at a time

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup page bench cluster reload

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	scripts/setup.sh

setup: $(STAMP)

run: setup
	scripts/run.sh

test: setup
	scripts/setup.sh --system
	$(PYTHON) -m pytest

cluster: setup
	$(PYTHON) -m vehicle_classifier.serving.cluster serve

reload: setup
	$(PYTHON) -m vehicle_classifier.serving.cluster reload

page: setup
	$(VENV)/bin/streamlit run streamlit_app.py

bench: setup
	$(PYTHON) benchmarks/bench_training.py
