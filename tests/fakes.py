"""Fakes shared by the tests, in one place: a scripted engine runner + tokenizer (real Engine, real
allocator, no model), the batch pipeline's stand-in for handle_record, and a boto3 Session stand-in.

Kernel fakes with the fused kernels' signatures are in tests/fake_kernels.py; tiny real checkpoints
in tests/tiny_granite.py and tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
import time
import zlib
from pathlib import Path

from model.engine.engine import Engine
from model.runtime.blocks import SlotAllocator
from model.types import EngineConfig, GenerationRequest, SamplingParams, StepOutput

# ---- engine --------------------------------------------------------------------------------------

V = 64
ALPHA = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-_+*/=<>()[]{}@#$%&"[:V]
EOS = 0


class FakeDetok:
    def __init__(self, tok):
        self.tok = tok
        self.text = ""

    def push(self, token_id):
        piece = "" if self.tok.is_special(token_id) else ALPHA[token_id]
        self.text += piece
        return piece

    def finish(self):
        return ""


class FakeTokenizer:
    eos_token_id = EOS
    pad_token_id = 1
    vocab_size = V

    def encode(self, text):
        return [ALPHA.index(c) for c in text]

    def render_chat(self, messages, tools=None, documents=None):
        # no template: the turns' text, one after another (serve/engine_client.py PromptTokenizer)
        return "".join(m["content"] for m in messages)

    def decode(self, ids, skip_special_tokens=False):
        return "".join("<eos>" if i == EOS else ALPHA[i] for i in ids)

    def is_special(self, token_id):
        return token_id == EOS

    def token_text(self, token_id):
        return self.decode([token_id])

    def detokenizer(self):
        return FakeDetok(self)


class FakeRunner:
    """Next token = (last fed token + 1) % V, or `script[last]` when given. Runs with a real allocator."""

    asynchronous = False  # True: the engine emits a step's events after launching the next one
    snapshot_copier = None  # no state pool: the engine runs without a prefix cache
    adapters = None  # no LoRA adapters

    def __init__(self, model_dir, config, script=None, slots=None, blocks=256, delay_s=0.0):
        self.allocator = SlotAllocator(slots or config.max_concurrent_seqs, blocks, 4)
        self.vocab_size = V
        self.device, self.dtype, self.num_parameters = "cpu", "float32", 0
        self.opened = {}  # slot -> params of the sequence opened there
        self.script = script or {}
        self.fail_next = 0  # fail this many step() calls
        self.gate: threading.Event | None = None  # when set, step() waits for it
        self.batches = []
        self.delay_s = delay_s  # seconds per step(): a slow model

    def warmup(self):
        pass

    def bind_thread(self):
        self.bound_threads = [*getattr(self, "bound_threads", []), threading.current_thread().name]

    def open(self, slot, params, seed, context_ids, processor=None):
        assert self.allocator.is_allocated(slot)
        self.opened[slot] = params
        self.processors = {**getattr(self, "processors", {}), slot: processor}

    def after_failure(self, exc):
        self.failures = getattr(self, "failures", 0) + 1

    def memory_report(self):
        return {"pool_state_bytes": 0, "pool_kv_bytes": 0}

    def launch(self, batch):
        return self.step(batch)

    def collect(self, pending):
        return pending

    def step(self, batch):
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        for c in batch.chunks:
            assert self.allocator.is_allocated(c.slot) and c.slot in self.opened
            assert c.start + len(c.token_ids) <= self.allocator.capacity(c.slot)
        self.batches.append(batch)
        if self.fail_next:
            self.fail_next -= 1
            import torch  # here, so importing this module stays torch-free (batch subprocess tests)

            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        toks = [self.script.get(c.token_ids[-1], (c.token_ids[-1] + 1) % V) for c in batch.chunks if c.want_logits]
        return StepOutput(toks, [-1e-6] * len(toks), [[] for _ in toks])


ENGINES: list[Engine] = []


def real_engine(ckpt, **cfg) -> Engine:
    """A started Engine on a real checkpoint (the tiny one in tests) with small limits, kept in ENGINES for
    check_pools_and_shut_down."""
    base = dict(device="cpu", dtype="float32", max_concurrent_seqs=4, max_input_tokens=200, max_total_tokens=256,
                kv_cache_tokens=2048, max_step_tokens=64, prefill_chunk_tokens=16)
    eng = Engine(ckpt, EngineConfig(**{**base, **cfg}), "tiny")
    eng.start()
    assert eng.wait_ready(120), eng.error
    ENGINES.append(eng)
    return eng


def fake_engine(script=None, slots=4, blocks=256, delay_s=0.0, name="fake", **cfg) -> Engine:
    defaults = dict(max_concurrent_seqs=slots, max_input_tokens=100, max_total_tokens=200, max_step_tokens=64,
                    prefill_chunk_tokens=16, max_queued_requests=16)
    defaults.update(cfg)
    config = EngineConfig(**defaults)
    eng = Engine(Path("/nonexistent"), config, name,
                 runner_factory=lambda d, c: FakeRunner(d, c, script, slots, blocks, delay_s),
                 tokenizer_factory=lambda d: FakeTokenizer())
    eng.start()
    assert eng.wait_ready(10), eng.error
    ENGINES.append(eng)
    return eng


def req(prompt, **params) -> GenerationRequest:
    ids = [ALPHA.index(c) for c in prompt] if isinstance(prompt, str) else list(prompt)
    return GenerationRequest(tuple(ids), SamplingParams(**params))


def wait_idle(eng: Engine, timeout=20.0):
    end = time.monotonic() + timeout
    while eng.scheduler.has_work() and time.monotonic() < end:
        time.sleep(0.01)


def wait_free(engine, timeout=20.0) -> dict:
    """Wait until the engine (real or fake) reports every slot free and nothing queued; returns its stats."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["free_slots"] == s["total_slots"] and s["running"] == 0 and s["waiting"] == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"slots not freed: {engine.stats()}")


# ---- prefix cache ------------------------------------------------------------------------------

BS = 4  # ListCopier's KV block size


class ListCopier:
    """Slot state = the token ids it holds; KV block = a list of BS token ids (None = garbage)."""

    state_bytes = 100
    kv_block_bytes = 40
    layout = "list-copier"

    def __init__(self, slots: int, blocks: int) -> None:
        self.state = [None] * slots
        self.kv = [[None] * BS for _ in range(blocks)]

    def host_bytes(self, n_tokens):
        return self.state_bytes + n_tokens * (self.kv_block_bytes // BS)

    def save(self, slot):
        return tuple(self.state[slot])

    def to_host(self, saved, blocks, n_tokens):
        return saved, tuple(self.kv[blocks[p // BS]][p % BS] for p in range(n_tokens))

    def restore_device(self, saved, slot, src, dst, n_tokens):
        self.state[slot] = list(saved)
        if n_tokens % BS:
            self.kv[dst[n_tokens // BS]] = list(self.kv[src[n_tokens // BS]])

    def fork(self, src_slot, dst_slot, src, dst, n_tokens):
        self.restore_device(tuple(self.state[src_slot][:n_tokens]), dst_slot, src, dst, n_tokens)

    def restore_host(self, packed, slot, dst, n_tokens):
        saved, toks = packed
        self.state[slot] = list(saved)
        for p, t in enumerate(toks):
            self.kv[dst[p // BS]][p % BS] = t

    def to_bytes(self, packed):
        """The disk tier's bytes: zlib'd pickle padded to host_bytes(n), the size the cache accounts."""
        raw = zlib.compress(pickle.dumps(packed))
        size = self.host_bytes(len(packed[1]))
        assert len(raw) + 4 <= size, "ListCopier's values are too big for its accounted bytes"
        return memoryview(len(raw).to_bytes(4, "little") + raw + bytes(size - len(raw) - 4))

    def from_bytes(self, data, n_tokens):
        n = int.from_bytes(data[:4], "little")
        return pickle.loads(zlib.decompress(data[4:4 + n]))

    # what a step does: fold tokens into a slot and write their KV
    def feed(self, alloc, slot, start, toks):
        table = alloc.block_table(slot)
        self.state[slot] = (self.state[slot] or [])[:start] + list(toks)
        for i, t in enumerate(toks):
            p = start + i
            self.kv[table[p // BS]][p % BS] = t

    def kv_of(self, alloc, slot, n):
        table = alloc.block_table(slot)
        return [self.kv[table[p // BS]][p % BS] for p in range(n)]


# ---- batch ----

def fake_infer(record: str, defaults: dict | None = None, delay_s: float = 0.0):
    """Same contract as serve.handler.handle_record bound to an engine: never raises, errors are objects."""
    if delay_s:
        time.sleep(delay_s)
    try:
        obj = json.loads(record)
    except ValueError:
        return {"error": "record is not valid JSON", "error_type": "invalid_request", "status": 400}
    if isinstance(obj, str):
        obj = {"inputs": obj}
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), str):
        return {"error": "expected {'inputs': str}", "error_type": "invalid_request", "status": 400}
    params = {**(defaults or {}), **obj.get("parameters", {})}
    # a fake "generation" that depends on the prompt and the seed, like sampling would
    digest = hashlib.sha256(f"{obj['inputs']}|{params.get('seed')}".encode()).hexdigest()[:8]
    n = int(params.get("max_new_tokens", 3))
    return [{"generated_text": f"<{obj['inputs']}:{digest}>", "details": {"finish_reason": "length",
                                                                          "generated_tokens": n}}]


# ---- boto3 ----

class FakeSession:
    """Stands in for boto3.Session in a script's main(): hands out the (stubbed) clients given."""

    region_name = "us-east-1"

    def __init__(self, **clients) -> None:
        self.clients = clients

    def client(self, name: str):
        return self.clients[name.replace("-", "_")]


def check_pools_and_shut_down(engines: list[Engine]) -> None:
    """After a test: each started engine, once idle, has every slot and KV block free again and its
    prefix-cache snapshots dropped to zero bytes; then every engine is shut down and the list emptied."""
    try:
        for eng in engines:
            if eng.scheduler is None:
                continue
            wait_idle(eng)
            assert not eng.scheduler.has_work()
            eng.clear_prefix_cache()  # snapshots hold KV blocks on purpose; dropped, they must all come back
            alloc, stats = eng.runner.allocator, eng.stats()
            assert alloc.num_free_slots == alloc.num_slots, "slot leak"
            assert alloc.num_free_blocks == alloc.num_blocks, "KV block leak"
            assert stats["free_slots"] == alloc.num_slots
            pc = stats.get("prefix_cache")
            if pc is not None:
                assert pc["bytes_device"] == 0 and pc["bytes_host"] == 0 and pc["kv_blocks_held"] == 0
                assert pc["bytes_disk"] == 0, "snapshot files left (a session not released?)"
            ad = getattr(eng.runner, "adapters", None)
            if ad is not None:  # [LoRA] no sequence holds or binds an adapter; removed ones are freed
                assert all(i == -1 for i in ad.slot_index), "adapter slot binding leak"
                assert all(e.holds == 0 and not e.users for e in ad._entries.values()), "adapter hold leak"
                assert all(not e.removed for e in ad._entries.values()), "a removed adapter was not freed"
    finally:
        for eng in engines:
            eng.shutdown(5)
        engines.clear()
