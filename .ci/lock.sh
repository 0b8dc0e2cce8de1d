#!/usr/bin/env bash
# `make lock`: the one lock, and the image pins generated from it. Everything is resolved by uv from pyproject.toml:
#   .ci/lock.txt                          the CPU dev/test environment, every package exact (CPython 3.11, Linux
#                                         x86_64): `make install`, .ci/run and the wheel checks install exactly this;
#   serve/container/requirements-cpu.txt  the CPU image: pyproject's runtime dependencies at the lock's versions;
#   serve/container/constraints.txt       the CUDA image: the same for CPython 3.12 and the image's CUDA torch
#                                         (Dockerfile TORCH_VERSION; torch itself is pinned there, not here).
# A pin already in a file is kept unless asked: `make lock` after a pyproject edit changes only what it must;
# `make lock LOCK_ARGS="--upgrade-package transformers"` (or --upgrade) moves pins on purpose.
# Env: UV (uv binary), TORCH_CPU / TRITON_CPU (the dev torch build and the triton it pins), TORCH_FIND_LINKS
# (a folder or page that holds the CPU torch wheel). Extra arguments go to every `uv pip compile`.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
UV="${UV:-uv}"
TORCH_CPU="${TORCH_CPU:?set TORCH_CPU, e.g. torch==2.13.0}"
TRITON_CPU="${TRITON_CPU:?set TRITON_CPU, e.g. triton==3.7.1}"
FIND_LINKS="${TORCH_FIND_LINKS:?set TORCH_FIND_LINKS to a folder or page that holds the CPU torch wheel}"
CUDA_TORCH="torch==$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)"
[ "$CUDA_TORCH" != "torch==" ] || { echo "lock: no ARG TORCH_VERSION in Dockerfile" >&2; exit 1; }

tmp=build/lock  # the inputs' paths show in the files' "# via" notes: a fixed relative path keeps them stable
mkdir -p "$tmp"
compile() { "$UV" pip compile --quiet --custom-compile-command "make lock" --python-platform x86_64-manylinux_2_28 "$@"; }

printf '%s\n' "$TORCH_CPU" "$TRITON_CPU" > "$tmp/dev.in"
compile pyproject.toml --extra dev "$tmp/dev.in" --find-links "$FIND_LINKS" --python-version 3.11 \
    -o .ci/lock.txt "${@}"

printf '%s\n' "$TORCH_CPU" > "$tmp/cpu.in"
compile pyproject.toml "$tmp/cpu.in" -c .ci/lock.txt --find-links "$FIND_LINKS" --python-version 3.11 \
    -o serve/container/requirements-cpu.txt "${@}"

# The CUDA image: its own torch (and the triton and CUDA libraries that torch pins); every other package at the
# lock's version. einops is what mamba-ssm's kernels import (the kernels themselves are wheels pinned in the Dockerfile).
grep -v -E '^(torch|triton)==' .ci/lock.txt > "$tmp/shared.txt"
printf '%s\n' "$CUDA_TORCH" einops > "$tmp/cuda.in"
compile pyproject.toml "$tmp/cuda.in" -c "$tmp/shared.txt" --python-version 3.12 --no-emit-package torch \
    -o serve/container/constraints.txt "${@}"
wc -l .ci/lock.txt serve/container/requirements-cpu.txt serve/container/constraints.txt
