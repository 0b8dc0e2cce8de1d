#!/bin/sh
# Container entry point (exec form in the Dockerfile, so signals reach the server directly).
#   serve            -> python -m serve serve   (what SageMaker runs)
#   batch [ARGS...]  -> python -m serve batch ARGS
#   sign [ARGS...]   -> python -m serve sign ARGS  (sign a checkpoint folder)
#   anything else    -> run as a command (e.g. `pytest tests/gpu`, `bash`)
set -e

# CUDA forward compatibility: the CUDA image's libraries are newer than the driver on some SageMaker
# AMIs (driver 470 on the default ml.g5 / ml.p4d AMI). cuda-compat puts a newer user-space driver in
# /usr/local/cuda-X.Y/compat; use it only when the host driver is older than it (with a newer host
# driver it would break CUDA). Recent NVIDIA container toolkits no longer mount it automatically.
for compat_dir in /usr/local/cuda/compat /usr/local/cuda-*/compat; do
    [ -e "$compat_dir/libcuda.so.1" ] && break
done
if [ -e "$compat_dir/libcuda.so.1" ] && [ -r /proc/driver/nvidia/version ]; then
    # libcuda.so.1 -> libcuda.so.570.124.06: the driver version these compat libraries stand in for
    compat_version=$(readlink "$compat_dir/libcuda.so.1" | sed -n 's/^libcuda\.so\.//p')
    host_version=$(sed -n 's/^NVRM.*Kernel Module[^0-9]*\([0-9][0-9.]*\).*/\1/p' /proc/driver/nvidia/version)
    if [ -n "$compat_version" ] && [ -n "$host_version" ] && [ "$host_version" != "$compat_version" ] \
        && [ "$(printf '%s\n%s\n' "$host_version" "$compat_version" | sort -V | head -n 1)" = "$host_version" ]; then
        echo "host NVIDIA driver $host_version is older than CUDA compat $compat_version: using $compat_dir"
        export LD_LIBRARY_PATH="$compat_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi

case "${1:-serve}" in
    serve | batch | sign)
        exec python -m serve "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
