"""Stream encoders in serve/generate.py driven by scripted token events (the real engine cannot be made
to emit a tool call or fail on cue; the app/process tests cover the engine-backed paths)."""

import json

from model.types import Completion, FailureKind, FinishReason, SamplingParams, TokenEvent
from serve import generate
from serve.generate import Ctx, GenerationFailed
from serve.metrics import Metrics
from serve.protocol import ChatRequest, TextRequest


class ScriptedHandle:
    """Plays a fixed list of TokenEvents through the Handle interface the engine returns."""

    def __init__(self, events):
        self.events = events
        self.prompt_tokens = 5
        self.cached_tokens = 2
        self.finished = False
        self.cancelled = 0

    def __iter__(self):
        for ev in self.events:
            self.finished = ev.finish_reason is not None
            yield ev

    def cancel(self):
        self.cancelled += 1

    def result(self):
        toks = [e for e in self.events if e.token_id >= 0]
        return Completion(tuple(e.token_id for e in toks), "".join(e.text for e in self.events),
                          self.events[-1].finish_reason, 5, tuple(e.logprob for e in toks),
                          tuple(e.text for e in toks), (False,) * len(toks), ((),) * len(toks), None)


def events(*texts, end=FinishReason.EOS):
    evs = [TokenEvent(i, t, -0.1) for i, t in enumerate(texts)]
    evs[-1] = TokenEvent(len(texts) - 1, texts[-1], -0.1, finish_reason=end)
    return evs


def chunks(body):
    raw = b"".join(body).decode()
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data:") for e in events)
    return [e[len("data:"):].lstrip() for e in events]


def chat(tools=None, **kw):
    return ChatRequest(messages=({"role": "user", "content": "x"},), params=SamplingParams(), tools=tools, **kw)


CTX = Ctx(engine=None, model_name="m", metrics=Metrics())
TOOLS = ({"type": "function", "function": {"name": "get_weather"}},)


def test_chat_stream_turns_tool_call_markup_into_tool_calls():
    h = ScriptedHandle(events("Checking", " <tool_", "call>\n{\"name\": \"get_weather\", ",
                              "\"arguments\": {\"city\": \"Oslo\"}}\n", "</tool_call>"))
    out = chunks(generate._guarded(CTX, [h], generate.stream_body(CTX, chat(TOOLS, calls=True, include_usage=True),
                                                                  [h])))
    assert out[-1] == "[DONE]"
    objs = [json.loads(x) for x in out[:-1]]
    content = "".join(o["choices"][0]["delta"].get("content", "") for o in objs if o["choices"])
    assert content == "Checking" and "<tool" not in content  # whitespace next to a call is not content
    calls = [o["choices"][0]["delta"]["tool_calls"] for o in objs if o["choices"] and "tool_calls" in
             o["choices"][0]["delta"]]
    assert calls[0][0]["index"] == 0 and calls[0][0]["function"]["name"] == "get_weather"
    assert all(len(c) == 1 and c[0]["index"] == 0 for c in calls) and calls[0][0]["id"].startswith("call_")
    assert json.loads("".join(c[0]["function"]["arguments"] for c in calls)) == {"city": "Oslo"}
    assert objs[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert objs[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
                                 "prompt_tokens_details": {"cached_tokens": 2}}


def test_chat_stream_without_tools_streams_markup_as_text():
    h = ScriptedHandle(events("a", "<tool_call>", "b"))
    out = chunks(generate.stream_body(CTX, chat(), [h]))
    objs = [json.loads(x) for x in out[:-1]]
    assert "".join(o["choices"][0]["delta"].get("content", "") for o in objs) == "a<tool_call>b"
    assert objs[-1]["choices"][0]["finish_reason"] == "stop"


def test_failed_sequence_ends_the_stream_with_an_error_event():
    h = ScriptedHandle([TokenEvent(1, "a", -0.1),
                        TokenEvent(-1, "", 0.0, finish_reason=FinishReason.ERROR, error="CUDA out of memory")])
    req = TextRequest(inputs=("p",), params=SamplingParams(), stream=True)
    out = chunks(generate.stream_body(CTX, req, [h]))
    assert json.loads(out[0])["token"]["text"] == "a"
    err = json.loads(out[-1])
    assert err["error_type"] == "generation_error" and "out of memory" in err["error"]


def test_generation_failed_status_follows_the_failure_kind_not_the_message():
    assert GenerationFailed("anything", FailureKind.OUT_OF_MEMORY).status == 507
    assert GenerationFailed("anything", FailureKind.SHUTDOWN).status == 503
    assert GenerationFailed("CUDA out of memory (said by a user's model)", FailureKind.STEP_FAILED).status == 500
    assert GenerationFailed("no kind", None).status == 500


def test_closing_a_stream_early_cancels_the_handle():
    h = ScriptedHandle(events("a", "b", "c", end=FinishReason.LENGTH))
    h.finished = False
    body = generate._guarded(CTX, [h], generate.stream_body(CTX, chat(), [h]))
    next(body)
    body.close()  # what gunicorn does when the client has gone
    assert h.cancelled == 1
    assert CTX.metrics.registry.get_sample_value("granite_client_disconnects_total") == 1


def test_streamed_rows_interleave_by_index_and_end_together():
    a, b = ScriptedHandle(events("a1", "a2", "a3")), ScriptedHandle(events("b1", end=FinishReason.LENGTH))
    ttfts = CTX.metrics.registry.get_sample_value("granite_time_to_first_token_seconds_count") or 0
    out = chunks(generate.stream_body(CTX, chat(n=2, include_usage=True), [a, b]))
    assert CTX.metrics.registry.get_sample_value("granite_time_to_first_token_seconds_count") == ttfts + 2
    assert out[-1] == "[DONE]" and out.count("[DONE]") == 1
    objs = [json.loads(x) for x in out[:-1]]
    assert [o["choices"][0]["index"] for o in objs[:2]] == [0, 1]  # a role chunk per row first
    order = [(o["choices"][0]["index"], o["choices"][0]["delta"].get("content"), o["choices"][0]["finish_reason"])
             for o in objs[2:-1]]
    assert order == [(0, "a1", None), (1, "b1", None), (1, None, "length"), (0, "a2", None), (0, "a3", None),
                     (0, None, "stop")]
    assert objs[-1]["usage"]["completion_tokens"] == 4 and objs[-1]["choices"] == []  # every row's tokens


def test_a_row_that_fails_ends_the_stream_and_cancels_the_others():
    bad = [TokenEvent(0, "x", -0.1), TokenEvent(-1, "", 0.0, finish_reason=FinishReason.ERROR, error="boom",
                                                  failure=FailureKind.STEP_FAILED)]
    a, b = ScriptedHandle(events("a1", "a2", "a3")), ScriptedHandle(bad)
    out = chunks(generate._guarded(CTX, [a, b], generate.stream_body(CTX, chat(n=2), [a, b])))
    assert "boom" in out[-2] and out[-1] == "[DONE]"
    assert a.cancelled == 1 and b.cancelled == 1
