#!/usr/bin/env bash
# Fills a wheelhouse for the CPU image: serve/container/requirements-cpu.txt (CPU torch and every runtime package,
# exact, from the project's lock), binary wheels for CPython 3.11 on x86_64 Linux (the CPU base image).
# The Dockerfile installs from it with --no-index, as an air-gapped build would.
# Usage: wheelhouse.sh DIR
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${1:?usage: wheelhouse.sh DIR}"
PY="${PY:-$REPO/.venv/bin/python}"
PINS="$REPO/serve/container/requirements-cpu.txt"
TORCH_CPU="$(grep -E '^torch==' "$PINS")"
mkdir -p "$DIR"
# The explicit interpreter/platform flags make the result independent of the host's Python. The base is Debian
# bookworm (glibc 2.36): manylinux_2_31 wheels run there (llguidance ships only those).
TARGET=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform linux_x86_64)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# torch: the CPU build must come from a find-links dir (pip config / PIP_FIND_LINKS), where its
# local version (+cpu) sorts above the multi-GB CUDA build on the index. Ask pip which file it
# would take (metadata only) before downloading anything.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
torch_url="$(quiet "$PY" -m pip install --dry-run --no-deps --ignore-installed --quiet --target "$scratch/t" \
    --report - "${TARGET[@]}" "$TORCH_CPU" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["download_info"]["url"])')"
case "$torch_url" in
    *+cpu-* | *%2Bcpu-*) ;;
    *) echo "wheelhouse: pip would take $torch_url for $TORCH_CPU, not a CPU build; put the CPU wheel" \
            "in a find-links dir (PIP_FIND_LINKS) first" >&2
       exit 1 ;;
esac
quiet "$PY" -m pip download --quiet --dest "$DIR" "${TARGET[@]}" \
    -r "$PINS"
torch_wheel="$(ls "$DIR"/torch-*.whl)"
case "$torch_wheel" in
    *+cpu-*) ;;
    *) echo "wheelhouse: $torch_wheel is not a CPU build of torch" >&2; exit 1 ;;
esac
echo "wheelhouse: $(find "$DIR" -name "*.whl" | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
