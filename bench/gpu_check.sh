#!/usr/bin/env bash
# make gpu-check: run bench/gpu_check.py with the CUDA machine's own python (never the CPU .venv).
#   bash bench/gpu_check.sh OUT_DIR [gpu_check.py options]      GPU_PY=/path/to/python to choose one
set -euo pipefail
out="${1:?usage: bench/gpu_check.sh OUT_DIR [options]}"
shift
cd "$(dirname "$0")/.."
py="${GPU_PY:-python3}"
case "$(command -v "$py")" in
  "$PWD"/.venv/*) echo "gpu_check: $py is the CPU .venv; set GPU_PY to the CUDA machine's python" >&2; exit 2 ;;
esac
exec "$py" bench/gpu_check.py --out "$out" "$@"
