import json

from model.types import Completion, FinishReason, TokenEvent, TopToken
from serve import encoders as enc
from serve.protocol.toolcalls import ToolCallParser


def completion(text="hello", reason=FinishReason.LENGTH, n=2, prompt_tokens=3, tops=()):
    texts = tuple(text[i::n] for i in range(n)) if n else ()
    return Completion(token_ids=tuple(range(10, 10 + n)), text=text, finish_reason=reason, prompt_tokens=prompt_tokens,
                      logprobs=(-0.5,) * n, token_texts=texts, specials=(False,) * n,
                      top_tokens=tops or ((),) * n, seed=5)


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_sse_events_end_with_a_blank_line():
    assert enc.sse({"a": 1}) == b'data:{"a":1}\n\n'
    assert enc.sse({"a": 1}, openai=True) == b'data: {"a":1}\n\n'
    assert enc.DONE == b"data: [DONE]\n\n"


def test_tgi_item_details_always_have_counts():
    c = completion("ab", n=2)
    item = enc.tgi_item("prompt ", c, details=False, return_full_text=True)
    assert item["generated_text"] == "prompt ab"
    assert item["details"] == {"finish_reason": "length", "generated_tokens": 2, "prompt_tokens": 3,
                               "input_length": 3, "cached_tokens": 0, "seed": 5}
    full = enc.tgi_item("p", c, details=True, return_full_text=False)
    assert [t["id"] for t in full["details"]["tokens"]] == [10, 11] and full["details"]["prefill"] == []


def test_nan_logprobs_become_null():
    c = Completion((1,), "x", FinishReason.EOS, 1, (float("-inf"),), ("x",), (False,), ((),), None)
    item = enc.tgi_item("", c, details=True, return_full_text=False)
    assert item["details"]["tokens"][0]["logprob"] is None
    json.loads(enc.dumps(item))


def test_tgi_event_shape():
    ev = TokenEvent(7, "hi", -0.1, False, FinishReason.EOS, (TopToken(8, "yo", -1.0),))
    obj = json.loads(enc.tgi_event(3, ev, ("all hi", completion()), top_n=1)[5:])
    assert obj["index"] == 3 and obj["token"] == {"id": 7, "text": "hi", "logprob": -0.1, "special": False}
    assert obj["generated_text"] == "all hi" and obj["details"]["generated_tokens"] == 2
    assert obj["top_tokens"][0]["id"] == 8
    mid = json.loads(enc.tgi_event(0, TokenEvent(7, "hi", -0.1), None)[5:])
    assert mid["generated_text"] is None and mid["details"] is None


def test_chat_completion_parses_tool_calls_only_when_tools_were_given():
    c = completion("Let me check. " + CALL, reason=FinishReason.EOS)
    out = enc.chat_completion("id1", "m", 1, c, parse_calls=True, logprobs=False)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["message"]["content"] == "Let me check."
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    plain = enc.chat_completion("id1", "m", 1, c, parse_calls=False, logprobs=True)["choices"][0]
    assert plain["finish_reason"] == "stop" and "tool_calls" not in plain["message"]
    assert len(plain["logprobs"]["content"]) == 2


def test_parser_never_streams_tool_call_markup():
    p = ToolCallParser()
    pieces = ["Sure", " <tool", "_ca", "ll>\n{\"name\": \"f\", ", "\"arguments\": {}}\n</tool_call>"]
    deltas = [d for piece in pieces for d in p.push(piece)] + p.finish()
    assert "".join(d.get("content", "") for d in deltas) == "Sure"
    assert p.calls[0]["function"] == {"name": "f", "arguments": "{}"} and p.content == "Sure" and p.complete


def test_parser_releases_lookalikes():
    p = ToolCallParser()
    assert p.push("a <to") == [{"content": "a"}]
    assert p.push("y>") == [{"content": " <toy>"}]
    assert p.finish() == [] and p.calls == []


def test_completion_choice_offsets_and_echo():
    c = completion("abcd", n=2)  # token texts "ac", "bd"
    choice = enc.completion_choice(0, "P", c, echo=True, logprobs=0)
    assert choice["text"] == "Pabcd" and choice["logprobs"]["text_offset"] == [1, 3]
    assert choice["logprobs"]["top_logprobs"] is None
    assert enc.openai_finish(FinishReason.STOP) == "stop" and enc.openai_finish(FinishReason.LENGTH) == "length"


def test_dumps_escapes_unicode_line_breaks():
    s = enc.dumps({"t": "a\u2028b\u2029c\x85d"})
    assert len(s.splitlines()) == 1 and json.loads(s)["t"] == "a\u2028b\u2029c\x85d"
