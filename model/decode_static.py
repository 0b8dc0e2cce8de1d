"""Static-shape decode: batch-size buckets, dummy-slot padding, fixed buffers, CUDA graph capture.

A graph is keyed by (batch bucket, block-table width bucket): decode attention gathers `width` KV blocks
per sequence, so the width follows the longest sequence in the batch (next power of two of blocks)
instead of always reading max_total_tokens worth of KV. Graphs are captured on first use (warmup
captures every batch bucket at the smallest width). The bookkeeping (bucket choice, padding) is plain
functions, testable without a GPU; StaticDecode runs the same fixed buffers eagerly when not capturing,
so the plumbing is exercised on CPU too.
"""

from __future__ import annotations

import logging

import torch

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


def pick_bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"decode batch of {n} exceeds the largest bucket {buckets[-1]}")


def pad_decode(ids, slots, positions, tables, bucket, dummy_slot, dummy_block, width):
    """Pad per-sequence decode inputs to `bucket` rows (dummy slot, position 0, dummy blocks) and every
    block table to `width` entries. Returns four lists."""
    n = len(ids)
    if n > bucket:
        raise ValueError(f"{n} rows do not fit bucket {bucket}")
    pad = bucket - n
    tabs = []
    for t in tables:
        if len(t) > width:
            t = t[:width]
        tabs.append(list(t) + [dummy_block] * (width - len(t)))
    tabs += [[dummy_block] * width] * pad
    return list(ids) + [0] * pad, list(slots) + [dummy_slot] * pad, list(positions) + [0] * pad, tabs


class StaticDecode:
    def __init__(self, fn, buckets, dummy_slot, dummy_block, max_width, block_size, hidden, device, dtype,
                 capture) -> None:
        """fn(ids, slots, tables, positions) -> hidden (B, hidden): the model's decode over pool state."""
        self.fn, self.buckets, self.widths = fn, buckets, width_buckets(max_width)
        self.block_size = block_size
        self.dummy_slot, self.dummy_block = dummy_slot, dummy_block
        self.hidden, self.device, self.dtype, self.capture = hidden, torch.device(device), dtype, capture
        self.buf: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._mempool = None

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
            }
        return self.buf[key]

    def _eager(self, s) -> None:
        s["out"].copy_(self.fn(s["ids"], s["slots"], s["tables"], s["positions"]))

    def prepare(self, key: tuple[int, int]) -> None:
        """Allocate (batch, width) buffers and (CUDA) capture their graph. The inputs are first pointed at
        the dummy slot / block, so the warm-up runs and the capture touch no live sequence."""
        if key in self.graphs:
            return
        s = self._buffers(key)
        s["slots"].fill_(self.dummy_slot)  # run() refills the inputs before every use
        s["tables"].fill_(self.dummy_block)
        s["positions"].zero_()
        if not self.capture:
            self._eager(s)
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # Triton autotune + allocator warm-up outside the capture
                self._eager(s)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._mempool):
            self._eager(s)
        self.graphs[key] = g
        log.info("captured decode CUDA graph for batch %d, width %d blocks", *key)

    def prepare_all(self) -> None:
        for b in sorted(self.buckets, reverse=True):  # largest first: later graphs reuse its memory
            self.prepare((b, self.widths[0]))

    def run(self, ids, slots, positions, tables) -> torch.Tensor:
        n = len(ids)
        key = (pick_bucket(n, self.buckets), pick_bucket(needed_blocks(positions, self.block_size), self.widths))
        if self.capture and key not in self.graphs:
            self.prepare(key)
        s = self._buffers(key)
        ids, slots, positions, tables = pad_decode(ids, slots, positions, tables, key[0], self.dummy_slot,
                                                   self.dummy_block, key[1])
        for name, vals in (("ids", ids), ("slots", slots), ("positions", positions), ("tables", tables)):
            s[name].copy_(torch.tensor(vals, dtype=torch.long))
        if self.capture:
            self.graphs[key].replay()
        else:
            self._eager(s)
        return s["out"][:n].clone()
