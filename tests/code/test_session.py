"""code/granite_sm/session.py: the boto3 calls of a session against sagemaker-runtime's service model (Stubber)."""

from __future__ import annotations

import io
import json

import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from tests.sdk_helpers import client, load, payload_event_stream

session = load("session")
invoke = load("invoke")
EP = "granite-4-h-micro-test"
SID = "w0-" + "ab" * 16


def _body(obj) -> StreamingBody:
    raw = json.dumps(obj).encode() if obj is not None else b""
    return StreamingBody(io.BytesIO(raw), len(raw))


def test_parse_new_session_header():
    sid, exp = session.parse_new_session(f"{SID}; Expires=2026-12-01T22:00:00Z")
    assert sid == SID and exp == 1796162400.0
    with pytest.raises(ValueError):
        session.parse_new_session(SID)


def test_open_turns_stream_close_send_the_session_id():
    rt = client("sagemaker-runtime")
    turn = {"messages": [{"role": "user", "content": "Hi"}]}
    answer = {"choices": [{"message": {"role": "assistant", "content": "Hello"}}]}
    with Stubber(rt) as stub:
        stub.add_response("invoke_endpoint",
                          {"Body": _body({"session_id": SID}), "NewSessionId": f"{SID}; Expires=2026-12-01T22:00:00Z"},
                          {"EndpointName": EP, "ContentType": "application/json", "Accept": "application/json",
                           "SessionId": "NEW_SESSION", "Body": json.dumps({"requestType": "NEW_SESSION"}).encode()})
        stub.add_response("invoke_endpoint", {"Body": _body(answer)},
                          {"EndpointName": EP, "ContentType": "application/json", "Accept": "application/json",
                           "SessionId": SID, "Body": json.dumps(turn).encode()})
        chunk = {"choices": [{"delta": {"content": "Hey"}}]}
        parts = [f"data: {json.dumps(chunk)}\n\n".encode(), b"data: [DONE]\n\n"]
        rt.meta.events.register("after-call.sagemaker-runtime.InvokeEndpointWithResponseStream",
                                lambda parsed, **_: parsed.__setitem__("Body", payload_event_stream(parts)))
        stub.add_response("invoke_endpoint_with_response_stream", {"Body": {}},
                          {"EndpointName": EP, "ContentType": "application/json", "Accept": "text/event-stream",
                           "SessionId": SID, "Body": json.dumps({**turn, "stream": True}).encode()})
        stub.add_response("invoke_endpoint", {"Body": _body(None), "ClosedSessionId": SID},
                          {"EndpointName": EP, "ContentType": "application/json", "Accept": "application/json",
                           "SessionId": SID, "Body": json.dumps({"requestType": "CLOSE"}).encode()})
        with session.EndpointSession(rt, EP) as s:
            assert s.id == SID and s.expires == 1796162400.0
            assert s.chat(turn["messages"]) == answer
            assert [invoke.event_text(e) for e in s.stream(turn)] == ["Hey"]
        assert s.id is None
        stub.assert_no_pending_responses()


def test_model_error_for_a_closed_session_is_invoke_error():
    rt = client("sagemaker-runtime")
    s = session.EndpointSession(rt, EP)
    s.id = SID
    with Stubber(rt) as stub:
        stub.add_client_error("invoke_endpoint", service_error_code="ModelError", http_status_code=424,
                              service_message="Received client error (410)",
                              response_meta={}, modeled_fields={"OriginalStatusCode": 410,
                                                                "OriginalMessage": "session is closed"})
        with pytest.raises(invoke.InvokeError) as e:
            s.chat([{"role": "user", "content": "x"}])
    assert e.value.status == 410 and "closed" in e.value.body


def test_close_must_be_confirmed():
    rt = client("sagemaker-runtime")
    s = session.EndpointSession(rt, EP)
    s.id = SID
    with Stubber(rt) as stub:
        stub.add_response("invoke_endpoint", {"Body": _body(None)})
        with pytest.raises(invoke.InvokeError, match="did not confirm"):
            s.close()
