"""Static-shape decode: batch-size buckets, dummy-slot padding, fixed buffers, CUDA graph capture.

A graph is keyed by (batch bucket, block-table width bucket): decode attention gathers `width` KV blocks
per sequence, so the width follows the longest sequence in the batch (next power of two of blocks)
instead of always reading max_total_tokens worth of KV. Graphs are captured on first use (warmup
captures every batch bucket at the smallest width). The bucket choice is plain functions, testable without
a GPU; a step fills the buffers by device-side copies from the runner's inputs and device block tables
(rows past the batch point at the dummy slot / block). StaticDecode runs the same fixed buffers eagerly when
not capturing, so the plumbing is exercised on CPU too.
"""

from __future__ import annotations

import logging

import torch

from model.decode_batch import BlockTables, Decode

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


class StaticDecode:
    def __init__(self, fn, buckets, dummy_slot, dummy_block, max_width, block_size, hidden, device, dtype,
                 capture) -> None:
        """fn(Decode) -> hidden (B, hidden): the model's decode over pool state."""
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
        s["out"].copy_(self.fn(Decode(s["ids"], s["slots"], s["positions"], s["tables"])))

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

    def run(self, ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, tables: BlockTables,
            needed: int) -> torch.Tensor:
        """ids, slots, positions (n,) long on the device; `needed` blocks per row -> hidden (n, hidden).
        Device-side copies only: rows n.. of the buffers point at the dummy slot / block."""
        n = ids.shape[0]
        key = (pick_bucket(n, self.buckets), pick_bucket(needed, self.widths))
        if self.capture and key not in self.graphs:
            self.prepare(key)
        s = self._buffers(key)
        s["ids"][:n].copy_(ids)
        s["slots"][:n].copy_(slots)
        s["positions"][:n].copy_(positions)
        torch.index_select(tables.table[:, :key[1]], 0, slots, out=s["tables"][:n])
        if n < key[0]:
            s["ids"][n:].zero_()
            s["slots"][n:].fill_(self.dummy_slot)
            s["positions"][n:].zero_()
            s["tables"][n:].fill_(self.dummy_block)
        if self.capture:
            self.graphs[key].replay()
        else:
            self._eager(s)
        return s["out"][:n].clone()
