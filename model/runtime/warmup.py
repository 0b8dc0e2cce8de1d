"""The prefills warmup runs so that serving compiles no new Triton kernel variant (fused SSD scan only).

Triton compiles a kernel once per specialization: argument dtypes, constexprs, and for every int (and
pointer) argument whether it is 1, divisible by 16, or neither. mamba-ssm's SSD kernels take the sequence
length, the batch and the number of chunks as ints, and decide constexprs from the call (initial states,
seq_idx): a 17-token prompt after a 16-token one, a second chunk, two continued rows after one, compile
new variants, and a new autotune key (argument dtypes: seq_idx is one) autotunes every config again, for
seconds, while a request waits. The fused prefill (model/network/kernels.py ssd_prefill) calls the kernels in four
forms: one fresh row, continued rows one at a time, continued rows of equal length together (batch > 1),
and 2+ fresh rows packed into one varlen call (seq_idx / cu_seqlens). `prefill_plan` lists one prefill
per form and per class of those ints that the engine's limits can reach; bench/compile_report.py
checks, by compiling for each GPU architecture, that serving then compiles nothing new.
"""

from __future__ import annotations

from math import ceil


def _cls(n: int) -> int:
    """Triton's specialization class of an int argument: 1, divisible by 16 (as 16), or neither (0)."""
    return 1 if n == 1 else 16 if n % 16 == 0 else 0


def lengths(limit: int, chunk: int) -> list[int]:
    """Token counts <= limit, one per reachable (class of the count, class of its number of chunks)."""
    out, seen = [], set()
    for k in (1, 2, 16):  # chunks: one, more, a multiple of 16
        lo, hi = (k - 1) * chunk + 1, min(k * chunk, limit)
        for n in (lo, lo + 1, -(-lo // 16) * 16):
            key = (_cls(n), _cls(k))
            if lo <= n <= hi and key not in seen:
                seen.add(key)
                out.append(n)
    return out


def prefill_plan(chunk: int, max_chunk: int, step_tokens: int, max_seqs: int) -> list[tuple[tuple[int, int], ...]]:
    """Warmup's prefill steps, each a tuple of (start, tokens) chunks: start 0 is a fresh prompt, start 1 a
    row continuing from its state (the start itself is no kernel argument). chunk: the SSD chunk size;
    max_chunk: the longest prefill chunk (prefill_chunk_tokens, max_input_tokens); step_tokens: the most
    tokens one step runs; max_seqs: the most rows one step holds."""
    single = lengths(max_chunk, chunk)
    steps = [((0, n),) for n in single] + [((1, n),) for n in single]
    for b in (2, 16):  # continued rows of equal length: one call with batch b (1 < b; b divisible by 16)
        if b <= max_seqs:
            steps += [((1, n),) * b for n in single if b * n <= step_tokens]
    for t in lengths(min(step_tokens, max_seqs * max_chunk), chunk):  # 2+ fresh prompts: one varlen call
        m = max(2, ceil(t / max_chunk))
        if t >= m and m <= max_seqs:
            steps.append(tuple((0, t // m + (i < t % m)) for i in range(m)))
    return steps


def warm_prefills(runner) -> None:
    """Run prefill_plan on `runner` (a ModelRunner), each chunk on a slot of its own, nothing sampled. A step
    the KV pool cannot hold is skipped (serving cannot run it either)."""
    from model.types import SeqChunk, StepBatch

    cfg, alloc = runner.config, runner.allocator
    plan = prefill_plan(runner.arch.m_chunk, min(cfg.prefill_chunk_tokens, cfg.max_input_tokens),
                        cfg.max_step_tokens, cfg.max_concurrent_seqs)
    for step in plan:
        slots: list[int] = []
        try:
            for start, n in step:
                if not alloc.can_allocate(start + n):
                    break
                slots.append(alloc.allocate(start + n))
            else:
                ids = [tuple(1 + i % (runner.vocab_size - 1) for i in range(n)) for _, n in step]
                runner.forward(StepBatch(tuple(
                    SeqChunk.fresh(s, t, False) if start == 0 else SeqChunk.cont(s, t, start, False)
                    for s, t, (start, _) in zip(slots, ids, step, strict=True))))
        finally:
            for s in slots:
                alloc.free(s)
