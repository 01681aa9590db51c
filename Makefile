# Two commands do everything on a fresh machine; each sets up .venv first (once, and again
# whenever pyproject.toml or constraints.txt changes).
#   make run    train a model if there is none in models/, then serve it on :9696
#   make test   the test suite (installs, as root, what it runs besides Python: Chromium, nginx,
#               the Docker engine and Compose, from Debian and PyPI)
#   make page   the web page on :8501 (talks to the service that make run serves)
#   make reload   the service that make run started serves the model now in $MODEL_DIR: checks
#                 that it loads, then SIGHUP to gunicorn's master (new workers, old ones retired)
# nginx in front of replicas on one machine is docker compose (docker-compose.yml); many
# machines, deploy/k8s (docs/deployment.md says which when).

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIDFILE := gunicorn.pid

.PHONY: run test setup page bench reload

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	scripts/setup.sh

setup: $(STAMP)

run: setup
	GUNICORN_PIDFILE=$(PIDFILE) scripts/run.sh

test: setup
	scripts/setup.sh --system
	$(PYTHON) -m pytest

reload: setup
	$(PYTHON) predict.py --check
	kill -HUP $$(cat $(PIDFILE))

page: setup
	$(VENV)/bin/streamlit run streamlit_app.py

bench: setup
	$(PYTHON) benchmarks/bench_training.py
