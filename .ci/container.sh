#!/usr/bin/env bash
# CI: the container test. Builds the CPU flavor of the Dockerfile with podman and checks the
# SageMaker contract (serve, /ping, /invocations JSON/SSE/JSON Lines, SIGTERM drain, batch).
# Installs podman, runc and debootstrap from Debian packages when missing (CI runs as root).
# Cost on a 2-core machine: ~6-7 min cold (debootstrap base + wheelhouse + build), ~1 min warm.
set -euo pipefail
cd "$(dirname "$0")/.."
make install
.venv/bin/python -m pytest -q -s -p no:cacheprovider -m container tests/container
