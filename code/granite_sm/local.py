"""LOCAL mode: run this repository's server and batch CLI on this machine, as SageMaker would run the image.

`LocalServer` starts `python -m serve serve` on a free port (the demo model by default, or a checkpoint
folder), waits for /ping, and stops it with SIGTERM like SageMaker does. `run_local_batch` runs
`python -m serve batch` over a folder of JSON Lines. `throughput_sweep` measures aggregate tokens/s at
several concurrency levels through the same /invocations route.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Inherited variables that would change what the local server loads or how it is limited.
_DROP_PREFIXES = ("SAGEMAKER_", "MAX_", "MODEL_", "HF_MODEL_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(model_dir: str | None = None, cache_dir: str | None = None, extra: dict | None = None) -> dict:
    """The environment for a local server: a checkpoint folder (MODEL_DIR) or the demo model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_PREFIXES)}
    if model_dir:
        env["MODEL_DIR"] = str(model_dir)
    else:
        env["MODEL_ID"] = "demo"
        env["MODEL_DIR"] = str(Path(cache_dir or tempfile.gettempdir()) / "no-model-dir")  # not /opt/ml/model
    env["MODEL_CACHE_DIR"] = str(cache_dir or Path(tempfile.gettempdir()) / "granite-h-cache")
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


class LocalServer:
    def __init__(self, model_dir: str | None = None, cache_dir: str | None = None, env: dict | None = None,
                 port: int | None = None, log_path: str | Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = server_env(model_dir, cache_dir, env)
        self.log_path = Path(log_path or Path(tempfile.mkdtemp(prefix="granite-server-")) / "server.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> LocalServer:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        atexit.register(self.stop)  # a notebook kernel that dies mid-way must not leave the server running
        return self

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Poll /ping like SageMaker (2 s per try) until 200; seconds waited."""
        import requests

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/ping", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 40.0) -> int | None:
        """SIGTERM (drains in-flight requests), then SIGKILL after timeout_s, as SageMaker does."""
        if self.proc is None:
            return None
        atexit.unregister(self.stop)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> LocalServer:
        self.start().wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_local_batch(input_path: str | Path, output_dir: str | Path, model_dir: str | None = None,
                    cache_dir: str | None = None, args: list[str] | None = None,
                    timeout_s: float = 600.0) -> subprocess.CompletedProcess:
    """`python -m serve batch --input IN --output OUT` (what `docker run IMAGE batch` runs): one
    <name>.out per input file, one line per input line."""
    cmd = [sys.executable, "-m", "serve", "batch", "--input", str(input_path), "--output", str(output_dir),
           "--progress", "none", *(args or [])]
    proc = subprocess.run(cmd, cwd=REPO, env=server_env(model_dir, cache_dir), capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"batch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def simulate_transform(post_jsonlines, input_paths: list[Path], output_dir: str | Path,
                       max_payload_mb: float = 6) -> list[Path]:
    """What a batch transform with BatchStrategy=MultiRecord, SplitType=Line, AssembleWith=Line does with
    each input file: pack whole lines into requests of at most MaxPayloadInMB, POST each as
    application/jsonlines, and join the answers line by line into <name>.out.
    `post_jsonlines(body: bytes) -> bytes` sends one request (e.g. a LocalTarget's post)."""
    limit = int(max_payload_mb * 1024 * 1024)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = []
    for path in input_paths:
        lines = [ln + b"\n" for ln in Path(path).read_bytes().splitlines() if ln.strip()]
        requests_, current = [], b""
        for line in lines:
            if current and len(current) + len(line) > limit:
                requests_.append(current)
                current = b""
            current += line
        if current:
            requests_.append(current)
        answers = [post_jsonlines(body) for body in requests_]
        out = out_dir / f"{Path(path).name}.out"
        out.write_bytes(b"".join(a if a.endswith(b"\n") else a + b"\n" for a in answers if a))
        outputs.append(out)
    return outputs


def throughput_sweep(generate_fn, prompts: list[str], concurrencies: list[int], max_new_tokens: int = 32,
                     requests_per_level: int | None = None) -> list[dict]:
    """Aggregate generated tokens/s at each concurrency. `generate_fn(prompt, max_new_tokens)` must return
    the number of generated tokens (e.g. from details.generated_tokens)."""
    rows = []
    for c in concurrencies:
        n = requests_per_level or 2 * c
        work = [prompts[i % len(prompts)] for i in range(n)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=c) as pool:
            tokens = sum(pool.map(lambda p: generate_fn(p, max_new_tokens), work))
        seconds = time.perf_counter() - t0
        rows.append({"concurrency": c, "requests": n, "tokens": tokens, "seconds": round(seconds, 3),
                     "tokens_per_s": round(tokens / seconds, 1)})
    return rows
