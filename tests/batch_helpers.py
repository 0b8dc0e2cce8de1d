"""Shared by the batch tests: a deterministic stand-in for handle_record (no model needed) and
small file helpers. The real engine is exercised by the tests marked as such."""

from __future__ import annotations

import hashlib
import json
import os
import time


def fake_infer(record: str, defaults: dict | None = None, delay_s: float = 0.0):
    """Same contract as serve.handler.handle_record bound to an engine: never raises, errors are objects."""
    if delay_s:
        time.sleep(delay_s)
    try:
        obj = json.loads(record)
    except ValueError:
        return {"error": "record is not valid JSON", "error_type": "invalid_request", "status": 400}
    if isinstance(obj, str):
        obj = {"inputs": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), str):
        return {"error": "expected {'inputs': str}", "error_type": "invalid_request", "status": 400}
    params = {**(defaults or {}), **obj.get("parameters", {})}
    # a fake "generation" that depends on the prompt and the seed, like sampling would
    digest = hashlib.sha256(f"{obj['inputs']}|{params.get('seed')}".encode()).hexdigest()[:8]
    n = int(params.get("max_new_tokens", 3))
    return [{"generated_text": f"<{obj['inputs']}:{digest}>", "details": {"finish_reason": "length",
                                                                          "generated_tokens": n}}]


def write(path: str, data: bytes | str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def prompts(n: int, tag: str = "p") -> str:
    return "".join(json.dumps({"inputs": f"{tag}{i}"}) + "\n" for i in range(n))


def read_lines(path: str) -> list:
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(x) for x in data.split(b"\n")[:-1]]
