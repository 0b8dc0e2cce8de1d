"""code/granite_sm/invoke.py: request shapes against the sagemaker-runtime service model (Stubber), and
the streaming reader over payload parts split anywhere, including inside UTF-8 characters."""

import io
import json

import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sdk_helpers import client, load, payload_event_stream

invoke = load("invoke")

EP = "granite-4-h-micro-test"


def tgi_events(texts: list[str]) -> list[bytes]:
    """The server's TGI stream: one `data:{json}` event per token, blank line after each."""
    out = []
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        ev = {"index": i, "token": {"id": i, "text": text, "logprob": -1.0, "special": False},
              "generated_text": "".join(texts) if last else None, "details": None}
        out.append(f"data:{json.dumps(ev, ensure_ascii=False)}\n\n".encode())
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


TEXTS = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=6),
                 min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(texts=TEXTS, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_stream_reassembles_tokens_from_any_split(texts, cuts):
    wire = b"".join(tgi_events(texts))
    parts = split_at(wire, cuts)
    assert b"".join(parts) == wire
    events = list(invoke.iter_events(parts))
    assert [e["token"]["text"] for e in events] == texts
    assert "".join(invoke.event_text(e) for e in events) == "".join(texts)


@settings(max_examples=100, deadline=None)
@given(text=st.text(min_size=1, max_size=40).filter(lambda s: "\n" not in s and "\r" not in s
                                                     and not any("\ud800" <= c <= "\udfff" for c in s)),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_lines_survive_cuts_inside_multibyte_characters(text, cuts):
    wire = (text + "\n" + text + "\r\n").encode()
    assert list(invoke.iter_lines(split_at(wire, cuts))) == [text, text]


def test_split_inside_one_character_byte_by_byte():
    wire = "data:{\"token\":{\"text\":\"😀é\"}}\n\n".encode()
    events = list(invoke.iter_events([wire[i:i + 1] for i in range(len(wire))]))
    assert events == [{"token": {"text": "😀é"}}]


def test_truncated_character_at_end_is_an_error():
    with pytest.raises(UnicodeDecodeError):
        list(invoke.iter_lines([b"ok\n", "😀".encode()[:2]]))


def test_sse_multiline_data_comments_and_done():
    lines = [": keep-alive", "event: message", "data: {\"a\":", "data: 1}", "", "data: [DONE]", "", "data: {}"]
    assert list(invoke.iter_sse(lines)) == ['{"a":\n1}', "[DONE]", "{}"]
    parts = [b": ping\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n", b"data: [DONE]\n\n",
             b"data: {\"never\": true}\n\n"]
    assert [invoke.event_text(e) for e in invoke.iter_events(parts)] == ["hi"]


def test_error_event_raises():
    parts = [*tgi_events(["a"]), b'data:{"error":"CUDA out of memory","error_type":"generation_error"}\n\n']
    it = invoke.iter_events(parts)
    assert next(it)["token"]["text"] == "a"
    with pytest.raises(invoke.InvokeError, match="generation_error: CUDA out of memory"):
        next(it)


def test_event_text_skips_special_tokens():
    assert invoke.event_text({"token": {"text": "<|end_of_text|>", "special": True}}) == ""
    assert invoke.event_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert invoke.event_text({"choices": [{"text": "x", "index": 0}]}) == "x"


@pytest.mark.parametrize("kind,fields", [
    ("ModelStreamError", {"Message": "boom", "ErrorCode": "E1"}),
    ("InternalStreamFailure", {"Message": "down"}),
])
def test_payload_parts_raise_invoke_error_on_stream_errors(kind, fields):
    # botocore's real EventStream parser fed real frames: it raises EventStreamError for exception
    # events (it never yields a dict with that key); the caller sees InvokeError, after the good parts.
    stream = payload_event_stream([b"data:1\n\n", b"data:2\n\n"], error=(kind, fields))
    seen = []
    with pytest.raises(invoke.InvokeError) as info:
        for part in invoke.payload_parts(stream):
            seen.append(part)
    assert b"".join(seen) == b"data:1\n\ndata:2\n\n"
    assert kind in str(info.value) and fields["Message"] in str(info.value)


def test_cli_prints_a_stream_error_alone_and_exits_non_zero(monkeypatch, capsys):
    def failing(*a, **kw):
        raise invoke.InvokeError(None, "ModelStreamError: boom")
        yield  # a generator, like the real stream

    monkeypatch.setattr(invoke, "stream_text", failing)
    code = invoke.main(["--url", "http://127.0.0.1:9", "--stream"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: ModelStreamError: boom"


def _body(obj) -> StreamingBody:
    raw = json.dumps(obj).encode()
    return StreamingBody(io.BytesIO(raw), len(raw))


def test_generate_and_chat_through_invoke_endpoint():
    rt = client("sagemaker-runtime")
    target = invoke.EndpointTarget(rt, EP, custom_attributes="trace=1")
    answer = [{"generated_text": "hi", "details": {"generated_tokens": 1, "finish_reason": "length"}}]
    chat_answer = {"choices": [{"message": {"role": "assistant", "content": "yo"}}], "usage": {"total_tokens": 3}}
    with Stubber(rt) as stub:
        stub.add_response("invoke_endpoint", {"Body": _body(answer), "ContentType": "application/json"}, {
            "EndpointName": EP, "ContentType": "application/json", "Accept": "application/json",
            "CustomAttributes": "trace=1",
            "Body": json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": 4, "details": True}}).encode()})
        msgs = [{"role": "user", "content": "Hi"}]
        stub.add_response("invoke_endpoint", {"Body": _body(chat_answer), "ContentType": "application/json"}, {
            "EndpointName": EP, "ContentType": "application/json", "Accept": "application/json",
            "CustomAttributes": "trace=1", "Body": json.dumps({"messages": msgs, "max_tokens": 8}).encode()})
        assert invoke.generate(target, "Hello", max_new_tokens=4, details=True) == answer
        assert invoke.chat(target, msgs, max_tokens=8) == chat_answer
        stub.assert_no_pending_responses()


def test_jsonlines_request_and_model_error():
    rt = client("sagemaker-runtime")
    target = invoke.endpoint(EP, runtime=rt)
    records = [{"inputs": "a"}, {"messages": [{"role": "user", "content": "b"}]}]
    out_lines = [{"generated_text": "x"}, {"error": "bad", "error_type": "validation", "status": 422}]
    out = "".join(json.dumps(x) + "\n" for x in out_lines).encode()
    with Stubber(rt) as stub:
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(out), len(out)),
                                              "ContentType": "application/jsonlines"},
                          {"EndpointName": EP, "ContentType": "application/jsonlines",
                           "Accept": "application/jsonlines",
                           "Body": b'{"inputs": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n'})
        stub.add_client_error("invoke_endpoint", service_error_code="ModelError", http_status_code=424,
                              service_message="Received client error (422) from primary",
                              modeled_fields={"OriginalStatusCode": 422,
                                              "OriginalMessage": '{"error":"max_new_tokens must be >= 1"}'})
        assert invoke.invoke_jsonlines(target, records) == out_lines
        with pytest.raises(invoke.InvokeError) as info:
            invoke.generate(target, "x", max_new_tokens=0)
        assert info.value.status == 422 and "max_new_tokens" in info.value.body


def test_stream_through_invoke_endpoint_with_response_stream(capsys):
    """Request checked by the Stubber; the response is a real botocore EventStream decoded from the
    binary framing, its PayloadParts cut mid-event and mid-character."""
    rt = client("sagemaker-runtime")
    texts = ["Gra", "nite ", "😀", "é!"]
    wire = b"".join(tgi_events(texts))
    cut = wire.index("😀".encode()) + 2  # inside the emoji
    parts = [wire[:5], wire[5:cut], wire[cut:cut + 3], wire[cut + 3:]]
    rt.meta.events.register("after-call.sagemaker-runtime.InvokeEndpointWithResponseStream",
                            lambda parsed, **_: parsed.__setitem__("Body", payload_event_stream(parts)))
    payload = {"inputs": "Hi", "parameters": {"max_new_tokens": 4}}
    with Stubber(rt) as stub:
        stub.add_response("invoke_endpoint_with_response_stream",
                          {"Body": {}, "ContentType": "text/event-stream"},
                          {"EndpointName": EP, "ContentType": "application/json", "Accept": "text/event-stream",
                           "Body": json.dumps({**payload, "stream": True}).encode()})
        text = invoke.print_stream(invoke.endpoint(EP, runtime=rt), payload)
    assert text == "".join(texts)
    assert capsys.readouterr().out == "".join(texts) + "\n"


def test_payload_from_args():
    p = invoke.build_parser()
    chat = invoke.payload_from_args(p.parse_args(["--url", "http://x", "--chat", "--system", "S", "--prompt", "P"]))
    assert chat["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "P"}]
    tgi = invoke.payload_from_args(p.parse_args(["--url", "http://x", "--temperature", "0.7"]))
    assert tgi["parameters"]["do_sample"] is True and tgi["parameters"]["temperature"] == 0.7
