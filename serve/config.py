"""Every environment variable the server reads, read once here into frozen dataclasses.

`load_config(env)` parses and validates; a bad value fails at start with a message naming the
variable. `describe()` returns the table of variables (name, default, meaning) for the README.
No other module reads the environment. torch is never imported here.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from model.signing import MODES as SIGNATURE_MODES
from model.signing import SignaturePolicy
from model.types import DTYPES, KERNEL_MODES, SSM_STATE_DTYPES, EngineConfig

_ENGINE_DEFAULTS = EngineConfig()
SAGEMAKER_MAX_PAYLOAD_MB = 6  # SageMaker's real-time limit: 6 MiB = 6,291,456 bytes each way
DEFAULT_MAX_NEW_TOKENS = 256
REALTIME_TIMEOUT_S = 60  # SageMaker's real-time invocation timeout
BATCH_MAX_PAYLOAD_MB = 100  # batch transform's largest MaxPayloadInMB: never 413 a payload SageMaker may send


class ConfigError(ValueError):
    """An environment variable holds a value the server cannot start with."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1  # gunicorn workers = engine replicas, one per GPU
    timeout_s: int = 3600  # gunicorn worker timeout; batch transform invocations may last 3600 s
    graceful_timeout_s: int = 25  # SIGTERM drain; SageMaker sends SIGKILL 30 s after SIGTERM
    max_payload_bytes: int = SAGEMAKER_MAX_PAYLOAD_MB * 1024 * 1024
    batch: bool = False
    batch_strategy: str = "MULTI_RECORD"
    max_concurrent_transforms: int | None = None  # None: derived from engine slots
    default_max_new_tokens: int = 256
    request_timeout_s: float | None = 60.0  # non-streaming real-time requests; None = no deadline (batch)
    gpu_ids: tuple[str, ...] = ()  # devices visible to the server; one worker each
    log_level: str = "INFO"
    metrics_dir: str | None = None  # prometheus-client multiprocess directory (gunicorn); None: one process
    session_ttl_s: float = 1200.0  # SageMaker stateful sessions: idle time before a session expires
    session_max: int = 64  # open sessions per worker (each pins a ~37 MiB state snapshot + its KV)

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        for name in ("workers", "timeout_s", "max_payload_bytes", "default_max_new_tokens", "session_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_strategy not in ("SINGLE_RECORD", "MULTI_RECORD"):
            raise ValueError(f"batch_strategy must be SINGLE_RECORD|MULTI_RECORD, got {self.batch_strategy!r}")
        if self.max_concurrent_transforms is not None and self.max_concurrent_transforms < 1:
            raise ValueError(f"max_concurrent_transforms must be >= 1, got {self.max_concurrent_transforms}")


@dataclass(frozen=True)
class ModelSource:
    model_dir: str = "/opt/ml/model"
    hf_model_id: str | None = None
    hf_revision: str | None = None
    hf_token: str | None = field(default=None, repr=False)  # never logged
    model_id: str | None = None  # "demo": the built-in random-weight demo model
    cache_dir: str = "/tmp/granite-h-cache"


@dataclass(frozen=True)
class Context:
    """MAX_INPUT_TOKENS / MAX_TOTAL_TOKENS / MAX_NEW_TOKENS as set; None: unset (from the checkpoint)."""

    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelSource = field(default_factory=ModelSource)
    # Until with_context() has seen the checkpoint, the context limits here are provisional.
    engine: EngineConfig = field(default_factory=EngineConfig)
    context: Context = field(default_factory=Context)
    signature: SignaturePolicy = field(default_factory=SignaturePolicy)

    @property
    def threads(self) -> int:
        # gthread threads per worker: every running or queued request holds one while it waits, and
        # /ping must always find a free one, so leave headroom above the engine's slots + queue.
        return max(256, self.engine.max_concurrent_seqs + self.engine.max_queued_requests + 64)


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


@dataclass(frozen=True)
class Var:
    name: str
    default: Any  # what an unset (or empty) variable means
    meaning: str
    parse: Callable[[str], Any] = _str


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
    Var("SESSION_MAX", 64,
        "Open sessions per worker; each holds its conversation's state pinned (~37 MiB of Mamba state + "
        "8 KiB of KV per token for the full-size model); more get 429 until one closes or expires.", _int(1)),
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
    Var("MAX_CONCURRENT_SEQS", _ENGINE_DEFAULTS.max_concurrent_seqs,
        "Sequences generated at once (state-pool slots).", _int(1)),
    Var("MAX_QUEUED_REQUESTS", _ENGINE_DEFAULTS.max_queued_requests,
        "Waiting requests beyond this are refused with 429.", _int(1)),
    Var("MAX_NEW_TOKENS", DEFAULT_MAX_NEW_TOKENS,
        "max_new_tokens when a request does not say (unset: at most MAX_TOTAL_TOKENS - 1).", _int(1)),
    Var("MAX_STEP_TOKENS", _ENGINE_DEFAULTS.max_step_tokens,
        "Tokens run per engine step (prefill chunks + one per decoding sequence).", _int(1)),
    Var("PREFILL_TIME_SHARE", _ENGINE_DEFAULTS.prefill_time_share,
        "> 0: while sequences decode, bound a step's prefill by measured time to about this share of a decode-only "
        "step (steadier decode cadence, slower prefill); 0 = off (token budget only).", _float(0.0, 100.0)),
    Var("PREFILL_CHUNK_TOKENS", _ENGINE_DEFAULTS.prefill_chunk_tokens, "Prompts are prefilled in chunks of this.",
        _int(1)),
    Var("KV_CACHE_TOKENS", _ENGINE_DEFAULTS.kv_cache_tokens,
        "KV pool size in tokens across all sequences; 0 = auto.", _int(0)),
    Var("DTYPE", "auto", "Weights/activations: auto, float32, bfloat16, float16 (auto: bf16 on CUDA, fp32 on CPU).",
        _choice(*DTYPES)),
    Var("SSM_STATE_DTYPE", "auto", "Mamba state dtype: auto, float32, bfloat16.", _choice(*SSM_STATE_DTYPES)),
    Var("DEVICE", "auto", "auto, cpu, cuda, cuda:N.", _device),
    Var("CUDA_GRAPHS", True, "Capture decode steps as CUDA graphs (CUDA only).", _bool),
    Var("KERNELS", "auto", "auto, fused, reference (fused needs CUDA + mamba-ssm).",
        _choice(*KERNEL_MODES)),
    Var("PREFIX_CACHE", _ENGINE_DEFAULTS.prefix_cache,
        "Resume prompts that start with a finished prompt or conversation from its exact state snapshot.", _bool),
    Var("SNAPSHOT_DEVICE_SHARE", _ENGINE_DEFAULTS.snapshot_device_share,
        "Prefix-cache snapshots kept on the device, as a share of the state pool's bytes (0..1).", _float(0.0, 1.0)),
    Var("SNAPSHOT_HOST_BYTES", _ENGINE_DEFAULTS.snapshot_host_bytes,
        "Bytes of host memory (pinned on CUDA) for snapshots moved off the device; 0 = none.", _int(0)),
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


def _read(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for var in VARS:
        raw = env.get(var.name)
        if raw is None or raw.strip() == "":
            values[var.name] = var.default
            continue
        try:
            values[var.name] = var.parse(raw)
        except ValueError as e:
            shown = "(hidden)" if var.name == "HF_TOKEN" else repr(raw)
            raise ConfigError(f"{var.name}={shown} is invalid: {e}") from None
    return values


def _engine_config(v: dict[str, Any], total: int, inp: int) -> EngineConfig:
    names = {f.name: f.name.upper() for f in fields(EngineConfig)}
    try:
        return EngineConfig(
            max_concurrent_seqs=v["MAX_CONCURRENT_SEQS"],
            max_input_tokens=inp,
            max_total_tokens=total,
            max_step_tokens=v["MAX_STEP_TOKENS"],
            kv_cache_tokens=v["KV_CACHE_TOKENS"],
            max_queued_requests=v["MAX_QUEUED_REQUESTS"],
            prefill_chunk_tokens=v["PREFILL_CHUNK_TOKENS"],
            prefill_time_share=v["PREFILL_TIME_SHARE"],
            dtype=v["DTYPE"],
            ssm_state_dtype=v["SSM_STATE_DTYPE"],
            device=v["DEVICE"],
            cuda_graphs=v["CUDA_GRAPHS"],
            kernels=v["KERNELS"],
            prefix_cache=v["PREFIX_CACHE"],
            snapshot_device_share=v["SNAPSHOT_DEVICE_SHARE"],
            snapshot_host_bytes=v["SNAPSHOT_HOST_BYTES"],
        )
    except ValueError as e:
        msg = str(e)
        for fname, env_name in names.items():  # name the variables, not the dataclass fields
            msg = msg.replace(f"{fname} ", f"{env_name} ").replace(f"({fname}", f"({env_name}")
        raise ConfigError(msg) from None


def _gpu_ids(v: dict[str, Any]) -> tuple[str, ...]:
    visible = v["CUDA_VISIBLE_DEVICES"]
    count = v["SM_NUM_GPUS"]
    if visible is not None:
        return visible[:count] if count else visible
    return tuple(str(i) for i in range(count or 0))


def gunicorn_settings(cfg: Config) -> dict[str, Any]:
    """serve/gunicorn_conf.py's settings (module globals gunicorn reads), all from `cfg`."""
    s = cfg.server
    return {
        "bind": [f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"],
        "wsgi_app": "serve.app:create_app()",
        "worker_class": "gthread",
        "workers": s.workers,
        "threads": cfg.threads,
        "timeout": s.timeout_s,
        "graceful_timeout": s.graceful_timeout_s,
        "keepalive": 75,  # longer than typical client/LB idle timeouts (60 s), so pooled connections stay valid
        "preload_app": False,
        "control_socket_disable": True,  # gunicorn >= 25: no runtime-control socket (read-only homes)
        "loglevel": s.log_level.lower(),
        "errorlog": "-",
        "accesslog": "-" if s.log_level == "DEBUG" else None,
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,  # heartbeat file off slow disks
    }


def prepare_metrics_dir(cfg: Config) -> str:
    """In the gunicorn master, before any worker forks (and before prometheus_client is imported, which
    picks its multiprocess mode from the environment): an empty PROMETHEUS_MULTIPROC_DIR, exported."""
    path = cfg.server.metrics_dir or tempfile.mkdtemp(prefix="granite-metrics-")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):  # values of a previous run
            os.remove(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def pin_gpu(gpu_id: str) -> None:
    """In a fresh gunicorn worker, before torch is imported: see only this GPU (the one write to the
    process environment, kept next to the reads)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id


def var_unset(env: Mapping[str, str], name: str) -> bool:
    return not (env.get(name) or "").strip()


def load_config(env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    v = _read(env)
    # An unset SAGEMAKER_MAX_PAYLOAD_IN_MB means 6 MiB for endpoints, 100 MiB under batch transform.
    payload_mb = v["SAGEMAKER_MAX_PAYLOAD_IN_MB"]
    if v["SAGEMAKER_BATCH"] and not (env.get("SAGEMAKER_MAX_PAYLOAD_IN_MB") or "").strip():
        payload_mb = BATCH_MAX_PAYLOAD_MB
    timeout_s = v["REQUEST_TIMEOUT"]
    if v["SAGEMAKER_BATCH"] and var_unset(env, "REQUEST_TIMEOUT"):
        timeout_s = 0  # batch transform invocations may run for up to SAGEMAKER_MODEL_SERVER_TIMEOUT
    if v["DEVICE"] == "cpu" and v["KERNELS"] == "fused":
        raise ConfigError("KERNELS=fused needs CUDA but DEVICE=cpu")
    context = Context(v["MAX_INPUT_TOKENS"], v["MAX_TOTAL_TOKENS"],
                      None if var_unset(env, "MAX_NEW_TOKENS") else v["MAX_NEW_TOKENS"])
    # Provisional until the checkpoint is known (with_context); explicit values are checked now.
    total = context.max_total_tokens or max(_ENGINE_DEFAULTS.max_total_tokens, (context.max_input_tokens or 0) + 1)
    if context.max_total_tokens is not None:
        v["MAX_NEW_TOKENS"] = _max_new_tokens(context, total)
    gpu_ids = _gpu_ids(v) if v["DEVICE"] != "cpu" else ()
    workers = v["SAGEMAKER_MODEL_SERVER_WORKERS"] or max(1, len(gpu_ids))
    port = v["SAGEMAKER_BIND_TO_PORT"] or v["PORT"]
    try:
        server = ServerConfig(
            host=v["HOST"],
            port=port,
            workers=workers,
            timeout_s=v["SAGEMAKER_MODEL_SERVER_TIMEOUT"],
            graceful_timeout_s=v["GRACEFUL_TIMEOUT"],
            max_payload_bytes=payload_mb * 1024 * 1024,
            batch=v["SAGEMAKER_BATCH"],
            batch_strategy=v["SAGEMAKER_BATCH_STRATEGY"],
            max_concurrent_transforms=v["SAGEMAKER_MAX_CONCURRENT_TRANSFORMS"],
            default_max_new_tokens=v["MAX_NEW_TOKENS"],
            request_timeout_s=float(timeout_s) or None,
            gpu_ids=gpu_ids,
            log_level=v["LOG_LEVEL"],
            metrics_dir=v["PROMETHEUS_MULTIPROC_DIR"],
            session_ttl_s=float(v["SESSION_TTL"]),
            session_max=v["SESSION_MAX"],
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = ModelSource(
        model_dir=v["MODEL_DIR"],
        hf_model_id=v["HF_MODEL_ID"],
        hf_revision=v["HF_MODEL_REVISION"],
        hf_token=v["HF_TOKEN"],
        model_id=v["MODEL_ID"],
        cache_dir=v["MODEL_CACHE_DIR"],
    )
    return Config(server=server, model=model, context=context,
                  engine=_engine_config(v, total, context.max_input_tokens or total - 1), signature=_signature(v))


def _max_new_tokens(c: Context, total: int) -> int:
    if c.max_new_tokens is None:
        return min(DEFAULT_MAX_NEW_TOKENS, total - 1)  # the built-in default yields to a small context
    if c.max_new_tokens >= total:
        raise ConfigError(f"MAX_NEW_TOKENS ({c.max_new_tokens}) must be < MAX_TOTAL_TOKENS ({total})")
    return c.max_new_tokens


def with_context(cfg: Config, context_length: int | None) -> Config:
    """`cfg` with the context limits left unset taken from the checkpoint: MAX_TOTAL_TOKENS = its
    context length (max_position_embeddings), MAX_INPUT_TOKENS = MAX_TOTAL_TOKENS - 1. ConfigError,
    naming the variables, when the limits contradict each other or one full-length sequence cannot
    fit a KV pool of KV_CACHE_TOKENS (the automatic size always holds one; on CUDA the runner checks
    that free memory does)."""
    c = cfg.context
    total = c.max_total_tokens or max(context_length or _ENGINE_DEFAULTS.max_total_tokens, (c.max_input_tokens or 0) + 1)
    inp = c.max_input_tokens or total - 1
    where = "" if c.max_total_tokens else f" (the checkpoint's max_position_embeddings={context_length})"
    if inp >= total:
        raise ConfigError(f"MAX_INPUT_TOKENS ({inp}) must be < MAX_TOTAL_TOKENS ({total}{where})")
    kv = cfg.engine.kv_cache_tokens
    if kv and kv < total:
        raise ConfigError(f"KV_CACHE_TOKENS={kv} cannot hold one sequence of MAX_TOTAL_TOKENS={total}{where}: "
                          f"raise KV_CACHE_TOKENS (or 0 = auto) or set MAX_TOTAL_TOKENS lower")
    server = dataclasses.replace(cfg.server, default_max_new_tokens=_max_new_tokens(c, total))
    engine = dataclasses.replace(cfg.engine, max_total_tokens=total, max_input_tokens=inp)
    return dataclasses.replace(cfg, server=server, engine=engine)


def _signature(v: dict[str, Any]) -> SignaturePolicy:
    try:
        return SignaturePolicy(
            mode=v["MODEL_SIGNATURE"], file=v["MODEL_SIGNATURE_FILE"], public_key=v["MODEL_SIGNATURE_PUBLIC_KEY"],
            cert_chain=v["MODEL_SIGNATURE_CERT_CHAIN"] or (), identity=v["MODEL_SIGNATURE_IDENTITY"],
            issuer=v["MODEL_SIGNATURE_ISSUER"], trust_config=v["MODEL_SIGNATURE_TRUST_CONFIG"],
            ignore_paths=v["MODEL_SIGNATURE_IGNORE_PATHS"] or (), ignore_unsigned=v["MODEL_SIGNATURE_IGNORE_UNSIGNED"],
            cache_dir=v["MODEL_CACHE_DIR"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
