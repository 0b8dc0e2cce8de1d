"""Model resolution + engine construction (serve/engine_setup.py) through the app: the context limits
default to the checkpoint's max_position_embeddings, and a KV pool that cannot hold one full-length
sequence refuses to start, naming the variables."""

import json
import shutil
import time

import pytest

from model.text.tokenizer import Tokenizer
from serve.app import create_app
from serve.config import load_config

# The checkpoint's max_position_embeddings. The old main ignored it (fixed 8,192 input / 16,384 total);
# a small context keeps the long prefill below cheap on CPU, the rule is the same at 131,072.
CONTEXT = 1500


@pytest.fixture(scope="module")
def long_ckpt(ckpt_factory, tmp_path_factory):
    src = ckpt_factory("tiny", max_position_embeddings=CONTEXT)
    out = tmp_path_factory.mktemp("long") / "model"
    shutil.copytree(src, out)
    # A tokenizer whose model_max_length is below what the server allows (real checkpoints often say less
    # than the model can do): its "longer than the specified maximum" warning must not reach the log.
    tc = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**tc, "model_max_length": 512}))
    return out


def _ready(client, timeout=120.0):
    deadline = time.monotonic() + timeout
    while (r := client.get("/ping")).status_code != 200:
        if "error" in (r.get_json() or {}) and "loading" not in r.get_json()["error"]:
            return r
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return r


def test_limits_default_to_the_checkpoint_context(long_ckpt, capfd):
    cfg = load_config({"MODEL_DIR": str(long_ckpt), "DEVICE": "cpu", "MAX_CONCURRENT_SEQS": "2"})
    app = create_app(cfg)
    state = app.extensions["granite"]
    client = app.test_client()
    try:
        assert _ready(client).status_code == 200, state.error
        engine = state.engine
        assert (engine.config.max_total_tokens, engine.config.max_input_tokens) == (CONTEXT, CONTEXT - 1)
        tok = Tokenizer.from_dir(long_ckpt)  # not the server's: transformers warns once per tokenizer
        words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor ".split()
        def text(k):
            return " ".join(words[i % len(words)] for i in range(k))

        per_word = len(tok.encode(text(1000))) / 1000
        doc = text(int(1300 / per_word))
        n = len(tok.encode(doc))
        assert 1200 <= n < CONTEXT - 1, n
        capfd.readouterr()
        r = client.post("/invocations", json={"inputs": doc, "parameters": {"max_new_tokens": 1}})
        assert r.status_code == 200, r.data
        assert r.get_json()[0]["details"]["prompt_tokens"] == n
        assert "longer than the specified maximum" not in "".join(capfd.readouterr())
        too_long = doc + " " + doc[: len(doc) // 2]
        r = client.post("/invocations", json={"inputs": too_long, "parameters": {"max_new_tokens": 1}})
        assert r.status_code == 422 and f"max_input_tokens={CONTEXT - 1}" in r.get_json()["error"]  # 200 before
        r = client.post("/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": CONTEXT}})
        assert r.status_code == 422 and "max_new_tokens" in r.get_json()["error"]
    finally:
        state.shutdown(timeout=5)


def test_a_kv_pool_too_small_for_one_sequence_refuses_to_start(long_ckpt):
    cfg = load_config({"MODEL_DIR": str(long_ckpt), "DEVICE": "cpu", "KV_CACHE_TOKENS": "1000"})
    app = create_app(cfg)
    r = _ready(app.test_client())
    assert r.status_code == 503
    msg = r.get_json()["error"]
    assert "KV_CACHE_TOKENS=1000" in msg and f"MAX_TOTAL_TOKENS={CONTEXT}" in msg, msg
    assert app.extensions["granite"].engine is None  # refused before any weight was loaded
