"""Hold a conversation in a SageMaker stateful session: open, send turns, close.

The endpoint keeps the conversation (its token ids and the model's state after them) between calls, so each
turn sends only its new messages and the model does not re-read the history:

    with EndpointSession(runtime, "granite-4-h-micro-...") as s:          # InvokeEndpoint SessionId=NEW_SESSION
        s.chat([{"role": "user", "content": "Hi"}])                     # SessionId=<id>: only the new turn
        for event in s.stream({"messages": [{"role": "user", "content": "And then?"}]}):
            ...                                                         # streaming works inside a session
    # leaving the block sends {"requestType": "CLOSE"}

The runtime opens sessions only with InvokeEndpoint (InvokeEndpointWithResponseStream takes an existing id).
`LocalSession` speaks the same headers to a server on this machine. Both raise InvokeError for an error status
(an unknown, closed or expired session is a 4xx naming the id).
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import Iterator
from typing import Any

from granite_sm.invoke import JSON, SSE, InvokeError, iter_events, payload_parts

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
NEW_SESSION = "NEW_SESSION"


def parse_new_session(value: str) -> tuple[str, float]:
    """`<id>; Expires=YYYY-MM-DDTHH:MM:SSZ` -> (id, expiry as epoch seconds)."""
    sid, _, rest = value.partition(";")
    key, _, when = rest.strip().partition("=")
    if not sid or key != "Expires":
        raise ValueError(f"not a new-session header: {value!r}")
    return sid.strip(), float(calendar.timegm(time.strptime(when, "%Y-%m-%dT%H:%M:%SZ")))


class _Session:
    id: str | None = None
    expires: float | None = None

    def open(self, payload: dict | None = None) -> Any:
        """Open the session; with a payload, its first turn runs inside it and its response is returned."""
        if self.id is not None:
            raise RuntimeError(f"session {self.id} is already open")
        body, headers = self._post(payload or {"requestType": "NEW_SESSION"}, NEW_SESSION)
        self.id, self.expires = parse_new_session(headers[NEW_SESSION_HEADER])
        return body if payload is not None else None

    def invoke(self, payload: dict) -> Any:
        return self._post(payload, self._require())[0]

    def chat(self, messages: list[dict], **fields) -> dict:
        """Send the new chat messages; the session appends them to the conversation it holds."""
        return self.invoke({"messages": messages, **fields})

    def generate(self, inputs: str, **parameters) -> list[dict]:
        """TGI shape inside the session: `inputs` continue the session's text as raw continuation."""
        return self.invoke({"inputs": inputs, "parameters": parameters})

    def close(self) -> None:
        if self.id is None:
            return
        sid, self.id = self.id, None
        _, headers = self._post({"requestType": "CLOSE"}, sid)
        if headers.get(CLOSED_SESSION_HEADER) != sid:
            raise InvokeError(None, f"the endpoint did not confirm closing session {sid}")

    def _require(self) -> str:
        if self.id is None:
            raise RuntimeError("the session is not open: call open() first")
        return self.id

    def __enter__(self):
        if self.id is None:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EndpointSession(_Session):
    """A session on a SageMaker endpoint through boto3's sagemaker-runtime client."""

    def __init__(self, runtime, endpoint_name: str) -> None:
        self.runtime, self.endpoint_name = runtime, endpoint_name

    def _call(self, fn, **kw):
        try:
            return fn(EndpointName=self.endpoint_name, ContentType=JSON, **kw)
        except self.runtime.exceptions.ModelError as e:
            resp = getattr(e, "response", {})
            raise InvokeError(resp.get("OriginalStatusCode"), resp.get("OriginalMessage") or str(e)) from e

    def _post(self, payload: dict, session_id: str) -> tuple[Any, dict]:
        resp = self._call(self.runtime.invoke_endpoint, Body=json.dumps(payload).encode(), Accept=JSON,
                          SessionId=session_id)
        raw = resp["Body"].read()
        headers = {NEW_SESSION_HEADER: resp.get("NewSessionId"), CLOSED_SESSION_HEADER: resp.get("ClosedSessionId")}
        return (json.loads(raw) if raw.strip() else None), headers

    def stream(self, payload: dict) -> Iterator[dict]:
        resp = self._call(self.runtime.invoke_endpoint_with_response_stream, Accept=SSE, SessionId=self._require(),
                          Body=json.dumps({**payload, "stream": True}).encode())
        return iter_events(payload_parts(resp["Body"]))


class LocalSession(_Session):
    """The same session headers against the server on this machine (LOCAL mode)."""

    def __init__(self, url: str, timeout_s: float = 600.0) -> None:
        import requests

        self.url, self.timeout_s, self.http = url.rstrip("/"), timeout_s, requests.Session()

    def _request(self, payload: dict, session_id: str, stream: bool):
        r = self.http.post(self.url + "/invocations", data=json.dumps(payload).encode(), stream=stream,
                           timeout=self.timeout_s, headers={"Content-Type": JSON, "Accept": SSE if stream else JSON,
                                                            SESSION_HEADER: session_id})
        if r.status_code >= 400:
            raise InvokeError(r.status_code, r.text)
        return r

    def _post(self, payload: dict, session_id: str) -> tuple[Any, dict]:
        r = self._request(payload, session_id, stream=False)
        return (r.json() if r.content.strip() else None), dict(r.headers)

    def stream(self, payload: dict) -> Iterator[dict]:
        r = self._request({**payload, "stream": True}, self._require(), stream=True)
        return iter_events(part for part in r.iter_content(chunk_size=None) if part)
