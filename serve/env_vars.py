"""The environment table: every variable the server reads, with its default, meaning and parser.

Pure data and parsing (torch-free, no access to the process environment): serve/config.py reads the
environment through `read(env)`, once, into frozen dataclasses; `describe()` is the README's table of
variables (tests/test_readme.py checks that every row is there). The engine's knobs take their defaults
from EngineConfig and their name from its field (`MAX_STEP_TOKENS` is `max_step_tokens`): a new engine
knob is its field plus one row here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from model.checkpoint.signing import MODES as SIGNATURE_MODES
from model.types import DTYPES, KERNEL_MODES, SSM_STATE_DTYPES, EngineConfig, SamplingParams

SAGEMAKER_MAX_PAYLOAD_MB = 6  # SageMaker's real-time limit: 6 MiB = 6,291,456 bytes each way
BATCH_MAX_PAYLOAD_MB = 100  # batch transform's largest MaxPayloadInMB: never 413 a payload SageMaker may send
REALTIME_TIMEOUT_S = 60  # SageMaker's real-time invocation timeout
DEFAULT_MAX_NEW_TOKENS = SamplingParams.max_new_tokens  # the one default length, SamplingParams' own
_ENGINE = EngineConfig()
DISK_BYTES = 8 << 30  # the server's disk tier (the engine's own default is none: EngineConfig)


class ConfigError(ValueError):
    """An environment variable holds a value the server cannot start with."""


# ---- parsers: raw string -> value, ValueError with a short reason ----

def _int(lo: int = 0, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"must be >= {lo}" if hi is None else f"must be {lo}..{hi}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError("not a number") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be {lo:g}..{hi:g}")
        return value

    return parse


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _choice(*options: str, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in options:
            raise ValueError(f"expected one of {'|'.join(options)}")
        return value

    return parse


def _seconds(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not 0 <= value < 1e7:
        raise ValueError("must be >= 0 seconds")
    return value


def _str(raw: str) -> str:
    return raw.strip()


def _device(raw: str) -> str:
    value = raw.strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError("expected auto|cpu|cuda|cuda:N")


def _paths(raw: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in raw.split(",") if x.strip())


def _gpu_list(raw: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in raw.split(",") if x.strip())
    return tuple(x for x in items if x not in ("-1", "NoDevFiles"))


def _sources(raw: str) -> tuple[tuple[str, str], ...]:
    """ADAPTERS: "name=src[,name=src...]"."""
    out = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        name, eq, src = item.partition("=")
        if not eq or not name.strip() or not src.strip():
            raise ValueError(f"expected name=src, got {item!r}")
        out.append((name.strip(), src.strip()))
    return tuple(out)


@dataclass(frozen=True)
class Var:
    name: str
    default: Any  # what an unset (or empty) variable means
    meaning: str
    parse: Callable[[str], Any] = _str


def _engine(name: str, meaning: str, parse: Callable[[str], Any]) -> Var:
    """An EngineConfig knob: the variable is its field's name in upper case, the default is the field's."""
    return Var(name, getattr(_ENGINE, name.lower()), meaning, parse)


VARS: tuple[Var, ...] = (
    Var("SAGEMAKER_BIND_TO_PORT", None, "Port SageMaker asks the server to listen on (wins over PORT).",
        _int(1, 65535)),
    Var("PORT", 8080, "Port for local runs when SAGEMAKER_BIND_TO_PORT is unset.", _int(1, 65535)),
    Var("HOST", "0.0.0.0", "Address to bind (make serve binds 127.0.0.1).", _str),
    Var("SAGEMAKER_MODEL_SERVER_WORKERS", None,
        "gunicorn workers (engine replicas); default one per GPU, 1 on CPU.", _int(1)),
    Var("SAGEMAKER_MODEL_SERVER_TIMEOUT", 3600, "gunicorn worker timeout in seconds.", _int(1)),
    Var("GRACEFUL_TIMEOUT", 25,
        "Seconds SIGTERM waits for in-flight requests (SageMaker kills 30 s after SIGTERM); streams still "
        "running 3 s before it end with an error event.", _int(2, 3600)),
    Var("SAGEMAKER_MAX_PAYLOAD_IN_MB", SAGEMAKER_MAX_PAYLOAD_MB,
        "Largest request body in MiB (6 = SageMaker's 6,291,456 bytes; 100 when SAGEMAKER_BATCH is set); "
        "larger bodies get 413.", _int(1)),
    Var("REQUEST_TIMEOUT", REALTIME_TIMEOUT_S,
        "Seconds a non-streaming request may run before it is stopped with 504 (SageMaker gives up after 60 s and "
        "botocore retries); 0 = none, the default when SAGEMAKER_BATCH is set.", _seconds),
    Var("SESSION_TTL", 1200,
        "Seconds an idle SageMaker stateful session (SessionId) lives; each request restarts its clock.",
        _int(1, 7 * 24 * 3600)),
    Var("MAX_N", 8, "Most rows one request may ask for: OpenAI `n` / `best_of`, TGI `best_of` (also at most "
        "MAX_CONCURRENT_SEQS); more: 422.", _int(1)),
    Var("SESSION_MAX", 64,
        "Open sessions per worker; each holds its conversation's state pinned (~37 MiB of Mamba state + "
        "8 KiB of KV per token for the full-size model); more get 429 until one closes or expires.", _int(1)),
    Var("MEMORY_ARENAS", 2,
        "At most this many glibc malloc arenas per worker (M_ARENA_MAX; 0 = glibc's default, 8 x cores): fewer "
        "arenas hold less freed memory that no cache accounts for (serve/memory.py).", _int(0)),
    Var("MEMORY_TRIM", True,
        "Give free malloc pages back to the OS (malloc_trim) each time a worker's engine goes idle after work.", _bool),
    Var("SAGEMAKER_BATCH", False, "Set by batch transform (true/True): payload limit defaults to 100 MiB.", _bool),
    Var("SAGEMAKER_BATCH_STRATEGY", "MULTI_RECORD",
        "BatchStrategy reported by /execution-parameters.", _choice("SINGLE_RECORD", "MULTI_RECORD", upper=True)),
    Var("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", None,
        "MaxConcurrentTransforms reported by /execution-parameters; default workers x engine slots.", _int(1)),
    Var("MODEL_DIR", "/opt/ml/model", "Directory holding a Hugging Face checkpoint (used unless MODEL_ID=demo).", _str),
    Var("HF_MODEL_ID", None, "Hugging Face Hub model id downloaded at start when MODEL_DIR has no model.", _str),
    Var("HF_MODEL_REVISION", None, "Revision (branch, tag or commit) of HF_MODEL_ID.", _str),
    Var("HF_TOKEN", None, "Token for gated/private HF_MODEL_ID downloads (never logged).", _str),
    Var("MODEL_ID", None, "'demo': serve the built-in demo model (random weights, meaningless text); wins over MODEL_DIR.", _str),
    Var("MODEL_CACHE_DIR", "/tmp/granite-h-cache", "Writable directory for downloads and the demo model.", _str),
    Var("MODEL_SIGNATURE", "verify",
        "Checkpoint signature check before weights load: off, verify (when a signature is present), require.",
        _choice(*SIGNATURE_MODES)),
    Var("MODEL_SIGNATURE_FILE", "model.sig", "The model-signing bundle: relative to the checkpoint folder, or absolute.",
        _str),
    Var("MODEL_SIGNATURE_PUBLIC_KEY", None, "PEM public key the checkpoint was signed with (key method).", _str),
    Var("MODEL_SIGNATURE_CERT_CHAIN", None,
        "PEM file(s), comma-separated, with the CA chain of the signing certificate (certificate method).", _paths),
    Var("MODEL_SIGNATURE_IDENTITY", None, "Keyless sigstore: the signer identity (certificate SAN) to require.", _str),
    Var("MODEL_SIGNATURE_ISSUER", None, "Keyless sigstore: the OIDC issuer of that identity.", _str),
    Var("MODEL_SIGNATURE_TRUST_CONFIG", None,
        "Keyless sigstore trust root: a ClientTrustConfig JSON path (offline), 'bundled' (sigstore release's copy, "
        "offline) or 'tuf' (downloaded at start).", _str),
    Var("MODEL_SIGNATURE_IGNORE_PATHS", None,
        "Comma-separated paths (relative to the checkpoint) left out of the check.", _paths),
    Var("MODEL_SIGNATURE_IGNORE_UNSIGNED", False, "Ignore files the signature does not list instead of refusing.",
        _bool),
    Var("MAX_INPUT_TOKENS", None, "Longest prompt accepted (longer: 422); unset: MAX_TOTAL_TOKENS - 1.", _int(1)),
    Var("MAX_TOTAL_TOKENS", None,
        "Prompt + generated tokens per sequence; unset: the checkpoint's context length (max_position_embeddings, "
        "131,072 for micro). Sequences are admitted by KV memory; the server refuses to start if one sequence this "
        "long cannot fit the KV pool.", _int(2)),
    _engine("MAX_CONCURRENT_SEQS", "Sequences generated at once (state-pool slots).", _int(1)),
    _engine("MAX_QUEUED_REQUESTS", "Waiting requests beyond this are refused with 429.", _int(1)),
    Var("MAX_NEW_TOKENS", DEFAULT_MAX_NEW_TOKENS,
        "max_new_tokens when a request does not say (unset: at most MAX_TOTAL_TOKENS - 1).", _int(1)),
    _engine("MAX_STEP_TOKENS", "Tokens run per engine step (prefill chunks + one per decoding sequence).", _int(1)),
    _engine("PREFILL_TIME_SHARE",
            "> 0: while sequences decode, bound a step's prefill by measured time to about this share of a "
            "decode-only step (steadier decode cadence, slower prefill); 0 = off (token budget only).",
            _float(0.0, 100.0)),
    _engine("PREFILL_CHUNK_TOKENS", "Prompts are prefilled in chunks of this.", _int(1)),
    _engine("KV_CACHE_TOKENS", "KV pool size in tokens across all sequences; 0 = auto.", _int(0)),
    _engine("DTYPE", "Weights/activations: auto, float32, bfloat16, float16 (auto: bf16 on CUDA, fp32 on CPU).",
            _choice(*DTYPES)),
    _engine("SSM_STATE_DTYPE", "Mamba state dtype: auto, float32, bfloat16.", _choice(*SSM_STATE_DTYPES)),
    _engine("DEVICE", "auto, cpu, cuda, cuda:N.", _device),
    _engine("CUDA_GRAPHS", "Capture decode steps as CUDA graphs (CUDA only).", _bool),
    _engine("KERNELS", "auto, fused, reference (fused needs CUDA + mamba-ssm).", _choice(*KERNEL_MODES)),
    _engine("PREFIX_CACHE",
            "Resume prompts that start with a finished prompt or conversation from its exact state snapshot.", _bool),
    _engine("SNAPSHOT_DEVICE_SHARE",
            "Prefix-cache snapshots kept on the device, as a share of the state pool's bytes (0..1).",
            _float(0.0, 1.0)),
    _engine("SNAPSHOT_HOST_BYTES",
            "Bytes of host memory (pinned on CUDA) for snapshots moved off the device; 0 = none.", _int(0)),
    _engine("SNAPSHOT_BOUNDARY_TOKENS",
            "A chat prompt whose system part (system prompt + tools + documents) has at least this many tokens gets a "
            "snapshot where that part ends, so other requests with the same system part resume there.", _int(1)),
    _engine("SNAPSHOT_INTERVAL_TOKENS",
            "Raw prompts (TGI inputs, completions): a snapshot every this many tokens once the same prefix is seen a "
            "second time; 0 = off.", _int(0)),
    Var("SNAPSHOT_DISK_DIR", "/tmp/granite-h-snapshots",
        "Directory of the disk tier: snapshots spilled from host memory and the state of stateful sessions, which "
        "a restarted worker finds again (one subfolder per worker).", _str),
    Var("SNAPSHOT_DISK_BYTES", DISK_BYTES,
        "Bytes of snapshot files in SNAPSHOT_DISK_DIR per worker (least recently used out; session files pinned); "
        "0 = no disk tier, and sessions die with their worker.", _int(0)),
    _engine("MAX_LORAS", "LoRA adapters on the device at once (requests of more adapters wait for a slot); 0 = "
            "adapters off. Their memory (MAX_LORAS x MAX_LORA_RANK x sum of the targeted projections' in + out, "
            "in the weights' dtype) is taken before the KV pool is sized.", _int(0, 1024)),
    _engine("MAX_LORA_RANK", "Largest LoRA rank accepted (larger adapters are refused with 400).", _int(1, 1024)),
    _engine("LORA_HOST_BYTES", "Host memory for registered adapters' weights (least recently used are dropped and "
            "read again from disk when next used).", _int(0)),
    Var("ADAPTERS", None, "LoRA adapters registered at start: name=src[,name=src...] (src a local folder, .tar.gz or "
        "s3:// URI); folders under MODEL_DIR/adapters/<name>/ are registered too.", _sources),
    Var("ADAPTER_SRC_ROOTS", None, "Comma-separated local folders an adapter src may be in (unset: /opt/ml; "
        "MODEL_CACHE_DIR always); any other path is refused.", _paths),
    Var("ADAPTER_REGISTRY_DIR", None, "Folder where the gunicorn workers share adapter registrations; `python -m serve "
        "serve` makes a fresh one when unset.", _str),
    Var("SM_NUM_GPUS", None, "GPUs on the instance (set by SageMaker); one worker per GPU.", _int(0)),
    Var("CUDA_VISIBLE_DEVICES", None, "GPUs the server may use; workers are pinned one per listed GPU.", _gpu_list),
    Var("PROMETHEUS_MULTIPROC_DIR", None,
        "Directory where the gunicorn workers' metrics meet, so one /metrics scrape covers the instance; "
        "`python -m serve serve` makes a fresh one when unset.", _str),
    Var("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING, ERROR.", _choice("DEBUG", "INFO", "WARNING", "ERROR", upper=True)),
)


def describe() -> list[dict[str, str]]:
    """Rows for the README table: name, default (as text), meaning."""
    def show(value: Any) -> str:
        if value is None:
            return "(unset)"
        return str(value).lower() if isinstance(value, bool) else str(value)

    return [{"name": v.name, "default": show(v.default), "meaning": v.meaning} for v in VARS]


def is_unset(env: Mapping[str, str], name: str) -> bool:
    return not (env.get(name) or "").strip()


def read(env: Mapping[str, str]) -> dict[str, Any]:
    """Every variable of the table, parsed: name -> value (its default when unset or empty)."""
    values: dict[str, Any] = {}
    for var in VARS:
        if is_unset(env, var.name):
            values[var.name] = var.default
            continue
        try:
            values[var.name] = var.parse(env[var.name])
        except ValueError as e:
            shown = "(hidden)" if var.name == "HF_TOKEN" else repr(env[var.name])
            raise ConfigError(f"{var.name}={shown} is invalid: {e}") from None
    return values
