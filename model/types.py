"""Torch-free types shared by the server, the scheduler and the engine.

Nothing here imports torch: `serve/protocol.py`, `serve/config.py` and `model/engine/scheduler.py`
depend on this module and must stay importable without it.

Size: ~370 lines, on purpose: the shared types and every engine seam (Protocols) in one torch-free file, so
what crosses a seam is read in one place.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: this module stays importable without torch
    import torch


class FailureKind(str, Enum):
    """Why a sequence ended with FinishReason.ERROR (the server maps each to an HTTP status)."""

    OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory in this sequence's step
    SHUTDOWN = "shutdown"  # the server shut down before the sequence finished
    STEP_FAILED = "step_failed"  # any other exception in the step


class FinishReason(str, Enum):
    LENGTH = "length"  # max_new_tokens or the context budget reached
    EOS = "eos_token"  # the model produced an end-of-sequence token
    STOP = "stop_sequence"  # a stop string or stop token id matched
    CANCELLED = "cancelled"  # the client went away or cancel() was called
    ERROR = "error"  # this sequence failed (e.g. CUDA OOM); the engine keeps serving


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters, already validated by serve/protocol.py.

    Greedy when `do_sample` is False or `temperature` == 0.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    typical_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off (HF/CTRL style: divide positive logits)
    frequency_penalty: float = 0.0  # OpenAI style: subtract count * penalty
    presence_penalty: float = 0.0  # OpenAI style: subtract penalty once if present
    seed: int | None = None  # per-request generator; same seed + same prompt = same tokens
    stop: tuple[str, ...] = ()  # stop strings (not included in the output text)
    stop_token_ids: tuple[int, ...] = ()  # extra stop token ids (reported as stop_sequence)
    ignore_eos: bool = False
    logprobs: bool = False  # return the chosen token's logprob (always computed cheaply)
    top_n_tokens: int = 0  # return this many most likely alternatives per step (0 = none)

    @property
    def greedy(self) -> bool:
        return (not self.do_sample) or self.temperature == 0.0


def resolve_seed(params: SamplingParams) -> int | None:
    """The seed a request samples with: its own, or a random one for a sampled request without one
    (reported back, TGI `details.seed`); None for greedy requests without a seed."""
    return params.seed if (params.seed is not None or params.greedy) else secrets.randbits(63)


@dataclass(frozen=True)
class ToolSpec:
    """One declared function of a tool-calling request: its name and its `parameters` JSON schema, as canonical
    JSON text (json.dumps(..., sort_keys=True)) so that equal tools hash equal (the grammar cache key)."""

    name: str
    parameters: str = "{}"


CONSTRAINT_KINDS = ("json", "regex", "tool_calls")
TOOL_MODES = ("required", "auto")


@dataclass(frozen=True)
class Constraint:
    """What a sequence's output must match (grammar-constrained decoding). Torch-free and hashable: the server
    builds it from the request (OpenAI response_format / tool_choice, TGI parameters.grammar), the engine compiles
    it once per distinct value into a per-row logits processor.

    kind "json": `value` a JSON schema as canonical JSON text ("" = any JSON object, OpenAI json_object).
    kind "regex": `value` the pattern; the whole output must match it.
    kind "tool_calls": Granite's own markup, `<tool_call>` {"name", "arguments"} `</tool_call>`, the name one of
    `tools` and the arguments valid against its parameters. tool_mode "required": the output is one call (several
    when `parallel`); "auto": free text, constrained only once the model opens a `<tool_call>`. A named function
    (OpenAI tool_choice {"type": "function", ...}) is "required" with that one tool."""

    kind: str
    value: str = ""
    tools: tuple[ToolSpec, ...] = ()
    tool_mode: str = "required"
    parallel: bool = True

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"constraint kind must be {'|'.join(CONSTRAINT_KINDS)}, got {self.kind!r}")
        if self.tool_mode not in TOOL_MODES:
            raise ValueError(f"tool_mode must be {'|'.join(TOOL_MODES)}, got {self.tool_mode!r}")
        if self.kind == "tool_calls" and not self.tools:
            raise ValueError("a tool_calls constraint needs at least one tool")


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. The server tokenizes; the engine only sees ids."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    # A stateful session (serve side): when the sequence finishes, its snapshot is pinned for this session
    # and Engine.session_conversation(session_id) returns prompt + output ids (see model/engine/prefix_cache.py).
    session_id: str | None = None
    # The output must match this (grammar-constrained decoding); None: free text.
    constraint: Constraint | None = None
    # Prompt positions whose state is worth a snapshot of its own (structural boundaries: where a chat prompt's
    # system part, tools and documents end; serve/prompts.py); the scheduler ends a prefill chunk there. None:
    # the engine's interval policy for raw prompts (EngineConfig.snapshot_interval_tokens); (): none.
    snapshot_at: tuple[int, ...] | None = None
    # A registered LoRA adapter's name (model/runtime/adapters.py); None: the base weights.
    adapter: str | None = None


@dataclass(frozen=True)
class TopToken:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, streamed through a Handle as soon as it is sampled.

    `text` is the newly printable text this token adds (incremental detokenization: it may be
    "" while a multi-byte character or a possible stop string is still incomplete). The last
    event of a sequence has `finish_reason` set; a sequence that fails or is cancelled ends
    with an event whose token_id is -1 and finish_reason ERROR/CANCELLED.
    """

    token_id: int
    text: str
    logprob: float
    special: bool = False
    finish_reason: FinishReason | None = None
    top_tokens: tuple[TopToken, ...] = ()
    error: str | None = None  # set with FinishReason.ERROR
    failure: FailureKind | None = None  # set with FinishReason.ERROR


@dataclass(frozen=True)
class Completion:
    """Everything a non-streaming response needs, collected from a Handle's events."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: tuple[float, ...]
    token_texts: tuple[str, ...]
    specials: tuple[bool, ...]
    top_tokens: tuple[tuple[TopToken, ...], ...]
    seed: int | None
    error: str | None = None
    failure: FailureKind | None = None
    cached_tokens: int = 0  # prompt tokens resumed from the prefix cache (usage.prompt_tokens_details)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


# The allowed values, defined once: EngineConfig checks them, serve/config.py parses the variables with them.
DTYPES = ("auto", "float32", "bfloat16", "float16")
SSM_STATE_DTYPES = ("auto", "float32", "bfloat16")
KERNEL_MODES = ("auto", "fused", "reference")


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits and placement. Built by serve/config.py from the environment."""

    max_concurrent_seqs: int = 32  # slots in the state pool
    max_input_tokens: int = 8192  # longest prompt accepted
    max_total_tokens: int = 16384  # prompt + generated, per sequence
    max_step_tokens: int = 2048  # tokens run per engine step (prefill chunks + one per decoding seq)
    kv_cache_tokens: int = 0  # KV pool size in tokens across all sequences; 0 = auto (see model/runtime/state.py)
    max_queued_requests: int = 256  # waiting requests beyond this are refused (429)
    prefill_chunk_tokens: int = 512  # prompts are prefilled in chunks of at most this many tokens
    # > 0: while sequences decode, a step's prefill is also bounded by measured time, to about this share of a
    # decode-only step (model/engine/scheduler.py StepCost). 0 = off: on the 2-core CPU, 1.5 cut 32-stream throughput
    # to a third and raised TTFT ~4x (prefill starved); kept as a knob until measured where decode is cheap.
    prefill_time_share: float = 0.0
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA, fp32 on CPU)
    ssm_state_dtype: str = "auto"  # auto | float32 | bfloat16 (auto: fp32 on CPU, same as dtype on CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs (CUDA only)
    kernels: str = "auto"  # auto | fused | reference ; fused on a CPU-only machine is an error
    prefix_cache: bool = True  # resume prompts from state snapshots (model/engine/prefix_cache.py)
    snapshot_device_share: float = 0.25  # device tier: this share of the state pool's bytes (KV + slots)
    snapshot_host_bytes: int = 2 << 30  # host tier (pinned on CUDA) in bytes; 0 = no host tier
    # a structural boundary (GenerationRequest.snapshot_at) this far into the prompt or further gets a snapshot
    snapshot_boundary_tokens: int = 256
    # raw prompts (snapshot_at None): a snapshot every this many tokens, once that prefix was seen before; 0 = off
    snapshot_interval_tokens: int = 1024
    # disk tier (model/runtime/disk_tier.py): files under this directory within this many bytes; 0 = none (the
    # engine's default; the server's is on: serve/env_vars.py)
    snapshot_disk_dir: str = ""
    snapshot_disk_bytes: int = 0
    max_loras: int = 0  # LoRA adapters on the device at once (model/runtime/adapters.py); 0 = adapters off
    max_lora_rank: int = 16  # the largest adapter rank accepted (device stacks are padded to it)
    lora_host_bytes: int = 4 << 30  # registered adapters' weights kept on the host (LRU; the rest reload from disk)

    def __post_init__(self) -> None:
        for name in (
            "max_concurrent_seqs",
            "max_input_tokens",
            "max_total_tokens",
            "max_step_tokens",
            "max_queued_requests",
            "prefill_chunk_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(
                f"max_input_tokens ({self.max_input_tokens}) must be < max_total_tokens ({self.max_total_tokens})"
            )
        if self.kv_cache_tokens < 0:
            raise ValueError(f"kv_cache_tokens must be >= 0, got {self.kv_cache_tokens}")
        for name, allowed in (("dtype", DTYPES), ("ssm_state_dtype", SSM_STATE_DTYPES), ("kernels", KERNEL_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {'|'.join(allowed)}, got {getattr(self, name)!r}")
        if self.prefill_time_share < 0:
            raise ValueError(f"prefill_time_share must be >= 0, got {self.prefill_time_share}")
        if not 0.0 <= self.snapshot_device_share <= 1.0:
            raise ValueError(f"snapshot_device_share must be in [0, 1], got {self.snapshot_device_share}")
        if self.max_loras < 0 or self.max_lora_rank < 1 or self.lora_host_bytes < 0:
            raise ValueError(f"max_loras must be >= 0, max_lora_rank >= 1, lora_host_bytes >= 0; got {self.max_loras}, "
                             f"{self.max_lora_rank}, {self.lora_host_bytes}")
        if self.snapshot_host_bytes < 0:
            raise ValueError(f"snapshot_host_bytes must be >= 0, got {self.snapshot_host_bytes}")
        for name in ("snapshot_boundary_tokens", "snapshot_interval_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.snapshot_disk_bytes < 0:
            raise ValueError(f"snapshot_disk_bytes must be >= 0, got {self.snapshot_disk_bytes}")


class ChunkKind(str, Enum):
    """What a chunk does to its slot, set by the scheduler (the runner never infers it from start/length)."""

    FRESH = "fresh"  # the first prefill chunk of a sequence: its Mamba state is zeroed first; start == 0
    CONTINUE = "continue"  # a later prefill chunk: from the slot's state and existing KV; start > 0
    DECODE = "decode"  # the one token sampled last step; start > 0; always wants logits


@dataclass(frozen=True)
class SeqChunk:
    """Work for one sequence in one engine step (torch-free; the runner makes tensors of it)."""

    slot: int  # the sequence's slot in the state pool
    token_ids: tuple[int, ...]  # tokens to feed: a prefill chunk, or the one last sampled token
    start: int  # tokens already folded into the slot's state (= its KV length before this chunk)
    want_logits: bool  # False for a prefill chunk that is not the prompt's last
    kind: ChunkKind

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"empty chunk for slot {self.slot}")
        k = self.kind
        if (k == ChunkKind.FRESH) != (self.start == 0) or (
                k == ChunkKind.DECODE and (len(self.token_ids) != 1 or not self.want_logits)):
            raise ValueError(f"inconsistent {k.value} chunk: start={self.start} tokens={len(self.token_ids)} "
                             f"want_logits={self.want_logits}")

    @classmethod
    def fresh(cls, slot: int, token_ids: tuple[int, ...], want_logits: bool) -> SeqChunk:
        return cls(slot, tuple(token_ids), 0, want_logits, ChunkKind.FRESH)

    @classmethod
    def cont(cls, slot: int, token_ids: tuple[int, ...], start: int, want_logits: bool) -> SeqChunk:
        return cls(slot, tuple(token_ids), start, want_logits, ChunkKind.CONTINUE)

    @classmethod
    def decode(cls, slot: int, token_id: int, start: int) -> SeqChunk:
        return cls(slot, (token_id,), start, True, ChunkKind.DECODE)


@dataclass(frozen=True)
class StepBatch:
    chunks: tuple[SeqChunk, ...]


@dataclass(frozen=True)
class StepOutput:
    """What a runner step returns: one entry per chunk with want_logits, in chunk order."""

    token_ids: list[int]
    logprobs: list[float]  # of the chosen token under the processed distribution
    top: list[list[tuple[int, float]]]  # per row: up to top_n_tokens (token_id, logprob), best first


class LogitsProcessor(Protocol):
    """A per-row constraint on the next token (where a grammar's mask goes), bound to a slot with the runner's
    open(..., processor=). Host-side only: the sampler (model/runtime/sampling.py) owns the mask buffers and applies
    the step's masks on the device batched over the rows (one op per step, the rows without a processor all
    True), before penalties, temperature, top-k/p and logprobs.

    fill runs once per step that samples the row, after the step's forward is launched and before its
    sampling (on CUDA: on the host while the device runs the forward). `allowed` is the row's (V,) bool host
    tensor, all True on entry: set False every token the row may not pick (at least one must stay True).
    `chunk` is what the step feeds the row: a DECODE chunk's one token is the token sampled for this row last
    step (a grammar advances on it here); the first fill sees the prompt's last prefill chunk.

    Optional: a class may define `fill_rows(processors, allowed, rows, chunks)` (a classmethod), which the
    sampler then calls once per step for all its instances in the step instead of their fill(): `allowed` is
    a numpy view of the step's host mask (all True on entry; rows beyond the step's are not its), rows[i] the
    batch row of processors[i] and chunks[i] its chunk (model/grammar computes its rows' masks in parallel
    there; numpy: no torch intra-op pool to wake for host work)."""

    def fill(self, allowed: torch.Tensor, chunk: SeqChunk) -> None: ...


class RowProcessor(LogitsProcessor, Protocol):
    """A LogitsProcessor the engine made for one sequence (a grammar's matcher): close() when the sequence ends
    (finished, cancelled, failed) frees what it holds; a fill after close leaves every token allowed."""

    def close(self) -> None: ...


class GrammarCompiler(Protocol):
    """Constraint -> a new sequence's row processor (model/grammar: compiled once per distinct constraint, a
    bounded cache; the per-row matcher is new each call). Called by Engine.submit on the caller's thread, so a
    slow compile never holds up the engine loop. Raises GrammarError for a constraint it cannot compile."""

    def processor(self, constraint: Constraint) -> RowProcessor: ...


class RequestError(Exception):
    """The one error type the server answers with: JSON {"error": message, "error_type"} and `status`.
    Subclasses set their status and error_type as class attributes; an instance may override both."""

    status = 500
    error_type = "internal"

    def __init__(self, message: str = "", status: int | None = None, error_type: str | None = None) -> None:
        message = message if len(message) <= 500 else message[:497] + "..."  # user text may be echoed
        super().__init__(message)
        self.message = message or self.error_type
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type


class EngineError(RequestError):
    """Raised by the engine (model/engine/engine.py submit)."""

    error_type = "engine_error"


class InvalidRequest(EngineError):
    status = 400
    error_type = "invalid_request"


class QueueFull(EngineError):
    status = 429
    error_type = "queue_full"


class InputTooLong(EngineError):
    status = 422
    error_type = "input_too_long"


class EngineNotReady(EngineError):
    status = 503
    error_type = "not_ready"


class GrammarError(EngineError):
    """A constraint the grammar engine refuses: 400 for an invalid schema / regex / tool list or one over the
    size limits, 422 (status=422, error_type "unsupported_grammar") for a valid one using a feature the engine
    cannot compile or too complex to compile within the limits. The message names the problem and quotes the
    grammar engine's own."""

    status = 400
    error_type = "invalid_grammar"


ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a LoRA adapter's name (also a file name)


class AdapterNotFound(EngineError):
    status = 404
    error_type = "adapter_not_found"


class AdapterExists(EngineError):
    status = 409
    error_type = "adapter_exists"


class AdapterInvalid(EngineError):
    status = 400
    error_type = "invalid_adapter"


# ---- the engine's seams (typed; tests implement them with fakes) ---------------------------------------


class Allocator(Protocol):
    num_slots: int
    num_blocks: int
    block_size: int

    @property
    def num_free_slots(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def max_tokens_per_seq(self) -> int: ...
    def can_allocate(self, n_tokens: int) -> bool: ...
    def allocate(self, n_tokens: int) -> int: ...
    def free(self, slot: int) -> None: ...


class Copier(Protocol):
    """Tensor copies between the state pool and snapshot storage (model/runtime/snapshots.py), for the torch-free prefix
    cache (model/engine/prefix_cache.py). Storage values are the copier's own (tensors), opaque to the cache."""

    state_bytes: int  # one snapshot's Mamba state (conv + SSM, all layers)
    kv_block_bytes: int  # one KV block, all attention layers, K and V
    layout: str  # dtypes and shapes of a host buffer's parts: part of a disk file's identity

    def save(self, slot: int) -> object: ...  # the slot's Mamba state, copied on the device
    def to_host(self, saved: object, blocks: list[int], n_tokens: int) -> object: ...  # one host buffer
    def host_bytes(self, n_tokens: int) -> int: ...
    def restore_device(self, saved: object, slot: int, src: list[int], dst: list[int], n_tokens: int) -> None: ...
    def restore_host(self, packed: object, slot: int, dst: list[int], n_tokens: int) -> None: ...
    # the disk tier's side: a host buffer as host_bytes(n) bytes (may wait for its device copy: called off the
    # engine loop, by the disk tier's writer) and back
    def to_bytes(self, packed: object) -> memoryview: ...
    def from_bytes(self, data: memoryview, n_tokens: int) -> object: ...
    # a fork: src_slot's state into dst_slot, and the partial last of src's blocks of the n tokens into dst's
    def fork(self, src_slot: int, dst_slot: int, src: list[int], dst: list[int], n_tokens: int) -> None: ...


class SnapshotStore(Protocol):
    """The prefix cache's disk tier (model/runtime/disk_tier.py DiskTier): snapshot files and session pins, checked
    on read. The cache decides what goes there and accounts the bytes (file_size) before each write."""

    budget: int  # bytes of files

    def file_size(self, namespace: str, ids: Sequence[int], payload_len: int) -> int: ...
    def write(self, namespace: str, ids: Sequence[int], packed: object, payload_len: int) -> str | None: ...
    def read(self, key: str, namespace: str, ids: Sequence[int]) -> memoryview | None: ...  # None: gone/discarded
    def delete(self, key: str) -> None: ...
    def write_pin(self, session: str, key: str, conversation: Sequence[int]) -> None: ...
    def delete_pin(self, session: str) -> None: ...
    def wait_pin(self, session: str, timeout: float) -> bool: ...
    def flush(self, timeout: float) -> bool: ...  # every queued write done
    def close(self) -> None: ...  # stop the writer once its queue is empty
    def scan(self) -> tuple[list, dict]: ...  # (valid files, oldest first; {session: (key, conversation)})
    def stats(self) -> dict: ...


class AdapterSlots(Protocol):
    """The LoRA adapters a runner serves (model/runtime/adapters.py AdapterPool), as the torch-free engine and
    scheduler see them. Registered adapters live on the host; a sequence's adapter is held from submit to its end
    (hold / release: an adapter being removed refuses new holds and is freed after its last release) and bound
    to the sequence's slot while it has one (can_bind / bind / unbind: at most max_loras distinct adapters on the
    device at once; admission waits for a device slot)."""

    max_loras: int
    max_rank: int

    def register(self, name: str, path: str) -> dict: ...  # AdapterInvalid (400), AdapterExists (409)
    def unregister(self, name: str) -> None: ...  # AdapterNotFound (404)
    def list(self) -> list[dict]: ...
    def hold(self, name: str) -> str: ...  # -> the adapter's prefix-cache namespace; AdapterNotFound
    def release(self, name: str) -> None: ...
    def can_bind(self, name: str) -> bool: ...
    def bind(self, slot: int, name: str) -> None: ...
    def unbind(self, slot: int) -> None: ...


class Runner(Protocol):
    """What the engine needs of model/runtime/runner.py's ModelRunner (tests/test_protocols.py checks it and the fakes)."""

    allocator: Allocator
    vocab_size: int
    device: str
    dtype: str
    num_parameters: int

    asynchronous: bool  # launch() returns before the device is done (CUDA); False: it computes (CPU)
    snapshot_copier: Copier | None  # the prefix cache's tensor side; None: no state pool to snapshot (a fake)
    adapters: AdapterSlots | None  # LoRA adapters (MAX_LORAS > 0); None: base weights only

    def warmup(self) -> None: ...
    def bind_thread(self) -> None: ...  # make the runner's device the calling thread's current one (the loop's)
    def open(self, slot: int, params: SamplingParams, seed: int | None, context_ids: Sequence[int],
             processor: LogitsProcessor | None = None) -> None: ...
    def launch(self, batch: StepBatch) -> object: ...  # queue the step (forward + sampling) on the device
    def collect(self, pending: object) -> StepOutput: ...  # wait for it: the step's one device-to-host sync
    def after_failure(self, exc: Exception) -> None: ...  # e.g. release cached device memory after an OOM
    def memory_report(self) -> dict: ...  # bytes of the state pool by part (pool_state_bytes, pool_kv_bytes, ...)


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...  # newly printable text
    def finish(self) -> str: ...  # dangling bytes at the end of the stream


class Tokenizer(Protocol):
    """What the engine needs of model/text/tokenizer.py's Tokenizer."""

    eos_token_id: int | None

    def is_special(self, token_id: int) -> bool: ...
    def token_text(self, token_id: int) -> str: ...
    def detokenizer(self) -> Detokenizer: ...
