"""Structured output from real clients against the server started the README's way (`python -m serve serve`,
the demo model). The demo weights are random: only the grammar makes an output valid, so every output is
parsed and validated (pydantic, jsonschema, a full regex match).

    OpenAI Python client   chat.completions.parse(response_format=Model), forced tools (pydantic_function_tool),
                           streamed JSON and streamed tool calls (concatenated == non-streamed), completions
    LangChain              ChatOpenAI.with_structured_output(Model, method="function_calling" | "json_schema")
    huggingface_hub        InferenceClient.text_generation(grammar=json | regex), streamed and not
    granite_sm + boto3     invoke and stream through a real sagemaker-runtime client (botocore serializes the
                           call and parses the response / event stream; its transport is this server)
    sessions               a forced call in a session's history, then its tool result: arguments intact
"""

from __future__ import annotations

import io
import json
import re
from typing import Literal

import jsonschema
import pytest
import requests
from pydantic import BaseModel, ConfigDict, Field

from tests.server_helpers import ServerProcess, iter_sse

pytestmark = pytest.mark.slow

ENV = {"MAX_CONCURRENT_SEQS": "8", "MAX_QUEUED_REQUESTS": "32", "MAX_INPUT_TOKENS": "1536",
       "MAX_TOTAL_TOKENS": "2048", "MAX_NEW_TOKENS": "512", "REQUEST_TIMEOUT": "600"}  # a loaded CI machine
MSGS = [{"role": "user", "content": "Plan a short trip: which city, how many days?"}]


class Closed(BaseModel):
    """additionalProperties false: a bounded schema has bounded output (an open object lets random weights
    write extra keys for ever, valid but never done)."""

    model_config = ConfigDict(extra="forbid")


class Trip(Closed):
    city: Literal["Paris", "Lima", "Tokyo"]
    days: int = Field(ge=1, le=14)
    tags: list[Literal["sun", "rain", "food"]] = Field(max_length=2)
    note: str = Field(max_length=12)


class GetWeather(Closed):
    """Weather in a city."""

    city: Literal["Paris", "Lima", "Tokyo"]
    unit: Literal["celsius", "fahrenheit"]


class GetTime(Closed):
    """Local time in a time zone."""

    zone: str = Field(max_length=10)


def tool(model: type[BaseModel]) -> dict:
    return {"type": "function", "function": {"name": model.__name__, "description": model.__doc__,
                                             "parameters": model.model_json_schema()}}


TOOLS = {t["function"]["name"]: t for t in (tool(GetWeather), tool(GetTime))}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    srv = ServerProcess({"MODEL_ID": "demo", "MODEL_CACHE_DIR": str(cache), "MODEL_DIR": str(cache), **ENV},
                        tmp_path_factory.mktemp("log") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def check_calls(calls, allowed=TOOLS):
    """Every call names a declared tool and its arguments validate against that tool's parameters."""
    assert calls
    for c in calls:
        assert c["type"] == "function" and c["id"]
        fn = c["function"]
        assert fn["name"] in allowed, fn["name"]
        args = json.loads(fn["arguments"])
        jsonschema.validate(args, allowed[fn["name"]]["function"]["parameters"])


# ---- OpenAI Python client ----

@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 1), (0.7, 3)])
def test_openai_parse_with_a_pydantic_model(oai, temperature, seed):
    done = oai.chat.completions.parse(model="demo", messages=MSGS, response_format=Trip, max_tokens=400,
                                      temperature=temperature, seed=seed)
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Trip)
    jsonschema.validate(json.loads(choice.message.content), Trip.model_json_schema())


def test_openai_streamed_json_equals_the_answer(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "Trip", "schema": Trip.model_json_schema()}}
    whole = oai.chat.completions.create(model="demo", messages=MSGS, response_format=fmt, max_tokens=400,
                                        temperature=0)
    text = "".join(ch.choices[0].delta.content or "" for ch in oai.chat.completions.create(
        model="demo", messages=MSGS, response_format=fmt, max_tokens=400, temperature=0, stream=True)
        if ch.choices)
    assert text == whole.choices[0].message.content
    Trip.model_validate_json(text)
    obj = oai.chat.completions.create(model="demo", messages=MSGS, response_format={"type": "json_object"},
                                      max_tokens=40, temperature=0)
    if obj.choices[0].finish_reason == "stop":  # an unbounded object may run to max_tokens; whole ones parse
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_openai_completions_response_format(oai):
    out = oai.completions.create(model="demo", prompt="A trip:", max_tokens=400, temperature=1.0, seed=5,
                                 extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                     "name": "Trip", "schema": Trip.model_json_schema()}}})
    assert out.choices[0].finish_reason == "stop"
    Trip.model_validate_json(out.choices[0].text)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "GetTime"}}])
def test_openai_forced_tool_call_streamed_and_not(server, oai, choice):
    body = dict(model="demo", messages=MSGS, tools=list(TOOLS.values()), tool_choice=choice,
                parallel_tool_calls=False, max_tokens=400, temperature=0)
    done = oai.chat.completions.create(**body)
    c = done.choices[0]
    assert c.finish_reason == "tool_calls"
    calls = [tc.model_dump() for tc in c.message.tool_calls]
    check_calls(calls, TOOLS if choice == "required" else {"GetTime": TOOLS["GetTime"]})
    assert len(calls) == 1  # parallel_tool_calls false
    # streamed: name on the first delta of each call, then argument pieces; the pieces add up to the answer
    r = requests.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=600)
    assert r.status_code == 200
    events = [json.loads(e) for e in iter_sse(r) if e != "[DONE]"]
    streamed: dict[int, dict] = {}
    pieces = 0
    for ev in events:
        for tc in ev["choices"][0]["delta"].get("tool_calls", []):
            if tc["index"] not in streamed:
                streamed[tc["index"]] = {"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]}
            else:
                assert "name" not in tc["function"]
                streamed[tc["index"]]["arguments"] += tc["function"]["arguments"]
                pieces += 1
    assert [streamed[i] for i in sorted(streamed)] == [{"name": x["function"]["name"],
                                                        "arguments": x["function"]["arguments"]} for x in calls]
    assert pieces > 1  # arguments arrive as they are generated, not one blob per call
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_parallel_tool_calls(oai):
    """Several calls, each whole one valid; the model decides how many, so max_tokens may cut the last one:
    then finish_reason is "length" and only that last call is incomplete."""
    done = oai.chat.completions.create(model="demo", messages=MSGS, tools=list(TOOLS.values()),
                                       tool_choice="required", max_tokens=120, temperature=1.0, seed=4)
    c = done.choices[0]
    calls = [tc.model_dump() for tc in c.message.tool_calls]
    assert c.finish_reason in ("tool_calls", "length")
    assert calls and all(x["function"]["name"] in TOOLS for x in calls)
    for whole in calls if c.finish_reason == "tool_calls" else calls[:-1]:
        check_calls([whole])
    if c.finish_reason == "length":  # the cut call: what was generated, not valid JSON yet
        with pytest.raises(ValueError):
            json.loads(calls[-1]["function"]["arguments"])


def test_openai_parse_with_pydantic_function_tools(oai):
    import openai

    done = oai.chat.completions.parse(model="demo", messages=MSGS, max_tokens=400, temperature=1.0, seed=11,
                                      tools=[openai.pydantic_function_tool(GetWeather),
                                             openai.pydantic_function_tool(GetTime)], tool_choice="required",
                                      parallel_tool_calls=False)
    calls = done.choices[0].message.tool_calls
    assert calls and all(isinstance(c.function.parsed_arguments, (GetWeather, GetTime)) for c in calls)


# ---- LangChain ----

@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_with_structured_output(server, method):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="demo", temperature=0, max_tokens=400,
                     max_retries=0, timeout=300)
    out = llm.with_structured_output(Trip, method=method).invoke("Plan a short trip.")
    assert isinstance(out, Trip)
    raw = llm.with_structured_output(GetWeather, method=method, include_raw=True).invoke("Weather in Lima?")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], GetWeather)


# ---- huggingface_hub (TGI shape on /invocations) ----

def test_huggingface_hub_text_generation_with_grammar(server):
    from huggingface_hub import InferenceClient

    hf = InferenceClient(model=server.url + "/invocations", timeout=300)
    schema = Trip.model_json_schema()
    text = hf.text_generation("A trip:", max_new_tokens=400, grammar={"type": "json", "value": schema})
    jsonschema.validate(json.loads(text), schema)
    pattern = r"(yes|no), [0-9]{1,3} (apples|pears)"
    for seed in range(3):
        out = hf.text_generation("Answer:", max_new_tokens=64, do_sample=True, seed=seed, details=True,
                                 grammar={"type": "regex", "value": pattern})
        assert re.fullmatch(pattern, out.generated_text), out.generated_text
        assert out.details.finish_reason == "eos_token"
    streamed = "".join(hf.text_generation("Answer:", max_new_tokens=64, stream=True,
                                          grammar={"type": "regex", "value": pattern}))
    assert re.fullmatch(pattern, streamed)


def test_jsonlines_records_each_match_their_grammar(server):
    records = [{"inputs": f"record {i}", "parameters": {"max_new_tokens": 64, "do_sample": True, "seed": i,
                                                        "grammar": {"type": "regex", "value": "[a-f]{2,6}"}}}
               for i in range(4)]
    records.append({"inputs": "free text", "parameters": {"max_new_tokens": 4}})
    r = server.post("/invocations", "".join(json.dumps(x) + "\n" for x in records),
                    content_type="application/jsonlines", headers={"Accept": "application/jsonlines"})
    assert r.status_code == 200
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert all(re.fullmatch("[a-f]{2,6}", x["generated_text"]) for x in lines[:4])
    assert lines[4]["details"]["generated_tokens"] == 4


# ---- code/granite_sm through a real boto3 sagemaker-runtime client ----

def runtime_for(url: str):
    """A boto3 sagemaker-runtime client whose transport is the local server: botocore serializes each call,
    the handler sends it to /invocations and answers as SageMaker would (the body; the stream as PayloadPart
    event-stream messages; a container error as ModelError with its original status and message)."""
    from botocore.awsrequest import AWSResponse

    from tests.sdk_helpers import client, encode_event

    rt = client("sagemaker-runtime")

    class _Raw(io.BytesIO):  # what botocore reads a response from: read() (a body) or stream() (an event stream)
        def __init__(self, parts: list[bytes]) -> None:
            super().__init__(b"".join(parts))
            self.parts = parts

        def stream(self, **kwargs):
            yield from self.parts

    def send(request, **kwargs):
        stream = request.url.endswith("/invocations-response-stream")
        headers = {"Content-Type": request.headers["Content-Type"].decode()
                   if isinstance(request.headers["Content-Type"], bytes) else request.headers["Content-Type"]}
        r = requests.post(url + "/invocations", data=request.body, headers=headers, stream=stream, timeout=300)
        if r.status_code >= 400:
            body = json.dumps({"ErrorCode": "CLIENT_ERROR_FROM_MODEL", "Message": "model error",
                               "OriginalStatusCode": r.status_code, "OriginalMessage": r.text}).encode()
            return AWSResponse(request.url, 424, {"x-amzn-ErrorType": "ModelError:", "Content-Type":
                                                  "application/json"}, _Raw([body]))
        if stream:
            frames = [encode_event("PayloadPart", part) for part in r.iter_content(chunk_size=None) if part]
            return AWSResponse(request.url, 200, {"Content-Type": "application/vnd.amazon.eventstream",
                                                  "X-Amzn-SageMaker-Content-Type": "text/event-stream"}, _Raw(frames))
        return AWSResponse(request.url, 200, {"Content-Type": r.headers["Content-Type"]}, _Raw([r.content]))

    rt.meta.events.register("before-send.sagemaker-runtime.*", send)
    return rt


def test_granite_sm_invoke_and_stream_with_boto3(server):
    from tests.sdk_helpers import load

    invoke = load("invoke")
    target = invoke.endpoint("granite-demo", runtime=runtime_for(server.url))
    out = invoke.chat(target, MSGS, max_tokens=400, temperature=0,
                      response_format={"type": "json_schema", "json_schema": {"name": "Trip",
                                                                              "schema": Trip.model_json_schema()}})
    Trip.model_validate_json(out["choices"][0]["message"]["content"])
    out = invoke.chat(target, MSGS, max_tokens=400, temperature=0, tools=list(TOOLS.values()),
                      tool_choice="required")
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    check_calls(out["choices"][0]["message"]["tool_calls"])
    (item,) = invoke.generate(target, "Answer:", max_new_tokens=64,
                              grammar={"type": "regex", "value": "(yes|no)!{1,3}"})
    assert re.fullmatch("(yes|no)!{1,3}", item["generated_text"])
    # streamed: TGI events with a grammar, and OpenAI chunks of a forced call
    text = "".join(invoke.stream_text(target, {"inputs": "A trip:", "parameters": {
        "max_new_tokens": 400, "grammar": {"type": "json", "value": Trip.model_json_schema()}}}))
    Trip.model_validate_json(text)
    args = "".join(tc["function"]["arguments"] for ev in invoke.stream_events(target, {
        "messages": MSGS, "max_tokens": 400, "temperature": 0, "tools": [TOOLS["GetWeather"]],
        "tool_choice": {"type": "function", "function": {"name": "GetWeather"}}, "parallel_tool_calls": False})
        for tc in ev["choices"][0]["delta"].get("tool_calls", []) if ev["choices"])
    GetWeather.model_validate_json(args)
    with pytest.raises(invoke.InvokeError) as err:  # a bad grammar: the container's 422 with its message
        invoke.generate(target, "x", grammar={"type": "lark", "value": "start: x"})
    assert err.value.status == 422 and "parameters.grammar.type" in err.value.body


# ---- a call in the history, through a session turn ----

def test_a_forced_call_round_trips_through_a_session(server):
    sid_header = "X-Amzn-SageMaker-Session-Id"
    r = server.post("/invocations", {"requestType": "NEW_SESSION"}, headers={sid_header: "NEW_SESSION"})
    sid = r.headers["X-Amzn-SageMaker-New-Session-Id"].split(";")[0]
    body = {"messages": MSGS, "tools": [TOOLS["GetWeather"]], "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 200, "temperature": 0}
    first = server.post("/invocations", body, headers={sid_header: sid}).json()
    (call,) = first["choices"][0]["message"]["tool_calls"]
    check_calls([call])
    result = {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}
    follow = {"messages": [result], "tools": [TOOLS["GetWeather"]], "tool_choice": "none", "max_tokens": 3,
              "temperature": 0}
    in_session = server.post("/invocations", follow, headers={sid_header: sid}).json()
    # the same conversation sent whole by a client (arguments as the JSON string it received): same prompt
    history = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [call]}, result]
    whole = server.post("/invocations", {**follow, "messages": history}).json()
    assert in_session["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert in_session["choices"][0]["message"] == whole["choices"][0]["message"]
    # and the client resending the whole history inside the session is not taken twice
    again = server.post("/invocations", {**follow, "messages": [*history, in_session["choices"][0]["message"],
                                                                 {"role": "user", "content": "thanks"}]},
                        headers={sid_header: sid}).json()
    alone = server.post("/invocations", {**follow, "messages": [*history, in_session["choices"][0]["message"],
                                                                 {"role": "user", "content": "thanks"}]}).json()
    assert again["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]
    server.post("/invocations", {"requestType": "CLOSE"}, headers={sid_header: sid})
