"""n, best_of and session forks through the Flask app and the real engine on the tiny checkpoint: the OpenAI and
TGI shapes (choices by index, streamed rows with their index, usage over every row, best by cumulative
logprob, details.best_of_sequences), a session fork that leaves the conversation as it was, 422s naming the
field; every slot and KV block free afterwards."""

from __future__ import annotations

import json

import pytest

from tests.fakes import wait_free
from tests.serve.test_app import sse_events
from tests.serve.test_session_route import SID, _open
from tests.server_helpers import ready_app

ENV = {"MAX_CONCURRENT_SEQS": "6", "MAX_QUEUED_REQUESTS": "16", "MAX_INPUT_TOKENS": "500", "MAX_TOTAL_TOKENS": "600",
       "MAX_NEW_TOKENS": "6", "DEVICE": "cpu", "MAX_N": "5"}
MSGS = [{"role": "user", "content": "tell me about state space models"}]


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    app, client, engine = ready_app(tiny_ckpt, ENV)
    yield app, client, engine
    engine.shutdown(timeout=5)


@pytest.fixture(autouse=True)
def pool_freed(served):
    yield
    stats = wait_free(served[2])
    assert stats["kv_blocks_free"] + served[2].stats()["prefix_cache"]["kv_blocks_held"] == stats["kv_blocks_total"]


def post(client, path, body, headers=None, status=200):
    r = client.post(path, json=body, headers=headers or {})
    assert r.status_code == status, r.get_data(as_text=True)
    return r


def test_chat_n_greedy_rows_equal_one_answer(served):
    _, client, _ = served
    one = post(client, "/v1/chat/completions", {"messages": MSGS, "temperature": 0}).get_json()
    many = post(client, "/v1/chat/completions", {"messages": MSGS, "temperature": 0, "n": 3}).get_json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert all(c["message"] == one["choices"][0]["message"] for c in many["choices"])
    assert many["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counted once
    assert many["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]


def test_chat_n_streamed_rows_carry_their_index(served):
    _, client, _ = served
    body = {"messages": MSGS, "temperature": 0.9, "seed": 11, "n": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse_events(post(client, "/v1/chat/completions", body).data)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    text, finish = {0: "", 1: "", 2: ""}, {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        text[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    assert sorted(finish) == [0, 1, 2]
    usage = chunks[-1]["usage"]
    # the same request unstreamed: the same rows (seed + i each), in the same order
    plain = post(client, "/v1/chat/completions", {**body, "stream": False}).get_json()
    assert [c["message"]["content"] for c in plain["choices"]] == [text[0], text[1], text[2]]
    assert usage["completion_tokens"] == plain["usage"]["completion_tokens"]


def test_completions_best_of_returns_the_best_rows(served):
    _, client, _ = served
    body = {"prompt": "the state of a mamba layer", "temperature": 1.2, "seed": 5, "logprobs": 0, "max_tokens": 5}
    every = post(client, "/v1/completions", {**body, "n": 4}).get_json()["choices"]
    best = post(client, "/v1/completions", {**body, "n": 2, "best_of": 4}).get_json()
    score = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in every}
    ranked = sorted(every, key=lambda c: -score[c["text"]])
    assert [c["text"] for c in best["choices"]] == [c["text"] for c in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert best["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in every)  # all 4 rows


def test_completions_n_per_prompt_indexes(served):
    _, client, _ = served
    out = post(client, "/v1/completions", {"prompt": ["a b c", "x y"], "n": 2, "temperature": 0}).get_json()
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3] and texts[0] == texts[1] and texts[2] == texts[3]


def test_tgi_best_of(served):
    _, client, _ = served
    body = {"inputs": "the state of a mamba layer", "parameters": {"best_of": 3, "do_sample": True, "seed": 2,
                                                                   "details": True, "max_new_tokens": 5}}
    (item,) = post(client, "/invocations", {**body, "inputs": [body["inputs"]]}).get_json()
    others = item["details"]["best_of_sequences"]
    assert len(others) == 2 and all({"generated_text", "tokens", "seed", "finish_reason"} <= set(o) for o in others)
    mine = sum(t["logprob"] for t in item["details"]["tokens"])
    assert all(mine >= sum(t["logprob"] for t in o["tokens"]) for o in others)
    assert len({item["details"]["seed"], *(o["seed"] for o in others)}) == 3  # a seed stream per row


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/chat/completions", {"messages": MSGS, "n": 6}, "n must be between 1 and 5"),
    ("/v1/completions", {"prompt": "a", "n": 3, "best_of": 2}, "best_of (2) must be >= n (3)"),
    ("/v1/completions", {"prompt": "a", "best_of": 2, "stream": True}, "best_of > 1 cannot be streamed"),
    ("/invocations", {"inputs": "a", "parameters": {"best_of": 2}}, "needs sampling"),
])
def test_bad_rows_are_422_naming_the_field(served, path, body, needle):
    _, client, _ = served
    assert needle in post(client, path, body, status=422).get_json()["error"]


def test_session_fork_leaves_the_conversation_unchanged(served):
    _, client, engine = served
    sid, _ = _open(client)
    first = post(client, "/invocations", {"messages": MSGS, "temperature": 0, "max_tokens": 4}, {SID: sid}).get_json()
    conv = engine.session_conversation(sid)
    follow = [{"role": "user", "content": "and attention?"}]
    forked = post(client, "/invocations", {"messages": follow, "temperature": 0.8, "seed": 1, "n": 2, "fork": True,
                                           "max_tokens": 4}, {SID: sid}).get_json()
    assert [c["index"] for c in forked["choices"]] == [0, 1]
    assert forked["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # from the session's state
    assert engine.session_conversation(sid) == conv  # not advanced
    refused = post(client, "/invocations", {"messages": follow, "n": 2}, {SID: sid}, status=400).get_json()
    assert "fork" in refused["error"]
    turn = post(client, "/invocations", {"messages": follow, "temperature": 0, "max_tokens": 4}, {SID: sid}).get_json()
    whole = MSGS + [first["choices"][0]["message"], *follow]
    alone = post(client, "/v1/chat/completions", {"messages": whole, "temperature": 0, "max_tokens": 4}).get_json()
    assert turn["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    assert engine.session_conversation(sid) != conv
    bad = post(client, "/invocations", {"messages": follow, "fork": "yes"}, {SID: sid}, status=422).get_json()
    assert "fork" in bad["error"]
    post(client, "/invocations", {"requestType": "CLOSE"}, {SID: sid})
