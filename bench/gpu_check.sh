#!/usr/bin/env bash
# The GPU check, without make: run bench/gpu_check.py with the CUDA machine's own python (never the CPU .venv).
#   bash bench/gpu_check.sh OUT_DIR [gpu_check.py options]       GPU_PY=/path/to/python to choose one
#   bash bench/gpu_check.sh --dry-run OUT_DIR                    on a CPU: the step plan + estimate, dry run
# On a lent GPU machine: command `bash bench/gpu_check.sh "$OUT"`, carry ["build/wheels"], timeout_s 330.
set -euo pipefail
dry=()
if [ "${1:-}" = "--dry-run" ]; then
  dry=(--dry-run)
  shift
fi
out="${1:?usage: bench/gpu_check.sh [--dry-run] OUT_DIR [options]}"
shift
cd "$(dirname "$0")/.."
if [ ${#dry[@]} -eq 0 ]; then
  py="${GPU_PY:-python3}"
  case "$(command -v "$py")" in
    "$PWD"/.venv/*) echo "gpu_check: $py is the CPU .venv; set GPU_PY to the CUDA machine's python" >&2; exit 2 ;;
  esac
else
  py="${GPU_PY:-.venv/bin/python}"  # the dry run needs the dev .venv (make install)
fi
exec "$py" bench/gpu_check.py --out "$out" "${dry[@]}" "$@"
