"""LoRA adapters through the HTTP routes (serve/adapters.py, serve/adapter_src.py) with the real engine on the tiny
checkpoint: POST /adapters (JSON body or query parameters, local folder, .tar.gz, s3:// with moto), DELETE, GET,
/v1/models; a request's adapter by the SageMaker header, TGI adapter_id, OpenAI model, JSON Lines records; errors
404 / 409 / 400 with the reason; start-up discovery; two workers sharing the on-disk registry; signed adapters."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from model.checkpoint.signing import SignaturePolicy
from model.types import GenerationRequest, SamplingParams
from serve.adapters import ADAPTER_HEADER, AdapterRegistry
from serve.config import AdapterConfig
from tests.fakes import ENGINES, check_pools_and_shut_down, real_engine
from tests.lora_helpers import ALL_TARGETS, greedy, make_adapter, peft_model
from tests.server_helpers import ready_app

NEW = 6


@pytest.fixture(scope="module")
def root(tiny_ckpt, tmp_path_factory):
    """A folder holding adapters: fr (every target), de (attention + Mamba), big (rank 16 > MAX_LORA_RANK), and a
    model dir whose adapters/ja is found at start."""
    r = tmp_path_factory.mktemp("adroot")
    make_adapter(tiny_ckpt, r / "fr", seed=1, r=4, lora_alpha=8, target_modules=ALL_TARGETS)
    make_adapter(tiny_ckpt, r / "de", seed=2, r=2, lora_alpha=4, target_modules=["q_proj", "in_proj", "out_proj"])
    make_adapter(tiny_ckpt, r / "big", seed=3, r=16, lora_alpha=16, target_modules=["q_proj"])
    make_adapter(tiny_ckpt, r / "model" / "adapters" / "ja", seed=4, r=2, lora_alpha=2, target_modules=ALL_TARGETS)
    return r


def _env(root, **kw):
    return {"MAX_CONCURRENT_SEQS": "4", "MAX_INPUT_TOKENS": "200", "MAX_TOTAL_TOKENS": "300", "MAX_NEW_TOKENS": str(NEW),
            "DEVICE": "cpu", "MAX_LORAS": "2", "MAX_LORA_RANK": "8", "ADAPTER_SRC_ROOTS": str(root),
            "MODEL_DIR": str(root / "model"), "MODEL_CACHE_DIR": str(root / "cache"),
            "ADAPTER_REGISTRY_DIR": str(root / f"registry-{len(kw)}-{sorted(kw)}"), **kw}


@pytest.fixture(scope="module")
def served(tiny_ckpt, root):
    app, client, engine = ready_app(tiny_ckpt, _env(root))
    yield client, engine
    engine.shutdown(5)


def _tokens(client, body, headers=None, path="/invocations"):
    r = client.post(path, json=body, headers=headers or {})
    assert r.status_code == 200, r.data
    return r.get_json()


def _ids(client, prompt, **kw):
    body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW, "details": True, **kw.pop("params", {})}}
    (item,) = _tokens(client, body, **kw)
    return [t["id"] for t in item["details"]["tokens"]]


def test_lifecycle_selection_and_errors(served, root, tiny_ckpt):
    client, engine = served
    assert [a["name"] for a in client.get("/adapters").get_json()["adapters"]] == ["ja"]  # found at start
    r = client.post("/adapters", json={"name": "fr", "src": str(root / "fr"), "preload": True})
    assert r.status_code == 200 and r.get_json()["message"] == "Adapter fr registered", r.data
    r = client.post("/adapters", json={"name": "fr", "src": str(root / "de")})
    assert r.status_code == 409 and "'fr'" in r.get_json()["error"]
    r = client.post(f"/adapters?name=de&src={root / 'de'}&preload=true")  # the contract's query-parameter form
    assert r.status_code == 200, r.data
    ids = [m["id"] for m in client.get("/v1/models").get_json()["data"]]
    assert ids == ["tiny-test", "ja", "fr", "de"]

    prompt = "the quick brown fox"
    p_ids = engine.tokenizer.encode(prompt)
    ref = {n: greedy(peft_model(tiny_ckpt, root / n if n != "ja" else root / "model" / "adapters" / "ja"), p_ids, NEW)
           for n in ("fr", "de", "ja")}
    base = greedy(peft_model(tiny_ckpt, None), p_ids, NEW)
    assert ref["fr"] != base
    assert _ids(client, prompt) == base
    for n in ("fr", "de", "ja"):
        assert _ids(client, prompt, headers={ADAPTER_HEADER: n}) == ref[n], n
    assert _ids(client, prompt, params={"adapter_id": "fr"}) == ref["fr"]  # TGI
    comp = _tokens(client, {"model": "de", "prompt": prompt, "max_tokens": NEW, "temperature": 0}, path="/v1/completions")
    by_header = _tokens(client, {"prompt": prompt, "max_tokens": NEW, "temperature": 0}, {ADAPTER_HEADER: "de"}, "/v1/completions")
    base_comp = _tokens(client, {"prompt": prompt, "max_tokens": NEW, "temperature": 0}, path="/v1/completions")
    other = _tokens(client, {"model": "gpt-4o", "prompt": prompt, "max_tokens": NEW, "temperature": 0}, path="/v1/completions")
    text = [c["choices"][0]["text"] for c in (comp, by_header, base_comp, other)]
    assert text[0] == text[1] != text[2] == text[3], text  # `model` names an adapter; another `model` is the base
    lines = "\n".join(json.dumps(x) for x in [{"inputs": prompt, "parameters": {"adapter_id": "fr", "details": True}},
                                               {"inputs": prompt, "parameters": {"details": True}}])
    r = client.post("/invocations", data=lines, content_type="application/jsonlines")
    recs = [json.loads(x) for x in r.data.decode().splitlines()]
    assert [[t["id"] for t in x["details"]["tokens"]] for x in recs] == [ref["fr"], base]
    r = client.post("/invocations", json={"inputs": prompt, "stream": True, "parameters": {"max_new_tokens": NEW}},
                    headers={ADAPTER_HEADER: "ja"})
    events = [json.loads(e[5:]) for e in r.data.decode().strip().split("\n\n")]
    assert [e["token"]["id"] for e in events] == ref["ja"]

    r = client.post("/invocations", json={"inputs": prompt}, headers={ADAPTER_HEADER: "nope"})
    assert r.status_code == 404 and "'nope'" in r.get_json()["error"]
    r = client.post("/invocations", json={"inputs": prompt, "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 404
    r = client.post("/invocations", json={"inputs": prompt, "parameters": {"adapter_id": "de"}},
                    headers={ADAPTER_HEADER: "fr"})
    assert r.status_code == 400

    assert client.delete("/adapters/fr").status_code == 200
    r = client.post("/invocations", json={"inputs": prompt}, headers={ADAPTER_HEADER: "fr"})
    assert r.status_code == 404
    assert client.delete("/adapters/fr").status_code == 404
    assert [a["name"] for a in client.get("/adapters").get_json()["adapters"]] == ["ja", "de"]
    assert client.get("/ping").status_code == 200
    pool = engine.runner.adapters
    assert all(i == -1 for i in pool.slot_index) and all(e.holds == 0 for e in pool._entries.values())


def test_a_session_remembers_its_adapter(served, root):
    """Its first turn decides; later turns without the header run on it; naming another adapter is a 400; snapshots
    of the session's conversation are in the adapter's namespace (resumed: cached tokens on the second turn)."""
    from serve.sessions import NEW_SESSION, NEW_SESSION_HEADER, SESSION_HEADER

    client, engine = served
    body = {"inputs": "once upon a time", "parameters": {"max_new_tokens": NEW, "details": True}}
    r = client.post("/invocations", json=body, headers={SESSION_HEADER: NEW_SESSION, ADAPTER_HEADER: "ja"})
    assert r.status_code == 200, r.data
    sid = r.headers[NEW_SESSION_HEADER].split(";")[0].strip()
    r = client.post("/invocations", json={"inputs": " and then", "parameters": {"max_new_tokens": NEW, "details": True}},
                    headers={SESSION_HEADER: sid})
    assert r.status_code == 200 and r.get_json()[0]["details"]["cached_tokens"] > 0, r.data  # ja's snapshot resumed
    r = client.post("/invocations", json={"inputs": " more"}, headers={SESSION_HEADER: sid, ADAPTER_HEADER: "de"})
    assert r.status_code == 400 and "'ja'" in r.get_json()["error"]
    assert client.post("/invocations", json={"requestType": "CLOSE"}, headers={SESSION_HEADER: sid}).status_code == 200


@pytest.mark.parametrize("src, why", [
    ("relative/fr", "unsafe path"),
    ("{root}/fr/../fr", "unsafe path"),
    ("/etc", "outside the allowed folders"),
    ("{root}/missing", "not found"),
    ("http://example.com/a.tar.gz", "only local folders and s3://"),
    ("{root}/big", "exceeds MAX_LORA_RANK=8"),
    ("{root}", "no adapter_config.json"),
])
def test_bad_registrations_are_400_with_the_reason(served, root, src, why):
    client, _ = served
    r = client.post("/adapters", json={"name": "bad", "src": src.format(root=root)})
    assert r.status_code == 400 and why in r.get_json()["error"], r.data
    assert "bad" not in [a["name"] for a in client.get("/adapters").get_json()["adapters"]]


def test_bad_names_and_bodies(served, root):
    client, _ = served
    for body in ({"name": "../x", "src": str(root / "fr")}, {"name": "x"}, {"src": str(root / "fr")}, [1, 2]):
        r = client.post("/adapters", json=body)
        assert r.status_code == 400, body


def test_tar_gz_and_s3_sources(served, root, tmp_path, monkeypatch):
    client, _ = served
    arc = root / "pkg" / "adapter.tar.gz"
    arc.parent.mkdir(exist_ok=True)
    with tarfile.open(arc, "w:gz") as tar:
        for f in (root / "de").iterdir():
            tar.add(f, arcname=f.name)
    r = client.post("/adapters", json={"name": "de-tgz", "src": str(arc.parent)})  # a folder holding the archive
    assert r.status_code == 200, r.data
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="adapters-bucket")
        for f in (root / "fr").iterdir():
            s3.upload_file(str(f), "adapters-bucket", f"lora/fr/{f.name}")
        s3.upload_file(str(arc), "adapters-bucket", "lora/de/adapter.tar.gz")
        assert client.post("/adapters", json={"name": "fr-s3", "src": "s3://adapters-bucket/lora/fr/"}).status_code == 200
        r = client.post("/adapters", json={"name": "de-s3", "src": "s3://adapters-bucket/lora/de/adapter.tar.gz"})
        assert r.status_code == 200, r.data
        r = client.post("/adapters", json={"name": "none-s3", "src": "s3://adapters-bucket/nothing/"})
        assert r.status_code == 400 and "no objects" in r.get_json()["error"]
    evil = root / "pkg2" / "evil.tar.gz"
    evil.parent.mkdir(exist_ok=True)
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../../escape.txt")
        info.size = 0
        tar.addfile(info)
    r = client.post("/adapters", json={"name": "evil", "src": str(evil)})
    assert r.status_code == 400 and not (root / "escape.txt").exists()
    for n in ("de-tgz", "fr-s3", "de-s3"):
        assert client.delete(f"/adapters/{n}").status_code == 200


def test_two_workers_share_registrations_through_the_folder(tiny_ckpt, root, tmp_path):
    """Two engines (two gunicorn workers' engines) with one registry folder: a POST on one reaches the other at its
    next adapter request; a DELETE too; a second registration of the name on the other worker is a 409."""
    ENGINES.clear()
    try:
        a, b = (real_engine(tiny_ckpt, max_loras=2, max_lora_rank=8) for _ in range(2))
        cfg = AdapterConfig(registry_dir=str(tmp_path / "reg"), roots=(str(root),), discover_dir=None,
                            cache_dir=str(tmp_path / "cache"))
        ra, rb = AdapterRegistry(cfg, SignaturePolicy(mode="off")), AdapterRegistry(cfg, SignaturePolicy(mode="off"))
        ra.register(a, "fr", str(root / "fr"))
        assert [x["name"] for x in rb.list(b)] == ["fr"]
        from model.types import AdapterExists

        with pytest.raises(AdapterExists):
            rb.register(b, "fr", str(root / "de"))
        h = b.submit(GenerationRequest((5, 6, 7), SamplingParams(max_new_tokens=3), adapter="fr"))
        assert len(h.result().token_ids) == 3
        ra.unregister(a, "fr")
        assert rb.list(b) == [] and ra.list(a) == []
    finally:
        check_pools_and_shut_down(ENGINES)


def test_signed_adapters_under_require(tiny_ckpt, root, tmp_path):
    from serve.sign import sign_checkpoint
    from tests.serve.signing_keys import key_pair

    keys = key_pair(tmp_path / "keys", "signer")
    signed = tmp_path / "ad" / "signed"
    shutil.copytree(root / "fr", signed)
    sign_checkpoint(signed, key=keys.private)
    unsigned = tmp_path / "ad" / "unsigned"
    shutil.copytree(root / "fr", unsigned)
    tampered = tmp_path / "ad" / "tampered"
    shutil.copytree(signed, tampered)
    cfg_file = tampered / "adapter_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"lora_alpha": 8', '"lora_alpha": 9'))
    env = _env(root, MODEL_SIGNATURE="require", MODEL_SIGNATURE_PUBLIC_KEY=str(keys.public),
               ADAPTER_SRC_ROOTS=str(tmp_path / "ad"), MODEL_DIR=str(tmp_path / "nomodel"))
    from model.engine.engine import Engine
    from serve.app import create_app
    from serve.config import load_config

    cfg = load_config(env)
    engine = Engine(tiny_ckpt, cfg.engine, "tiny-test")  # the base is handed over, not verified here
    client = create_app(cfg, engine).test_client()
    try:
        assert engine.wait_ready(120)
        while client.get("/ping").status_code != 200:
            pass
        r = client.post("/adapters", json={"name": "u", "src": str(unsigned)})
        assert r.status_code == 400 and "no model signature" in r.get_json()["error"]
        r = client.post("/adapters", json={"name": "t", "src": str(tampered)})
        assert r.status_code == 400 and "adapter_config.json" in r.get_json()["error"]
        assert client.post("/adapters", json={"name": "s", "src": str(signed)}).status_code == 200
    finally:
        engine.shutdown(5)


def test_adapter_variables_are_parsed_or_refused_naming_them():
    from serve.config import ConfigError, load_config

    a = load_config({"ADAPTERS": "fr=/opt/ml/ad/fr, de=s3://bucket/lora/de.tar.gz", "MODEL_DIR": "/m",
                     "ADAPTER_SRC_ROOTS": "/data,/opt/ml"}).adapters
    assert a.sources == (("fr", "/opt/ml/ad/fr"), ("de", "s3://bucket/lora/de.tar.gz"))
    assert a.roots == ("/data", "/opt/ml") and a.discover_dir == "/m/adapters"
    assert load_config({}).adapters.roots == ("/opt/ml",)
    with pytest.raises(ConfigError, match="ADAPTERS"):
        load_config({"ADAPTERS": "just-a-name"})
    with pytest.raises(ConfigError, match="MAX_LORA_RANK"):
        load_config({"MAX_LORA_RANK": "0"})


def test_adapters_env_registers_at_start(tiny_ckpt, root, tmp_path):
    env = _env(root, ADAPTERS=f"envfr={root / 'fr'},broken={root / 'missing'}", MODEL_DIR=str(tmp_path))
    _, client, engine = ready_app(tiny_ckpt, env)
    try:
        assert [a["name"] for a in client.get("/adapters").get_json()["adapters"]] == ["envfr"]  # broken: logged
    finally:
        engine.shutdown(5)
