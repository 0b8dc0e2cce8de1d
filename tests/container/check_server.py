"""Black-box checks of a running container's HTTP contract (stdlib only; run on the host).

Usage: check_server.py --port P --container ID --started EPOCH [--podman podman]
Waits for /ping 200 (prints the time since EPOCH), checks JSON (TGI and OpenAI shapes), SSE
streaming, JSON Lines and /execution-parameters, then sends SIGTERM while a streamed request is
in flight and checks that the request completes and the container exits 0 within 30 s.
Exit status 0 when every check passed; prints one line per check.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time

TIMEOUT = 120.0  # seconds for one HTTP request (CPU demo model: a few seconds)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post_json(port: int, payload: dict, content_type: str = "application/json") -> tuple[int, dict, bytes]:
    return request(port, "POST", "/invocations", json.dumps(payload).encode(), {"Content-Type": content_type})


def running(podman: str, container: str) -> bool:
    out = subprocess.run([podman, "inspect", "--format", "{{.State.Running}}", container],
                         capture_output=True, text=True)
    return out.stdout.strip() == "true"


def wait_ready(port: int, started: float, limit: float, podman: str, container: str) -> float:
    """Seconds from `started` to the first /ping 200; fails after `limit` seconds or if the container exits."""
    last = None
    while time.time() - started < limit:
        if not running(podman, container):
            raise AssertionError(f"the container exited before /ping said 200 (last: {last})")
        try:
            status, _, _ = request(port, "GET", "/ping")
            if status == 200:
                return time.time() - started
            last = status
        except OSError as e:  # not listening yet
            last = e
        time.sleep(0.1)
    raise AssertionError(f"/ping not 200 within {limit:.0f} s (last: {last})")


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of a text/event-stream body, in order."""
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data:"):
            events.append(line[len("data:"):].strip())
    return events


def check_tgi_json(port: int) -> str:
    status, headers, body = post_json(port, {"inputs": "Hello", "parameters": {"max_new_tokens": 8}})
    assert status == 200, (status, body[:300])
    assert headers["content-type"].startswith("application/json"), headers
    out = json.loads(body)
    assert isinstance(out, list) and len(out) == 1, out
    details = out[0]["details"]
    assert isinstance(out[0]["generated_text"], str)
    assert 1 <= details["generated_tokens"] <= 8, details
    assert details["finish_reason"] in ("length", "eos_token", "stop_sequence"), details
    return f"generated_tokens={details['generated_tokens']} finish_reason={details['finish_reason']}"


def check_openai_json(port: int) -> str:
    payload = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}
    status, _, body = post_json(port, payload)
    assert status == 200, (status, body[:300])
    out = json.loads(body)
    usage = out["usage"]
    assert out["choices"][0]["message"]["role"] == "assistant", out
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    assert 1 <= usage["completion_tokens"] <= 8, usage
    return f"usage={usage}"


def check_stream(port: int) -> str:
    status, headers, body = post_json(port, {"inputs": "Once upon a time", "stream": True,
                                             "parameters": {"max_new_tokens": 12}})
    assert status == 200, (status, body[:300])
    assert headers["content-type"].startswith("text/event-stream"), headers
    assert body.endswith(b"\n"), body[-80:]  # every event ends in a newline (clients re-split)
    events = [json.loads(e) for e in sse_events(body)]
    assert events, body[:300]
    assert all("token" in e for e in events), events[:2]
    assert all(e["generated_text"] is None for e in events[:-1]), events
    final = events[-1]
    assert isinstance(final["generated_text"], str) and final["details"]["finish_reason"], final
    assert final["details"]["generated_tokens"] == len(events), (final["details"], len(events))
    return f"{len(events)} SSE events, finish_reason={final['details']['finish_reason']}"


def check_jsonlines(port: int) -> str:
    lines = [
        json.dumps({"inputs": "first", "parameters": {"max_new_tokens": 4}}),
        "{this is not json",
        json.dumps({"inputs": "third", "parameters": {"max_new_tokens": 4}}),
    ]
    body_in = ("\n".join(lines) + "\n").encode()
    status, _, body = request(port, "POST", "/invocations", body_in,
                              {"Content-Type": "application/jsonlines", "Accept": "application/jsonlines"})
    assert status == 200, (status, body[:300])
    out = [json.loads(line) for line in body.decode().splitlines()]
    assert len(out) == 3, out  # exactly one line per input line, in order
    assert "error" in json.dumps(out[1]), out[1]
    assert "error" not in json.dumps(out[0]) and "error" not in json.dumps(out[2]), out
    return "3 lines in, 3 lines out, the bad line is an error object"


def check_execution_parameters(port: int) -> str:
    status, _, body = request(port, "GET", "/execution-parameters")
    assert status == 200, (status, body[:300])
    params = json.loads(body)
    assert {"MaxConcurrentTransforms", "BatchStrategy", "MaxPayloadInMB"} <= set(params), params
    return json.dumps(params)


def check_sigterm(port: int, podman: str, container: str) -> str:
    """SIGTERM while a streamed request is mid-generation: it must finish, then the server exits 0."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    # Short enough to finish inside the server's graceful timeout on a slow, shared 2-core CI machine.
    payload = {"inputs": "A long story:", "stream": True, "parameters": {"max_new_tokens": 32}}
    conn.request("POST", "/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    first = resp.readline()  # the first event: the request is now in flight
    assert first.startswith(b"data:"), first
    sent = time.time()
    subprocess.run([podman, "kill", "--signal", "TERM", container], check=True, capture_output=True)
    rest: list[bytes] = []
    reader = threading.Thread(target=lambda: rest.append(resp.read()))
    reader.start()
    reader.join(TIMEOUT)
    events = [json.loads(e) for e in sse_events(first + b"".join(rest))]
    final = events[-1]
    assert final.get("details") and final["details"].get("finish_reason"), final
    waited = subprocess.run([podman, "wait", container], capture_output=True, text=True, timeout=60)
    exited = time.time() - sent
    code = waited.stdout.strip()
    assert code == "0", f"exit code {code!r} {waited.stderr}"
    assert exited < 30, f"exited {exited:.1f} s after SIGTERM (SageMaker sends SIGKILL at 30 s)"
    return (f"in-flight request finished ({len(events)} events, {final['details']['finish_reason']}), "
            f"exit 0 {exited:.1f} s after SIGTERM")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--container", required=True)
    ap.add_argument("--started", type=float, required=True, help="epoch seconds when `run` was issued")
    ap.add_argument("--podman", default="podman")
    ap.add_argument("--ready-limit", type=float, default=300.0)
    args = ap.parse_args()

    ready = wait_ready(args.port, args.started, args.ready_limit, args.podman, args.container)
    print(f"serve-to-first-ping: {ready:.1f} s")
    checks = [
        ("tgi json", lambda: check_tgi_json(args.port)),
        ("openai json", lambda: check_openai_json(args.port)),
        ("sse stream", lambda: check_stream(args.port)),
        ("json lines", lambda: check_jsonlines(args.port)),
        ("execution-parameters", lambda: check_execution_parameters(args.port)),
        ("sigterm drain", lambda: check_sigterm(args.port, args.podman, args.container)),
    ]
    failed = 0
    for name, check in checks:
        try:
            print(f"ok   {name}: {check()}")
        except Exception as e:  # report every check, fail at the end
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
