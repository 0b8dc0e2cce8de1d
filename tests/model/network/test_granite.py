"""The network against Hugging Face's GraniteMoeHybridForCausalLM on tiny random checkpoints (fp32, CPU).

HF's torch path is only trusted for full-prompt prefill and single-token decode steps (a multi-token
forward on an existing cache drops the Mamba state), so chunked prefill is checked against our own
unchunked prefill instead.
"""

from __future__ import annotations

import json

import pytest
import torch

from model.network.decode_batch import Decode
from model.network.granite import GraniteArch, load_granite
from model.network.kernels import Kernels
from model.runtime.state import StatePool
from tests.tiny_granite import build_tiny

ATOL = 2e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_granite")
    hf = build_tiny(d)
    return d, hf


@pytest.fixture()
def net(ckpt):
    d, hf = ckpt
    model = load_granite(d, "cpu", torch.float32)
    pool = StatePool(model.arch, num_slots=4, kv_tokens=256, device="cpu", dtype=torch.float32,
                     ssm_dtype=torch.float32, block_size=4)
    model.bind(pool, Kernels("reference", "cpu"))
    return model, pool, model.K, hf


def _table(slot, nblocks=16):
    # Non-contiguous, interleaved blocks per slot so paging bugs show.
    return torch.tensor([slot + 4 * i for i in range(nblocks)])


def _prefill(model, pool, K, ids, slot, start=0):
    return model.prefill(torch.tensor(ids), slot, start, _table(slot))


def _decode(model, pool, K, toks, slots, positions):
    tables = torch.stack([_table(s) for s in slots])
    return model.decode(Decode(torch.tensor(toks), torch.tensor(slots), torch.tensor(positions), tables))


def test_arch_reads_config(ckpt):
    a = GraniteArch.from_dir(ckpt[0])
    assert a.kinds == ("mamba", "attention", "mamba", "mamba")
    assert (a.n_mamba, a.n_attention) == (3, 1)
    assert a.attention_multiplier == 0.125 and a.logits_scaling == 2.0 and a.embedding_multiplier == 3.0


def test_meta_load_assigns_checkpoint_tensors(net, ckpt):
    model = net[0]
    hf_sd = ckpt[1].state_dict()
    for name, p in model.state_dict().items():
        assert p.device.type == "cpu"
        torch.testing.assert_close(p, hf_sd[name], rtol=0, atol=0)
    assert model.lm_head is None  # tied


def test_prefill_matches_hf(net):
    model, pool, K, hf = net
    ids = [5, 17, 3, 99, 250, 8, 8, 41, 77, 12, 300, 6, 1, 19, 55, 23, 7, 140, 9]  # 19 = 2 chunks + 3
    mine = model.logits(_prefill(model, pool, K, ids, slot=2))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(mine, ref, atol=ATOL, rtol=1e-4)


def test_decode_steps_match_hf_cache(net):
    model, pool, K, hf = net
    ids = [11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 122]
    _prefill(model, pool, K, ids, slot=1)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
        cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        for step, tok in enumerate([5, 250, 7, 31, 2, 160, 9, 10, 11]):
            out = hf(torch.tensor([[tok]]), cache=cache, use_cache=True)
            mine = model.logits(_decode(model, pool, K, [tok], [1], [len(ids) + step]))
            torch.testing.assert_close(mine, out.logits[:, -1], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("prompt", [[7], [3, 9, 27, 81, 243, 100], list(range(40, 61))])
def test_greedy_matches_hf_generate(net, prompt):
    model, pool, K, hf = net
    new = 12
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, min_new_tokens=new,
                          pad_token_id=0)[0, len(prompt):].tolist()
    h = _prefill(model, pool, K, prompt, slot=0)
    toks = [int(model.logits(h[-1:]).argmax(-1))]
    for i in range(new - 1):
        h = _decode(model, pool, K, [toks[-1]], [0], [len(prompt) + i])
        toks.append(int(model.logits(h).argmax(-1)))
    assert toks == ref


@pytest.mark.parametrize("chunks", [[1, 18], [8, 8, 3], [5, 5, 5, 4], [3, 13, 3], [19]])
def test_chunked_prefill_equals_unchunked(net, chunks):
    model, pool, K, _ = net
    ids = list(range(100, 119))
    full = model.logits(_prefill(model, pool, K, ids, slot=0))
    state_full = (pool.conv[:, 0].clone(), pool.ssm[:, 0].clone())
    pool.reset_slots([3])
    rows, start = [], 0
    for n in chunks:
        rows.append(model.logits(_prefill(model, pool, K, ids[start:start + n], slot=3, start=start)))
        start += n
    torch.testing.assert_close(torch.cat(rows), full, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(pool.conv[:, 3], state_full[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(pool.ssm[:, 3], state_full[1], atol=ATOL, rtol=1e-4)


def test_batched_decode_equals_one_at_a_time(net):
    model, pool, K, _ = net
    prompts = {0: list(range(10, 13)), 1: list(range(50, 71)), 3: list(range(200, 209))}
    for slot, ids in prompts.items():
        pool.reset_slots([slot])
        _prefill(model, pool, K, ids, slot)
    snapshot = [t.clone() for t in (pool.conv, pool.ssm, pool.k, pool.v)]
    slots = [3, 0, 1]
    toks = [4, 5, 6]
    pos = [len(prompts[s]) for s in slots]
    batched = model.logits(_decode(model, pool, K, toks, slots, pos))
    after = [t.clone() for t in (pool.conv, pool.ssm, pool.k, pool.v)]
    for dst, src in zip((pool.conv, pool.ssm, pool.k, pool.v), snapshot, strict=True):
        dst.copy_(src)
    single = torch.cat([model.logits(_decode(model, pool, K, [t], [s], [p]))
                        for t, s, p in zip(toks, slots, pos, strict=True)])
    torch.testing.assert_close(batched, single, atol=ATOL, rtol=1e-4)
    for a, b in zip(after, (pool.conv, pool.ssm, pool.k, pool.v), strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


def test_old_layer_type_spelling_and_refusals(tmp_path):
    build_tiny(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["layer_types"] = ["mamba", "attention", "mamba", "mamba"]
    cfg_path.write_text(json.dumps(cfg))
    assert GraniteArch.from_dir(tmp_path).kinds == ("mamba", "attention", "mamba", "mamba")
    cfg["position_embedding_type"] = "rope"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope"):
        GraniteArch.from_dir(tmp_path)
    cfg["position_embedding_type"] = "nope"
    cfg["num_local_experts"] = 4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="experts"):
        GraniteArch.from_dir(tmp_path)


def test_untied_head_loads(tmp_path):
    hf = build_tiny(tmp_path, seed=3, tie_word_embeddings=False)
    model = load_granite(tmp_path, "cpu", torch.float32)
    assert model.lm_head is not None
    ids = [4, 8, 15, 16, 23, 42]
    pool = StatePool(model.arch, 1, 16, "cpu", torch.float32, torch.float32, block_size=4)
    model.bind(pool, Kernels("reference", "cpu"))
    h = model.prefill(torch.tensor(ids), 0, 0, torch.arange(4))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(h), hf(torch.tensor([ids])).logits[0], atol=ATOL, rtol=1e-4)
