"""Call the model: TGI-style JSON, OpenAI-style chat messages, JSON Lines, and token streaming.

The same functions work against a SageMaker endpoint (boto3 sagemaker-runtime) and against the server
running locally (`python -m serve serve`, plain HTTP): build the target with `endpoint(...)` or `local(...)`.

Streaming: InvokeEndpointWithResponseStream delivers PayloadPart bytes split at arbitrary positions,
even inside a UTF-8 character. `iter_lines` decodes incrementally and re-splits on newlines,
`iter_sse` groups `data:` lines into events, `iter_events` parses them until `data: [DONE]`.

    python -m granite_sm.invoke --endpoint-name granite-4-h-micro-20260101-120000 --prompt "Hi" --stream
    python -m granite_sm.invoke --url http://127.0.0.1:8080 --chat --prompt "Hi"
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from granite_sm.common import add_aws_args, clients

JSON = "application/json"
JSONL = "application/jsonlines"
SSE = "text/event-stream"


class InvokeError(RuntimeError):
    """The container answered with an error status (SageMaker: ModelError), or a stream carried an error."""

    def __init__(self, status: int | None, body: str) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


# ---- transports: post(body) -> bytes, and stream(body) -> iterator of raw byte parts ----

class EndpointTarget:
    def __init__(self, runtime, endpoint_name: str, custom_attributes: str | None = None) -> None:
        self.runtime = runtime
        self.endpoint_name = endpoint_name
        self.custom_attributes = custom_attributes

    def _kw(self, body: bytes, content_type: str, accept: str) -> dict:
        kw = {"EndpointName": self.endpoint_name, "Body": body, "ContentType": content_type, "Accept": accept}
        if self.custom_attributes:
            kw["CustomAttributes"] = self.custom_attributes
        return kw

    def _model_error(self, e: Exception) -> InvokeError:
        resp = getattr(e, "response", {})
        return InvokeError(resp.get("OriginalStatusCode"), resp.get("OriginalMessage") or str(e))

    def post(self, body: bytes, content_type: str = JSON, accept: str = JSON) -> bytes:
        try:
            resp = self.runtime.invoke_endpoint(**self._kw(body, content_type, accept))
        except self.runtime.exceptions.ModelError as e:
            raise self._model_error(e) from e
        return resp["Body"].read()

    def stream(self, body: bytes, content_type: str = JSON, accept: str = SSE) -> Iterator[bytes]:
        try:
            resp = self.runtime.invoke_endpoint_with_response_stream(**self._kw(body, content_type, accept))
        except self.runtime.exceptions.ModelError as e:
            raise self._model_error(e) from e
        return payload_parts(resp["Body"])


class LocalTarget:
    """The server on this machine (LOCAL mode), spoken to the way SageMaker would: POST /invocations."""

    def __init__(self, url: str, timeout_s: float = 600.0, custom_attributes: str | None = None) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.custom_attributes = custom_attributes
        self.http = requests.Session()

    def _request(self, body: bytes, content_type: str, accept: str, stream: bool):
        headers = {"Content-Type": content_type, "Accept": accept}
        if self.custom_attributes:
            headers["X-Amzn-SageMaker-Custom-Attributes"] = self.custom_attributes
        r = self.http.post(self.url + "/invocations", data=body, headers=headers, stream=stream,
                           timeout=self.timeout_s)
        if r.status_code >= 400:
            raise InvokeError(r.status_code, r.text)
        return r

    def post(self, body: bytes, content_type: str = JSON, accept: str = JSON) -> bytes:
        return self._request(body, content_type, accept, stream=False).content

    def stream(self, body: bytes, content_type: str = JSON, accept: str = SSE) -> Iterator[bytes]:
        r = self._request(body, content_type, accept, stream=True)
        return (part for part in r.iter_content(chunk_size=None) if part)


def endpoint(endpoint_name: str, runtime=None, region: str | None = None, profile: str | None = None) -> EndpointTarget:
    return EndpointTarget(runtime or clients(region, profile, "sagemaker-runtime")[0], endpoint_name)


def local(url: str) -> LocalTarget:
    return LocalTarget(url)


# ---- stream parsing ----

def payload_parts(event_stream: Iterable[dict]) -> Iterator[bytes]:
    """InvokeEndpointWithResponseStream events -> raw bytes. A stream error (ModelStreamError,
    InternalStreamFailure) raises InvokeError: botocore raises EventStreamError for those exception
    events while iterating, it never yields them as dicts."""
    from botocore.exceptions import EventStreamError

    try:
        for event in event_stream:
            if "PayloadPart" in event:
                yield event["PayloadPart"]["Bytes"]
    except EventStreamError as e:
        err = e.response.get("Error", {})
        raise InvokeError(None, f"{err.get('Code', 'EventStreamError')}: {err.get('Message', str(e))}") from None


def iter_lines(parts: Iterable[bytes]) -> Iterator[str]:
    """Byte parts split anywhere -> text lines (without the newline). An incremental decoder keeps the
    first bytes of a character split across parts until the rest arrives."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    for part in parts:
        pending += decoder.decode(part)
        *lines, pending = pending.split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    pending += decoder.decode(b"", final=True)  # raises on a truncated character at the very end
    if pending:
        yield pending.removesuffix("\r")


def iter_sse(lines: Iterable[str]) -> Iterator[str]:
    """Server-Sent Events: consecutive `data:` lines form one event, a blank line ends it."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
        # comments (":...") and event/id/retry fields carry nothing we need
    if data:
        yield "\n".join(data)


def iter_events(parts: Iterable[bytes]) -> Iterator[dict]:
    """Parsed JSON events until `data: [DONE]` (OpenAI) or the end of the stream (TGI)."""
    for data in iter_sse(iter_lines(parts)):
        if data == "[DONE]":
            return
        event = json.loads(data)
        if isinstance(event, dict) and "error" in event:
            raise InvokeError(None, f"{event.get('error_type', 'error')}: {event['error']}")
        yield event


def event_text(event: dict) -> str:
    """New text in one event: a TGI token event or an OpenAI chat/completions chunk."""
    if "token" in event:
        token = event["token"]
        return "" if token.get("special") else token.get("text", "")
    text = ""
    for choice in event.get("choices", []):
        text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return text


# ---- requests ----

def invoke_json(target, payload: Any) -> Any:
    return json.loads(target.post(json.dumps(payload).encode(), JSON, JSON))


def generate(target, inputs: str | list[str], **parameters) -> list[dict]:
    """TGI shape: {"inputs": ..., "parameters": {...}} -> [{"generated_text": ..., "details": {...}}]."""
    return invoke_json(target, {"inputs": inputs, "parameters": parameters})


def chat(target, messages: list[dict], **fields) -> dict:
    """OpenAI chat-completions shape -> {"choices": [...], "usage": {...}}."""
    return invoke_json(target, {"messages": messages, **fields})


def invoke_jsonlines(target, records: list[dict]) -> list[dict]:
    """Many requests in one body (what batch transform sends with MultiRecord + SplitType=Line):
    one response line per record, in order."""
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    out = target.post(body, JSONL, JSONL).decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def stream_events(target, payload: dict) -> Iterator[dict]:
    return iter_events(target.stream(json.dumps({**payload, "stream": True}).encode(), JSON, SSE))


def stream_text(target, payload: dict) -> Iterator[str]:
    for event in stream_events(target, payload):
        text = event_text(event)
        if text:
            yield text


def print_stream(target, payload: dict, file=None) -> str:
    """Print tokens as they arrive; returns the whole text."""
    out = file or sys.stdout
    pieces = []
    for text in stream_text(target, payload):
        pieces.append(text)
        print(text, end="", flush=True, file=out)
    print(file=out)
    return "".join(pieces)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Invoke the endpoint (or a local server) with a prompt.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint-name", help="SageMaker endpoint")
    where.add_argument("--url", help="local server, e.g. http://127.0.0.1:8080")
    p.add_argument("--prompt", default="Write a haiku about state space models.")
    p.add_argument("--chat", action="store_true", help="send OpenAI-style messages instead of TGI inputs")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--stream", action="store_true", help="stream tokens (InvokeEndpointWithResponseStream)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--jsonl", help="send this JSON Lines file as one application/jsonlines request")
    add_aws_args(p)
    return p


def payload_from_args(args: argparse.Namespace) -> dict:
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        return {"messages": messages, "max_tokens": args.max_new_tokens, "temperature": args.temperature}
    params: dict = {"max_new_tokens": args.max_new_tokens, "details": True}
    if args.temperature > 0:
        params.update(do_sample=True, temperature=args.temperature)
    return {"inputs": args.prompt, "parameters": params}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except InvokeError as e:  # the error alone, no traceback
        print(file=sys.stdout, flush=True)  # end a partly printed stream
        print(f"error: {e.body if e.status is None else e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    target = local(args.url) if args.url else endpoint(args.endpoint_name, region=args.region, profile=args.profile)
    if args.jsonl:
        records = [json.loads(x) for x in Path(args.jsonl).read_text().splitlines() if x.strip()]
        for line in invoke_jsonlines(target, records):
            print(json.dumps(line))
        return 0
    payload = payload_from_args(args)
    if args.stream:
        print_stream(target, payload)
    else:
        print(json.dumps(invoke_json(target, payload), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
