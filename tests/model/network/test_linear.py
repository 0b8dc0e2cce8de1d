"""The per-row extra term of the projections (model/network/kernels.py LinearExtra, model/network/granite.py Linear.extra),
where a LoRA delta goes: a low-rank delta on the rows of one group equals F.linear with the merged weights
there and leaves every other row bit for bit as without it; through the whole network, a sequence in the
group runs as the merged model would and its batch-mates exactly as without the term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.network import linear as lmod
from model.network.granite import Linear, load_granite
from model.network.kernels import Kernels
from model.network.linear import RowGroups
from model.runtime.runner import ModelRunner
from model.runtime.state import StatePool
from model.types import EngineConfig, SeqChunk, StepBatch

RANK, SCALE = 2, 0.5


class Step:
    """The step's row -> group mapping, shared by every projection's term (whoever runs the step sets it)."""

    groups: RowGroups | None = None


class LowRank:
    """y[rows of group g] += SCALE * (x A^T) B^T for the groups it has (A (r, in), B (out, r)) weights for."""

    def __init__(self, step: Step, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.step, self.weights, self.calls = step, weights, 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        g = self.step.groups
        for gid, rows in zip(g.ids, g.rows, strict=True):
            if gid in self.weights:
                A, B = self.weights[gid]
                y = y.index_add(0, rows, (x[rows] @ A.T) @ B.T, alpha=SCALE)
        return y

    def merged(self, lin: Linear, gid: int) -> torch.Tensor:
        A, B = self.weights[gid]
        return lin.weight + SCALE * (B @ A)


def _lowrank(lin: Linear, step: Step, gid: int, seed: int) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(RANK, lin.in_features, generator=g) * 0.3
    B = torch.randn(lin.out_features, RANK, generator=g) * 0.3
    return LowRank(step, {gid: (A, B)})


def test_row_groups_of():
    g = RowGroups.of([None, 7, 3, 7, None, 7], "cpu")
    assert g.ids == (7, 3) and [r.tolist() for r in g.rows] == [[1, 3, 5], [2]]
    assert RowGroups.of([None, None], "cpu").ids == ()


def test_extra_on_one_group_equals_merged_weights_and_leaves_other_rows_exact(tiny_ckpt):
    K = Kernels("auto", "cpu")
    m = load_granite(tiny_ckpt, "cpu", torch.float32)
    m.bind(StatePool(m.arch, 2, 64, "cpu", torch.float32, torch.float32), K)
    lins = [x for x in m.modules() if isinstance(x, Linear)]
    assert lins and all(x.extra is None for x in lins)  # the default: the projection alone
    assert all(x.fn is K.linear for x in lins) and K.linear is lmod._onednn_linear  # the CPU path unchanged
    step = Step()
    step.groups = RowGroups.of([None, 7, 3, 7, None, 7], "cpu")  # group 3: rows the term has no weights for
    covered, other = [1, 3, 5], [0, 2, 4]
    for i, lin in enumerate(lins):
        x = torch.randn(6, lin.in_features, generator=torch.Generator().manual_seed(i))
        plain = lin(x)
        assert torch.equal(plain, K.linear(x, lin.weight, lin.bias))
        lin.extra = _lowrank(lin, step, 7, seed=100 + i)
        y = lin(x)
        assert lin.extra.calls == 1
        torch.testing.assert_close(y[covered], F.linear(x[covered], lin.extra.merged(lin, 7), lin.bias))
        assert torch.equal(y[other], plain[other])
        lin.extra = None
        assert torch.equal(lin(x), plain)


# ---- through the network ----------------------------------------------------------------------------

# One projection of each kind: Mamba in/out, attention q/v, the MLP's two.
TARGETS = ("mamba.in_proj", "mamba.out_proj", "self_attn.q_proj", "self_attn.v_proj", "shared_mlp.input_linear",
           "shared_mlp.output_linear")
PROMPTS = [(5, 9, 14, 3, 27, 8), (7, 7, 21, 30, 2, 8, 11, 40, 6)]
FED = [(12, 19), (33, 4)]  # the tokens the two decode steps feed each sequence (teacher forced)


def _runner(ckpt, mode: str) -> ModelRunner:
    cfg = EngineConfig(max_concurrent_seqs=3, max_input_tokens=32, max_total_tokens=64, kv_cache_tokens=512)
    return ModelRunner(ckpt, cfg, decode_mode=mode)


def _targets(r: ModelRunner):
    return [(n, x) for n, x in r.model.named_modules() if isinstance(x, Linear) and n.endswith(TARGETS)]


def _run(r: ModelRunner, which: list[int], step: Step | None, group: dict[int, int]) -> list[torch.Tensor]:
    """Prefill PROMPTS[which] in one packed step, then two decode steps; logits of each step. `group`: the
    group of each sequence in the extra's mapping (rows: the packed tokens, then the decode rows by slot)."""
    slots = [r.allocator.allocate(32) for _ in which]
    rows = [group.get(i) for i in which for _ in PROMPTS[i]]
    if step is not None:
        step.groups = RowGroups.of(rows, "cpu")
    out = [r.forward(StepBatch(tuple(SeqChunk.fresh(s, PROMPTS[i], True) for s, i in zip(slots, which, strict=True))))]
    for k in range(2):
        if step is not None:
            step.groups = RowGroups.of([group.get(i) for i in which], "cpu")
        out.append(r.forward(StepBatch(tuple(SeqChunk.decode(s, FED[i][k], len(PROMPTS[i]) + k)
                                             for s, i in zip(slots, which, strict=True)))))
    return out


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_network_with_extra_on_one_sequence(tiny_ckpt, mode):
    """Sequences 0 and 1 packed and decoded together, the term on sequence 1's rows (group 1): sequence 1's
    logits are the merged model's (run alone), sequence 0's are bit for bit those without any term."""
    plain = _run(_runner(tiny_ckpt, mode), [0, 1], None, {})
    r, step = _runner(tiny_ckpt, mode), Step()
    merged = _runner(tiny_ckpt, mode)
    merged_lins = dict(_targets(merged))
    assert len(merged_lins) == 2 * r.arch.n_mamba + 2 * r.arch.n_attention + 2 * len(r.arch.kinds)
    for i, (name, lin) in enumerate(_targets(r)):
        lin.extra = _lowrank(lin, step, 1, seed=i)
        with torch.no_grad():
            merged_lins[name].weight.copy_(lin.extra.merged(lin, 1))
    got = _run(r, [0, 1], step, {1: 1})
    alone = _run(merged, [1], None, {})
    for g, p, a in zip(got, plain, alone, strict=True):
        assert torch.equal(g[0], p[0])
        torch.testing.assert_close(g[1], a[0], atol=2e-5, rtol=1e-4)
        assert not torch.allclose(g[1], p[1], atol=1e-3)  # the term does change sequence 1


def test_cpu_projections_run_onednn_linear_and_match_f_linear(tiny_ckpt):
    from model.network.granite import Linear, load_granite
    from model.runtime.state import StatePool

    K = Kernels("auto", "cpu")
    assert K.report["linear"] == "onednn:_linear_pointwise" and K.linear is lmod._onednn_linear
    m = load_granite(tiny_ckpt, "cpu", torch.float32)
    m.bind(StatePool(m.arch, 2, 64, "cpu", torch.float32, torch.float32), K)
    lins = [x for x in m.modules() if isinstance(x, Linear)]
    assert lins and all(x.fn is lmod._onednn_linear for x in lins)
    for rows in (1, 3, 8, 100):
        for lin in lins[:3]:
            x = torch.randn(rows, lin.in_features)
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    xb = torch.randn(2, lins[0].in_features, dtype=torch.bfloat16)  # not fp32: F.linear
    assert torch.equal(lmod._onednn_linear(xb, lins[0].weight.bfloat16(), None), F.linear(xb, lins[0].weight.bfloat16()))
    assert Kernels("auto", "meta").linear is F.linear  # not a CPU: F.linear (cuBLAS on CUDA)


def test_cpu_linear_falls_back_to_mkl_when_onednn_fails(monkeypatch):
    def broken(x, w, b):
        raise RuntimeError("no oneDNN in this build")

    monkeypatch.setattr(lmod, "_onednn_linear", broken)
    assert lmod.cpu_linear() is None
    K = Kernels("auto", "cpu")
    assert K.linear is F.linear and K.report["linear"] == "torch"
