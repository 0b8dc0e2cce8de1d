#!/usr/bin/env bash
# Fills a wheelhouse for the CPU image: CPU torch + docker/requirements.txt (pinned by
# docker/constraints.txt), binary wheels for CPython 3.11 on x86_64 Linux (the CPU base image).
# The Dockerfile installs from it with --no-index, as an air-gapped build would.
# Usage: wheelhouse.sh DIR   (TORCH_CPU=torch==2.13.0 overrides the torch pin)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${1:?usage: wheelhouse.sh DIR}"
PY="${PY:-$REPO/.venv/bin/python}"
TORCH_CPU="${TORCH_CPU:-torch==2.13.0}"
mkdir -p "$DIR"
# The explicit interpreter/platform flags make the result independent of the host's Python.
# torch: on these machines the CPU build lies in a local find-links dir and wins over the
# multi-GB CUDA build on the index because its local version (+cpu) sorts higher; check that.
"$PY" -m pip download --quiet --only-binary=:all: --dest "$DIR" \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform linux_x86_64 \
    "$TORCH_CPU" -r "$REPO/docker/requirements.txt" -c "$REPO/docker/constraints.txt" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
torch_wheel="$(ls "$DIR"/torch-*.whl)"
case "$torch_wheel" in
    *+cpu-*) ;;
    *) echo "wheelhouse: $torch_wheel is not a CPU build of torch" >&2; exit 1 ;;
esac
echo "wheelhouse: $(find "$DIR" -name "*.whl" | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
