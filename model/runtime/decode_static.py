"""Static-shape decode: batch-size buckets, dummy-slot padding, fixed buffers, CUDA graph capture.

A graph is keyed by (batch bucket, block-table width bucket): decode attention gathers `width` KV blocks
per sequence, so the width follows the longest sequence in the batch (next power of two of blocks)
instead of always reading max_total_tokens worth of KV. Every key the limits can reach is prepared by
`prepare_all` during warmup, before the server says ready, largest first and within a memory budget;
`run` never captures: a key left out (over the budget, or a capture that ran out of memory) runs the same
fixed buffers eagerly. A step fills the buffers by device-side copies from the runner's inputs and the
device block tables (model/network/decode_batch.py; rows past the batch point at the dummy slot / block). The
bookkeeping (bucket choice, capture plan) is plain functions, and capture goes through a small seam
(`CudaGraphs`), so everything but the CUDA calls runs on CPU in tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from model.network.decode_batch import BlockTables, Decode

log = logging.getLogger(__name__)


def decode_buckets(max_seqs: int) -> list[int]:
    """1, 2, 4, ... below max_seqs, then max_seqs itself."""
    out, b = [], 1
    while b < max_seqs:
        out.append(b)
        b *= 2
    return out + [max_seqs]


def width_buckets(max_blocks: int) -> list[int]:
    return decode_buckets(max_blocks)


def needed_blocks(positions, block_size: int) -> int:
    """Blocks that hold positions 0..p for the longest sequence (p = index of the token being written)."""
    return max(p // block_size + 1 for p in positions)


def pick_bucket(n: int, buckets: list[int], what: str = "decode batch") -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{what} of {n} exceeds the largest bucket {buckets[-1]}")


def capture_plan(keys, cost: Callable[[tuple[int, int]], int], budget: int) -> tuple[list, list]:
    """(keys to capture, largest first, keys left out). Graphs share one memory pool and each one's
    temporaries are dead when it ends, so the pool holds about the largest graph: a key is left out when
    its own estimated cost exceeds the budget."""
    order = sorted(keys, key=lambda k: (cost(k), k), reverse=True)
    return [k for k in order if cost(k) <= budget], [k for k in order if cost(k) > budget]


class CudaGraphs:
    """The CUDA calls of capture, behind a seam: capture(fn) -> a replay callable; reserved_bytes()."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)  # indexed (model/runner.resolve_device)
        self._pool = None
        self._stream = None

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        # One side stream, made on self.device, for every warm-up and capture: without `stream=`,
        # torch.cuda.graph captures on a process-wide stream made on whatever device was current at its
        # first use; graphs sharing a pool should share their capture stream too (torch's advice).
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # Triton autotune + allocator warm-up outside the capture
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool, stream=stream):
            fn()
        return g.replay

    def reserved_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_reserved(self.device)

    @staticmethod
    def is_oom(e: BaseException) -> bool:
        return isinstance(e, torch.cuda.OutOfMemoryError)


class StaticDecode:
    def __init__(self, fn, buckets, dummy_slot, dummy_block, max_width, block_size, hidden, device, dtype,
                 graphs: CudaGraphs | None, lora=None) -> None:
        """fn(Decode) -> hidden (B, hidden): the model's decode over pool state.
        graphs: None = run the fixed buffers eagerly (CPU, tests). lora: the LoRA step mapping
        (model/network/lora.py LoraStep) or None: each key then has a fixed (B,) adapter-index buffer, a graph input."""
        self.lora = lora
        self.fn, self.buckets, self.widths = fn, buckets, width_buckets(max_width)
        self.block_size = block_size
        self.dummy_slot, self.dummy_block = dummy_slot, dummy_block
        self.hidden, self.device, self.dtype = hidden, torch.device(device), dtype
        self.graphs = graphs
        self.buf: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.replay: dict[tuple[int, int], Callable[[], None]] = {}
        self.prepared: set[tuple[int, int]] = set()
        self.unprepared_runs = 0  # steps whose key warmup did not prepare (run eagerly, never captured)
        self.report: dict = {}

    def keys(self) -> list[tuple[int, int]]:
        return [(b, w) for b in self.buckets for w in self.widths]

    def _buffers(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        b, width = key
        if key not in self.buf:
            long = {"dtype": torch.long, "device": self.device}
            self.buf[key] = {
                "ids": torch.zeros(b, **long),
                "slots": torch.full((b,), self.dummy_slot, **long),
                "positions": torch.zeros(b, **long),
                "tables": torch.full((b, width), self.dummy_block, **long),
                "out": torch.zeros(b, self.hidden, dtype=self.dtype, device=self.device),
                "adapters": torch.full((b,), -1, **long),
            }
        return self.buf[key]

    def _eager(self, s) -> None:
        if self.lora is not None:
            self.lora.use_index(s["adapters"])
        s["out"].copy_(self.fn(Decode(s["ids"], s["slots"], s["positions"], s["tables"])))

    def prepare(self, key: tuple[int, int]) -> None:
        """Allocate (batch, width) buffers and run them once, or (CUDA) capture their graph. The inputs
        point at the dummy slot / block, so the warm-up runs and the capture touch no live sequence."""
        s = self._buffers(key)
        s["slots"].fill_(self.dummy_slot)  # run() refills the inputs before every use
        s["tables"].fill_(self.dummy_block)
        s["positions"].zero_()
        s["adapters"].fill_(-1)
        if self.graphs is None:
            self._eager(s)
        else:
            self.replay[key] = self.graphs.capture(lambda: self._eager(s))
        self.prepared.add(key)

    def prepare_all(self, cost: Callable[[tuple[int, int]], int], budget: int) -> dict:
        """Prepare every reachable key whose estimated temporaries (`cost`, bytes) fit `budget`, largest
        first (later graphs reuse the pool the first one grew). A capture that runs out of memory stops
        capturing: the keys not done run eagerly. Returns (and logs) what was captured and its memory."""
        todo, over = capture_plan(self.keys(), cost, budget)
        t0, failed = time.perf_counter(), None
        before = self.graphs.reserved_bytes() if self.graphs is not None else 0
        for i, key in enumerate(todo):
            try:
                self.prepare(key)
            except Exception as e:
                if self.graphs is None or not self.graphs.is_oom(e):
                    raise
                failed, over = f"{type(e).__name__} at batch {key[0]}, width {key[1]}", over + todo[i:]
                break
        rep = {"mode": "graph" if self.graphs is not None else "static", "keys": len(self.keys()),
               "prepared": len(self.prepared), "left_out": sorted(over), "budget_bytes": int(budget),
               "estimated_bytes": max((cost(k) for k in self.prepared), default=0),
               "pool_bytes": (self.graphs.reserved_bytes() - before) if self.graphs is not None else 0,
               "seconds": round(time.perf_counter() - t0, 3), "stopped_by": failed}
        log.info("decode %s: prepared %d of %d (batch, width) buckets in %.1fs, pool %.0f MiB (estimate %.0f "
                 "MiB, budget %.0f MiB)%s", rep["mode"], rep["prepared"], rep["keys"], rep["seconds"],
                 rep["pool_bytes"] / 2**20, rep["estimated_bytes"] / 2**20, budget / 2**20,
                 f"; left out (run eagerly): {rep['left_out']}" + (f" ({failed})" if failed else "")
                 if over else "")
        self.report, self.unprepared_runs = rep, 0  # count from here: the serving steps
        return rep

    def run(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, tables: BlockTables,
            needed: int, adapters: torch.Tensor | None = None) -> torch.Tensor:
        """ids, slots, positions (n,) long on the device; `needed` blocks per row -> hidden (n, hidden);
        adapters (n,) long: each row's device adapter slot, -1 none (LoRA on). Device-side copies only: rows n..
        of the buffers point at the dummy slot / block and no adapter."""
        n = ids.shape[0]
        key = (pick_bucket(n, self.buckets), pick_bucket(needed, self.widths, "block-table width"))
        s = self._buffers(key)
        s["ids"][:n].copy_(ids)
        s["slots"][:n].copy_(slots)
        s["positions"][:n].copy_(positions)
        torch.index_select(tables.table[:, :key[1]], 0, slots, out=s["tables"][:n])
        if adapters is not None:
            s["adapters"][:n].copy_(adapters)
            s["adapters"][n:].fill_(-1)
        if n < key[0]:
            s["ids"][n:].zero_()
            s["slots"][n:].fill_(self.dummy_slot)
            s["positions"][n:].zero_()
            s["tables"][n:].fill_(self.dummy_block)
        replay = self.replay.get(key)
        if replay is not None:
            replay()
        else:
            if key not in self.prepared:
                self.unprepared_runs += 1
            self._eager(s)
        return s["out"][:n].clone()
