# Stands in for the official python:3.11-slim (Debian bookworm, CPython 3.11, pip, root) where
# registry images cannot be pulled: Debian's own python3.11, pip and venv on the slim Debian
# stand-in, `python` and `pip` on PATH, pip free to install into the system environment (no
# EXTERNALLY-MANAGED marker, as in the official image), and the build machine's CA
# certificates, so that pip inside a build reaches PyPI through this network's proxy.
#   built by tests/docker_stack.py, from a context holding this file and ca-certificates.crt
# The parent is the stand-in made by debian-bookworm-slim.sh, given as a build argument.
# hadolint ignore=DL3006
ARG BASE
# hadolint ignore=DL3006
FROM ${BASE}
LABEL org.opencontainers.image.description="stand-in for python:3.11-slim (tests/containers)"
ENV LANG=C.UTF-8
# Debian's packages at the suite's current versions, as the official image takes its own.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/* /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python \
    && ln -s /usr/bin/pip3 /usr/local/bin/pip
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
