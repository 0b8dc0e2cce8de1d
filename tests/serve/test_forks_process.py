"""n and best_of through the whole server (`python -m serve serve`, gunicorn) with the openai Python client:
choices by index, streamed rows reassembled by their index, best_of choices; the client parses every shape."""

from __future__ import annotations

import pytest

from tests.server_helpers import ServerProcess

pytestmark = pytest.mark.slow  # a real gunicorn process + model load


@pytest.fixture(scope="module")
def client(tiny_ckpt, tmp_path_factory):
    openai = pytest.importorskip("openai")  # in the lock (dev deps): present in every test environment
    srv = ServerProcess({"MODEL_DIR": str(tiny_ckpt), "MAX_CONCURRENT_SEQS": "8", "MAX_INPUT_TOKENS": "256",
                         "MAX_TOTAL_TOKENS": "512", "MAX_NEW_TOKENS": "6"},
                        tmp_path_factory.mktemp("log") / "server.log")
    srv.wait_ready()
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    srv.stop()


MSGS = [{"role": "user", "content": "name three state space models"}]


def test_chat_n(client):
    r = client.chat.completions.create(model="m", messages=MSGS, n=3, temperature=0.9, seed=4, max_tokens=6,
                                       logprobs=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # each row its own seed stream
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)  # every row's tokens
    stream = client.chat.completions.create(model="m", messages=MSGS, n=3, temperature=0.9, seed=4, max_tokens=6,
                                            stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = ["", "", ""], {}, None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert texts == [c.message.content for c in r.choices] and sorted(finishes) == [0, 1, 2]
    assert usage.completion_tokens == r.usage.completion_tokens


def test_completions_best_of(client):
    every = client.completions.create(model="m", prompt="the mamba layer", n=4, temperature=1.0, seed=9,
                                      max_tokens=5, logprobs=0)
    best = client.completions.create(model="m", prompt="the mamba layer", n=1, best_of=4, temperature=1.0, seed=9,
                                     max_tokens=5, logprobs=0)
    top = max(every.choices, key=lambda c: sum(c.logprobs.token_logprobs))
    assert [c.text for c in best.choices] == [top.text]


def test_bad_n_is_422(client):
    import openai

    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="m", messages=MSGS, n=99)
    assert "n must be between" in e.value.response.json()["error"]
