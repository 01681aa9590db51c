# Two commands do everything on a fresh machine; each sets up .venv first (once, and again
# whenever pyproject.toml changes).
#   make run    train a model if there is none in models/, then serve it on :9696
#   make test   the test suite (installs Chromium from Debian for the browser test, as root)

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup serve bench

$(STAMP): pyproject.toml scripts/setup.sh
	scripts/setup.sh

setup: $(STAMP)

run: setup
	scripts/run.sh

test: setup
	scripts/setup.sh --browser
	$(PYTHON) -m pytest

bench: setup
	$(PYTHON) benchmarks/bench_training.py
