#!/usr/bin/env bash
# Create .venv and install the project with its training, test and page extras, at constraints.txt's versions.
#   scripts/setup.sh            Python side (pip takes torch from this machine's wheel cache when
#                               it has one; elsewhere from PyPI)
#   scripts/setup.sh --browser  Debian's Chromium and nginx for the browser and proxy tests, when
#                               missing and root
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--browser" ]]; then
    # Debian packages the tests run for real: Chromium (the browser test) and nginx (the proxy
    # of make cluster and its tests). Installed when missing and root; else those tests skip.
    missing=()
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
    if [[ ${#missing[@]} -gt 0 ]]; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            echo "installing ${missing[*]} (Debian) for the browser and proxy tests"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "note: ${missing[*]} missing and not root: the tests that need them will be skipped"
        fi
    fi
    exit 0
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip_install() {  # quiet, but the whole log when pip fails
    .venv/bin/python -m pip install --progress-bar off "$@" >.venv/pip.log 2>&1 || { cat .venv/pip.log; exit 1; }
}
pip_install -c constraints.txt -e ".[train,dev,page]"  # the tested versions (the lock)
.venv/bin/python -c "import torch, timm, flask, streamlit" # fail here, not later, if the install did
touch .venv/.installed
