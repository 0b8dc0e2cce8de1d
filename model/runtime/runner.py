"""ModelRunner: turns a StepBatch into tensors, runs the network and samples (the engine's Runner).

  step(batch) = collect(launch(batch)) -> StepOutput: sampled tokens, logprobs, alternatives
  launch      forward -> [logits processors] -> sample, each queued without waiting for the device:
                forward   the network, float32 logits (alone: tests, benchmarks)
                [fill]    the rows' logits processors (a grammar's mask) filled on the host while the device
                          runs the forward (model/runtime/sampling.py Sampler.fill); none in the step: no work
                sample    batched sampling (model/runtime/sampling.py) + a non-blocking copy of the result to pinned
                          host memory
  collect     waits for that copy: the step's one device-to-host sync

All prefill chunks of a step run in one packed forward (model/network/packed.py), each from its slot's state
(a FRESH chunk's Mamba state is zeroed first). DECODE chunks (one token each) run together in one call; with
static decode they are padded to a batch-size bucket with the dummy slot and run through fixed buffers,
which on CUDA are captured as CUDA graphs during warmup (every reachable bucket) and replayed.

Size: ~380 lines, on purpose: a step's tensor bookkeeping stays in one module (open, launch = forward ->
processors -> sample, collect, the prefill/decode paths with their LoRA row mapping, warmup's budget, the memory
report).
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import torch

from model.network import packed
from model.network.decode_batch import BlockTables, Decode
from model.network.granite import GraniteForCausalLM, load_granite
from model.network.kernels import Kernels
from model.network.packed import Packed, pack_runs
from model.runtime.adapters import AdapterPool
from model.runtime.blocks import SlotAllocator
from model.runtime.decode_static import CudaGraphs, StaticDecode, decode_buckets, needed_blocks
from model.runtime.sampling import RowMask, Sampler
from model.runtime.snapshots import SnapshotCopier
from model.runtime.state import (
    BLOCK_SIZE,
    CUDA_FIXED_RESERVE,
    StatePool,
    auto_kv_tokens,
    bytes_per_seq,
    decode_step_bytes,
    prefill_step_bytes,
    slot_runs,
)
from model.runtime.warmup import warm_prefills
from model.types import (
    ChunkKind,
    EngineConfig,
    LogitsProcessor,
    SamplingParams,
    SeqChunk,
    StepBatch,
    StepOutput,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """auto|cpu|cuda|cuda:N -> a torch.device; a CUDA one always carries its index ("auto" / "cuda": the
    current device now). A bare "cuda" means whatever device is current in the thread that reads it, and
    torch.cuda.set_device rejects it (bind_thread crashed on it): resolved once here, every later call
    (set_device, streams, graphs, mem_get_info, the engine's loop thread) names the same device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but CUDA is not available")
    if dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device={name!r} requested but this process sees {torch.cuda.device_count()} CUDA "
                           "device(s) (CUDA_VISIBLE_DEVICES renumbers them from 0)")
    return dev


def resolve_dtypes(cfg: EngineConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if cfg.ssm_state_dtype != "auto":
        ssm = DTYPES[cfg.ssm_state_dtype]
    else:
        ssm = dtype if (device.type == "cuda" and dtype == torch.bfloat16) else torch.float32
    return dtype, ssm


class ModelRunner:
    def __init__(self, model_dir: Path | None, config: EngineConfig, decode_mode: str | None = None,
                 model: GraniteForCausalLM | None = None) -> None:
        """decode_mode: None = auto ("graph" on CUDA with cuda_graphs, else "eager"); "static" runs the
        graph buffers/padding eagerly (any device; used by tests). `model`: an already built network on
        the right device and dtype (the GPU benchmark's random full-size weights) instead of model_dir."""
        self.config = config
        dev = resolve_device(config.device)
        self.device = str(dev)
        self._dev = dev
        self.bind_thread()
        self._dtype, self._ssm_dtype = resolve_dtypes(config, dev)
        self.dtype = str(self._dtype).removeprefix("torch.")
        self._kernels = Kernels(config.kernels, dev)
        self.kernel_report = dict(self._kernels.report)
        # decode attention reads KV in place (no gathered copies to budget for)
        self._paged = self.kernel_report["decode_attention"].startswith("fused")
        self.model = model if model is not None else load_granite(model_dir, dev, self._dtype)
        self.arch = self.model.arch
        self.vocab_size = self.arch.vocab_size
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        # LoRA stacks (MAX_LORAS > 0) before the KV pool is sized: their bytes come out of the same budget
        self.adapters = AdapterPool(self.model, config.max_loras, config.max_lora_rank, config.lora_host_bytes,
                                    config.max_concurrent_seqs, dev, self._dtype, self._kernels.lora) \
            if config.max_loras > 0 else None
        kv_tokens = config.kv_cache_tokens or auto_kv_tokens(
            self.arch, config.max_concurrent_seqs, config.max_total_tokens, config.max_step_tokens, dev,
            self._dtype, self._ssm_dtype, config.snapshot_device_share if config.prefix_cache else 0.0, self._paged,
            config.prefill_chunk_tokens)
        self.pool = StatePool(self.arch, config.max_concurrent_seqs, kv_tokens, dev, self._dtype,
                              self._ssm_dtype, BLOCK_SIZE)
        self.allocator = SlotAllocator(config.max_concurrent_seqs, self.pool.num_blocks, BLOCK_SIZE)
        self.snapshot_copier = SnapshotCopier(self.pool)  # [prefix cache] tensor copies for snapshots
        self.model.bind(self.pool, self._kernels)
        # Widest block table decode may need: the longest allowed sequence.
        self.max_blocks_per_seq = min(math.ceil(config.max_total_tokens / BLOCK_SIZE), self.pool.num_blocks)
        n = config.max_concurrent_seqs
        self.tables = BlockTables(self.allocator, n, self.max_blocks_per_seq, self.pool.dummy_block, dev)
        self.sampler = Sampler(n, self.vocab_size, dev)
        pin = dev.type == "cuda"
        self._h2d = torch.zeros(4, n, dtype=torch.long, pin_memory=pin)  # decode ids, slots, positions, adapters
        self._d2h = torch.zeros(n * 2, dtype=torch.float64, pin_memory=pin)  # sampled rows; grows for top-n
        self._copied = torch.cuda.Event() if pin else None  # the sampled rows reached _d2h
        self.asynchronous = pin  # launch() returns before the device is done
        if decode_mode is None:
            decode_mode = "graph" if (dev.type == "cuda" and config.cuda_graphs) else "eager"
        if decode_mode not in ("eager", "static", "graph"):
            raise ValueError(f"decode_mode must be eager|static|graph, got {decode_mode!r}")
        if decode_mode == "graph" and dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.decode_mode = decode_mode
        self.static = None
        if decode_mode != "eager":
            self.static = StaticDecode(self.model.decode, decode_buckets(config.max_concurrent_seqs),
                                       self.pool.dummy_slot, self.pool.dummy_block, self.max_blocks_per_seq,
                                       BLOCK_SIZE, self.arch.hidden, dev, self._dtype,
                                       CudaGraphs(dev) if decode_mode == "graph" else None,
                                       lora=self.adapters.step if self.adapters is not None else None)
        self.kernel_report["decode"] = decode_mode
        log.info("runner: device=%s dtype=%s ssm_state=%s kv_tokens=%d kernels=%s", self.device, self.dtype,
                 self._ssm_dtype, self.pool.num_blocks * BLOCK_SIZE, self.kernel_report)

    def bind_thread(self) -> None:
        """Make this runner's GPU the calling thread's current device (DEVICE=cuda:N): CUDA graph capture
        and the Triton launches use the current device. The engine calls it from its loop thread."""
        if self._dev.type == "cuda":
            torch.cuda.set_device(self._dev)

    @property
    def kernels(self) -> Kernels:
        return self._kernels

    @kernels.setter
    def kernels(self, k: Kernels) -> None:  # the network is bound to its pool and kernels once
        self._kernels = k
        if hasattr(self, "model"):
            self.model.bind(self.pool, k)
        for term in (self.adapters.terms.values() if getattr(self, "adapters", None) is not None else ()):
            term.op = k.lora

    # ---- the step ---------------------------------------------------------------------------
    def open(self, slot: int, params: SamplingParams, seed: int | None, context_ids: Sequence[int],
             processor: LogitsProcessor | None = None) -> None:
        """Bind `slot` (just allocated) to a new sequence's sampling: parameters, seeded generator,
        penalty state over context_ids (the prompt), logits processor (None: none)."""
        self.sampler.open(slot, params, seed, context_ids, processor)

    def step(self, batch: StepBatch) -> StepOutput:
        """Run the step and sample: one token per chunk with want_logits, in chunk order."""
        return self.collect(self.launch(batch))

    def launch(self, batch: StepBatch) -> tuple[list[int], torch.Tensor | None]:
        """Queue the step: forward -> [logits processors] -> sample; collect() waits for it. One step in
        flight at a time (the copy buffers)."""
        logits = self.forward(batch)  # queued on the device
        rows = [c for c in batch.chunks if c.want_logits]
        mask = self.sampler.fill(rows)  # host work meanwhile; None (at once) when no row has a processor
        return self.sample(logits, [c.slot for c in rows], mask)

    def sample(self, logits: torch.Tensor, slots: list[int],
               mask: RowMask | None = None) -> tuple[list[int], torch.Tensor | None]:
        """Queue the sampling of forward()'s logits (row j: slot slots[j]) and the copy of the sampled rows
        to the host (pinned, without blocking on CUDA); mask: Sampler.fill's for these rows."""
        if not slots:
            return slots, None
        packed = self.sampler.sample(logits, slots, mask)
        if self._dev.type != "cuda":
            return slots, packed
        if packed.numel() > self._d2h.numel():
            self._d2h = torch.zeros(packed.numel(), dtype=torch.float64, pin_memory=True)
        host = self._d2h[:packed.numel()].view(packed.shape)
        host.copy_(packed, non_blocking=True)
        self._copied.record()
        return slots, host

    def collect(self, pending: tuple[list[int], torch.Tensor | None]) -> StepOutput:
        """The step's single device-to-host sync: the sampled tokens, their logprobs and alternatives."""
        slots, host = pending
        if host is None:
            return StepOutput([], [], [])
        if self._copied is not None:
            self._copied.synchronize()
        return self.sampler.unpack(host.tolist(), slots)

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """float32 logits (rows = chunks with want_logits, in chunk order, vocab)."""
        chunks = batch.chunks
        if self.adapters is not None:
            self.adapters.step.clear()  # each model call below sets its rows' adapters
        if len({c.slot for c in chunks}) != len(chunks):
            raise ValueError("a step may hold at most one chunk per slot")
        if not chunks:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self._dev)
        decode_idx = [i for i, c in enumerate(chunks) if c.kind == ChunkKind.DECODE]
        if len(decode_idx) == len(chunks):  # the steady state: decodes only
            decode_idx.sort(key=lambda i: chunks[i].slot)
            h = self._decode([chunks[i] for i in decode_idx])
            if decode_idx != list(range(len(chunks))):
                back = [0] * len(chunks)
                for j, i in enumerate(decode_idx):
                    back[i] = j
                h = h[torch.tensor(back, device=self._dev)]
            return self.model.logits(h)
        rows: dict[int, torch.Tensor] = {}
        decode_idx.sort(key=lambda i: chunks[i].slot)  # rows go back in chunk order below
        decode_set = set(decode_idx)
        prefill_idx = [i for i in range(len(chunks)) if i not in decode_set]
        h = self._prefill([chunks[i] for i in prefill_idx])  # (T, hidden)
        end = 0
        for i in prefill_idx:
            end += len(chunks[i].token_ids)
            if chunks[i].want_logits:
                rows[i] = h[end - 1:end]
        if decode_idx:
            h = self._decode([chunks[i] for i in decode_idx])
            for j, i in enumerate(decode_idx):
                rows[i] = h[j:j + 1]
        order = sorted(rows)
        if not order:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self._dev)
        return self.model.logits(torch.cat([rows[i] for i in order]))

    def _check_room(self, chunks: list[SeqChunk]) -> None:
        for c, table in zip(chunks, self.tables.sync([c.slot for c in chunks]), strict=True):
            if c.start + len(c.token_ids) > len(table) * BLOCK_SIZE:
                raise RuntimeError(f"slot {c.slot}: {c.start + len(c.token_ids)} tokens exceed its reserved "
                                   f"{len(table) * BLOCK_SIZE}")

    def _prefill(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """The step's prefill chunks in one packed forward (or a few, see pack_runs) -> hidden (T, hidden),
        chunks back to back."""
        self._check_room(chunks)
        tables = [self.allocator.block_table(c.slot) for c in chunks]
        self.pool.reset_slots([c.slot for c in chunks if c.kind == ChunkKind.FRESH])
        out = []
        for run in pack_runs([c.start + len(c.token_ids) for c in chunks], packed.MAX_PACK_KEY_ROWS):
            cs = [chunks[i] for i in run]
            pk = Packed.build([c.slot for c in cs], [c.start for c in cs], [len(c.token_ids) for c in cs],
                              [tables[i] for i in run], BLOCK_SIZE, self.pool.dummy_block, self._dev)
            # array('q') -> frombuffer: half the time of torch.tensor on a list of ~5K ints
            ids = torch.frombuffer(array("q", chain.from_iterable(c.token_ids for c in cs)), dtype=torch.long)
            ids = ids.to(self._dev, non_blocking=True)
            if self.adapters is not None:  # [LoRA] each packed token's adapter: its sequence's
                self.adapters.step.set_rows([a for c in cs for a in self.adapters.rows([c.slot]) * len(c.token_ids)])
            out.append(self.model.prefill_packed(ids, pk))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _decode(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """DECODE chunks sorted by slot -> hidden (B, hidden). Inputs: one (3, B) host tensor (pinned and
        copied without blocking on CUDA); block tables gathered from the device table."""
        self._check_room(chunks)
        n = len(chunks)
        slots = [c.slot for c in chunks]
        positions = [c.start for c in chunks]
        cols = [[c.token_ids[0] for c in chunks], slots, positions]
        if self.adapters is not None:  # [LoRA] each row's device adapter slot (-1: none)
            cols.append(self.adapters.rows(slots))
        host = torch.tensor(cols, dtype=torch.long)
        if self._dev.type == "cuda":
            self._h2d[:len(cols), :n].copy_(host)
            host = self._h2d[:len(cols), :n].to(self._dev, non_blocking=True)
        ids, slot_t, pos_t, *lora_t = host.unbind(0)
        width = needed_blocks(positions, BLOCK_SIZE)
        if self.static is not None:
            return self.static.run(ids, slot_t, pos_t, self.tables, width, lora_t[0] if lora_t else None)
        if self.adapters is not None:
            self.adapters.step.set_rows(cols[3])
        # forward() sorts decode rows by slot: one run of consecutive slots (every slot busy decoding, the
        # steady state) updates the Mamba state pools through views instead of gather + scatter; several
        # runs are passed on for the reference update of big states (model/network/ssd.py ssm_decode_inplace).
        runs = slot_runs(slots)
        if len(runs) == 1:
            run = slice(slots[0], slots[0] + n)
            return self.model.decode(Decode(ids, run, pos_t, self.tables.rows(run, width)))
        return self.model.decode(Decode(ids, slot_t, pos_t, self.tables.rows(slot_t, width), runs))

    # ---- setup / reporting --------------------------------------------------------------------
    def warmup(self) -> None:
        """Before the server says ready: a prefill and decode (Triton autotunes here), with the fused scan every
        prefill shape class it compiles for (model/runtime/warmup.py), then every decode (batch, width) bucket the
        limits can reach, captured as CUDA graphs in graph mode (never later)."""
        cfg = self.config
        # A short prompt (part of one SSD chunk), then a full prefill chunk continuing from its state
        # (multi-chunk scan with initial state), then a decode step. The prompt stays within
        # max_input_tokens, so the decode position stays below max_total_tokens (the widest graph).
        prompt = min(cfg.max_input_tokens, self.allocator.max_tokens_per_seq - 1)
        short = max(1, min(self.arch.m_chunk // 2 + 1, cfg.prefill_chunk_tokens, prompt - 1))
        full = min(cfg.prefill_chunk_tokens, prompt - short)
        slot = self.allocator.allocate(short + full + 1)
        try:
            ids = [1 + i % (self.vocab_size - 1) for i in range(short + full)]
            self.forward(StepBatch((SeqChunk.fresh(slot, tuple(ids[:short]), full == 0),)))
            if full:
                self.forward(StepBatch((SeqChunk.cont(slot, tuple(ids[short:]), short, True),)))
            self.step(StepBatch((SeqChunk.decode(slot, 1, short + full),)))
        finally:
            self.allocator.free(slot)
        if self.adapters is not None:
            self.adapters.warm()  # [LoRA] the op's kernels for every projection shape
        if self._kernels.f.mamba_chunk_scan_combined is not None:
            # The fused scan compiles per prefill shape class (fresh, continued, batched, packed varlen, and
            # their int sizes): all of them now, not while a request waits (model/runtime/warmup.py).
            warm_prefills(self)
        if self.static is not None:
            cost = lambda key: decode_step_bytes(self.arch, key[0], key[1] * BLOCK_SIZE, self._dtype,  # noqa: E731
                                                 self._paged)
            self.static.prepare_all(cost, self._graph_budget(cost))
            self.kernel_report["decode_buckets"] = f"{self.static.report['prepared']}/{self.static.report['keys']}"
        elif self._dev.type == "cuda":
            for b in decode_buckets(cfg.max_concurrent_seqs):
                d = self.pool.dummy_slot
                t = lambda v: torch.tensor(v, dtype=torch.long, device=self._dev)  # noqa: E731
                self.model.decode(Decode(t([1] * b), t([d] * b), t([0] * b), t([[self.pool.dummy_block]] * b)))
        self.pool.reset_slots([self.pool.dummy_slot])
        if self._dev.type == "cuda":
            torch.cuda.synchronize(self._dev)

    def _graph_budget(self, cost) -> int:
        """Bytes the decode graphs' shared pool may grow to: the widest graph's estimate (what the auto KV
        size kept back), never more than what is free now minus the prefill temporaries and a margin."""
        widest = cost((self.static.buckets[-1], self.static.widths[-1]))
        if self._dev.type != "cuda":
            return widest
        free, _ = torch.cuda.mem_get_info(self._dev)
        cfg = self.config
        prefill = prefill_step_bytes(self.arch, cfg.max_step_tokens, cfg.max_concurrent_seqs, self._dtype,
                                     cfg.max_total_tokens, cfg.prefill_chunk_tokens)
        return max(0, min(widest, free - prefill - CUDA_FIXED_RESERVE // 2))

    def after_failure(self, exc: Exception) -> None:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()

    def memory_report(self) -> dict:
        rep = self.pool.report()
        n = self.config.max_total_tokens
        rep["formula_bytes_per_seq"] = bytes_per_seq(self.arch, n, self._dtype, self._ssm_dtype)
        rep["formula_tokens"] = n
        cfg = self.config  # the largest prefill step's temporaries, as the auto KV size kept them back
        rep["prefill_step_bytes"] = prefill_step_bytes(self.arch, cfg.max_step_tokens, cfg.max_concurrent_seqs,
                                                       self._dtype, n, cfg.prefill_chunk_tokens)
        if self.static is not None:
            rep["decode_graphs"] = dict(self.static.report)
        if self.adapters is not None:
            rep["lora_device_bytes"] = self.adapters.device_bytes
        return rep
