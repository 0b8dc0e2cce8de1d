"""One batch record: bytes of one input line -> the bytes of its output line.

Determinism (what makes a resumed run byte-identical to an uninterrupted one): every record gets
a seed of its own, derived from the job's base seed, the input's relative name and the line
index, passed as the default `seed` under the record's own parameters. Greedy records ignore it;
sampled records without a seed of their own become reproducible; a record that sets `seed`
keeps it. (A job-wide `seed` in --parameters also wins: every record then uses that seed.)
"""

from __future__ import annotations

import hashlib
import json
import time

_RETRY_STATUSES = (429, 503)  # engine queue full / not ready: wait and resubmit, not an error line
_RETRY_FOR_S = 300.0


def seed_for(base: int, rel: str, index: int) -> int:
    digest = hashlib.sha256(f"{base}\0{rel}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def dumps(obj) -> bytes:
    """Compact JSON on one line, UTF-8 (escaped ASCII if the text holds lone surrogates)."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def error_object(message: str, error_type: str = "invalid_request", status: int = 400) -> dict:
    return {"error": message, "error_type": error_type, "status": status}


def is_error(resp) -> bool:
    return isinstance(resp, dict) and "error" in resp and "status" in resp


def count_tokens(resp) -> int:
    """Generated tokens in a response object (TGI list/details or OpenAI usage shape)."""
    if isinstance(resp, list):
        return sum(count_tokens(r) for r in resp)
    if not isinstance(resp, dict):
        return 0
    usage = resp.get("usage")
    if isinstance(usage, dict):
        return int(usage.get("completion_tokens") or 0)
    details = resp.get("details")
    if isinstance(details, dict):
        return int(details.get("generated_tokens") or 0)
    return 0


def call_with_retry(infer, text: str, defaults: dict):
    deadline = time.monotonic() + _RETRY_FOR_S
    delay = 0.01
    while True:
        resp = infer(text, defaults)
        if not (is_error(resp) and resp.get("status") in _RETRY_STATUSES) or time.monotonic() > deadline:
            return resp
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def join(text: str | None, resp) -> dict:
    """SageMaker JoinSource=Input for JSON: the output goes into the input object under
    "SageMakerOutput"; an input that is not an object goes under "SageMakerInput"."""
    try:
        obj = json.loads(text) if text is not None and text.strip() else text
    except ValueError:
        obj = text
    if isinstance(obj, dict):
        return {**obj, "SageMakerOutput": resp}
    return {"SageMakerInput": obj, "SageMakerOutput": resp}


def render(infer, job, rel: str, index: int, raw: bytes) -> tuple[bytes, bool, int]:
    """-> (output line without newline, is the response an error, generated tokens)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text, resp = None, error_object(f"line {index + 1} is not valid UTF-8: {e}")
    else:
        defaults = dict(job.defaults)
        defaults.setdefault("seed", seed_for(job.seed, rel, index))
        resp = call_with_retry(infer, text, defaults)
    out = join(text, resp) if job.join_input else resp
    return dumps(out), is_error(resp), count_tokens(resp)
