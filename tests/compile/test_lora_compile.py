"""model/network/lora_triton.py's two kernels compiled for sm_80 / sm_86 / sm_89 / sm_90 on this CPU
(bench/triton_compile.py: real cubins, nothing launched), through the op's own call site at the full-size micro's
projection shapes in bf16: eager prefill segments and fixed-buffer decode rows, MAX_LORA_RANK 16 and 64. Every
variant loads (shared memory and threads within the architecture's limits) and spills no register."""

from __future__ import annotations

import pytest
import torch

from bench import triton_compile as tc
from model.network.lora import LoraStep
from model.network.lora_triton import lora_triton

HIDDEN, IN_PROJ, MLP2, MLP, M_INNER = 2048, 8512, 16384, 8192, 4096  # /work/shared/GRANITE.md's micro
SHAPES = [(HIDDEN, IN_PROJ), (M_INNER, HIDDEN), (HIDDEN, MLP2), (MLP, HIDDEN), (HIDDEN, 512)]


@pytest.mark.parametrize("a", tc.ARCHS, ids=lambda a: f"sm_{a.cc}")
def test_lora_kernels_compile_within_limits(a):
    dev = a.cc * 100 + 50  # its own kernel cache
    with tc.compile_only(a, dev):
        for rank in (16, 64):
            for k, out in SHAPES:
                A = torch.empty(4, rank, k, dtype=torch.bfloat16, device="meta")
                B = torch.empty(4, out, rank, dtype=torch.bfloat16, device="meta")
                for rows, fixed in ((2048, False), (32, True)):
                    x = torch.empty(rows, k, dtype=torch.bfloat16, device="meta")
                    y = torch.empty(rows, out, dtype=torch.bfloat16, device="meta")
                    step = LoraStep("meta")
                    if fixed:
                        step.use_index(torch.empty(rows, dtype=torch.long, device="meta"))
                    else:
                        step.set_rows([0] * 1000 + [-1] * 48 + [2] * 1000)
                    lora_triton(x, y, A, B, step)
        variants = {n: v for n, v in tc.compiled(dev).items() if n.startswith("model.network.lora_triton:")}
    assert set(variants) == {"model.network.lora_triton:_shrink_kernel", "model.network.lora_triton:_expand_kernel"}
    for name, kernels in variants.items():
        for kern in kernels.values():
            f = tc.variant_facts(kern, a)
            assert f["usable"] and f["spills"] == 0, (name, f)
