"""Run `python -m serve serve` (real gunicorn) on a free port for process-level tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "MAX_", "MODEL_"))}
        full_env.update(env)
        full_env.setdefault("DEVICE", "cpu")
        if "SNAPSHOT_DISK_DIR" not in env:  # its own disk tier (a restart of this server finds it again)
            full_env["SNAPSHOT_DISK_DIR"] = str(log_path.parent / f"snapshots-{self.port}")
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds until /ping said 200. Asserts the port answers (503) while the model loads."""
        t0 = time.monotonic()
        saw_503 = False
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.log()}"
            try:
                r = requests.get(self.url + "/ping", timeout=2)
            except (requests.ConnectionError, requests.Timeout):  # a loaded machine: workers importing torch
                time.sleep(0.1)
                continue
            if r.status_code == 200:
                assert saw_503 or time.monotonic() - t0 < 1, "never answered 503 while loading"
                return time.monotonic() - t0
            assert r.status_code == 503, r.text
            saw_503 = True
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def metric(self, name: str, default: float | None = None) -> float | None:
        """The value of one /metrics sample (`name` with its labels, if any); `default` when it is not there."""
        for line in requests.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return default

    def wait_workers(self, total_slots: int, timeout: float = 240.0) -> None:
        """/ping says 200 once one worker is ready: wait until /metrics counts every worker's slots."""
        deadline = time.monotonic() + timeout
        while self.metric("granite_ready") != 1.0 or self.metric("granite_total_slots") != float(total_slots):
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.5)

    def post(self, path: str, body, content_type: str = "application/json", **kw) -> requests.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Content-Type": content_type, **kw.pop("headers", {})}
        return requests.post(self.url + path, data=data, headers=headers, timeout=kw.pop("timeout", 120), **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def iter_sse(response: requests.Response):
    """Yield each SSE event's data as it arrives (re-splitting arbitrary chunks on blank lines)."""
    buf = b""
    for chunk in response.iter_content(chunk_size=None):
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            assert event.startswith(b"data:"), event
            yield event[5:].strip().decode()
    assert buf == b"", f"trailing bytes without a blank line: {buf!r}"


def ready_app(ckpt, env: dict[str, str], name: str = "tiny-test"):
    """(app, Flask test client, engine): the app with the real engine on `ckpt`, once /ping says 200.
    The caller shuts the engine down."""
    from model.engine.engine import Engine
    from serve.app import create_app
    from serve.config import load_config

    cfg = load_config(env)
    engine = Engine(ckpt, cfg.engine, name)
    app = create_app(cfg, engine)
    client = app.test_client()
    deadline = time.monotonic() + 120
    while client.get("/ping").status_code != 200:
        assert time.monotonic() < deadline, engine.error
        time.sleep(0.05)
    return app, client, engine
