"""One batch record: bytes of one input line -> the bytes of its output line.

Determinism (what makes a resumed run byte-identical to an uninterrupted one): a record that may
sample gets a seed of its own, derived from the job's base seed, the input's relative name and
the line index, passed as the default `seed` under the record's own parameters, so it is
reproducible; a record that sets `seed` keeps it, and a job-wide `seed` in --parameters wins
(every record then uses that seed). Greedy records get no seed, so their lines are the same
bytes the server's JSON Lines route returns for them. OpenAI-shaped responses carry a random `id`
and the clock in `created`: both are pinned (id from the record's place, `created` = the input
file's last-modified time), so any rerun over the same input writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json

from serve import encoders as enc
from serve import kinds


def seed_for(base: int, rel: str, index: int) -> int:
    digest = hashlib.sha256(f"{base}\0{rel}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def dumps(obj) -> bytes:
    """One output line: the server's JSON Lines encoding (compact, UTF-8), so a record's line is the
    same bytes here and from /invocations; escaped ASCII only if the text holds lone surrogates."""
    try:
        return enc.dumps(obj).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
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


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def join(text: str | None, resp) -> dict:
    """SageMaker JoinSource=Input for JSON: the output goes into the input object under
    "SageMakerOutput"; an input that is not an object goes under "SageMakerInput"."""
    obj = _loads(text) if text is not None and text.strip() else text
    if obj is None and text != "null":
        obj = text
    if isinstance(obj, dict):
        return {**obj, "SageMakerOutput": resp}
    return {"SageMakerInput": obj, "SageMakerOutput": resp}


def may_sample(obj, defaults: dict) -> bool:
    """Whether a record (decoded JSON) would be sampled rather than greedy: asked of its request kind
    (serve/kinds). A record no kind takes is never generated."""
    found = kinds.select(obj)
    return found is not None and found[0].may_sample(found[1], defaults)


def pin_ids(resp, rel: str, index: int, created: int):
    """OpenAI responses: a stable `id` and `created` instead of random / wall-clock ones."""
    if isinstance(resp, dict) and isinstance(resp.get("id"), str) and isinstance(resp.get("created"), int):
        prefix = resp["id"].split("-", 1)[0] if "-" in resp["id"] else "cmpl"
        digest = hashlib.sha256(f"{rel}\0{index}".encode()).hexdigest()[:32]
        return {**resp, "id": f"{prefix}-{digest}", "created": created}
    return resp


def render(infer, job, rel: str, index: int, raw: bytes, created: int = 0) -> tuple[bytes, bool, int]:
    """-> (output line without newline, is the response an error, generated tokens)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text, resp = None, error_object(f"line {index + 1} is not valid UTF-8: {e}")
    else:
        defaults = dict(job.defaults)
        if "seed" not in defaults and may_sample(_loads(text), defaults):
            defaults["seed"] = seed_for(job.seed, rel, index)
        # infer waits for queue room itself (serve/handler.py QUEUE_WAIT_S): no retries here
        resp = pin_ids(infer(text, defaults), rel, index, created)
    out = join(text, resp) if job.join_input else resp
    return dumps(out), is_error(resp), count_tokens(resp)
