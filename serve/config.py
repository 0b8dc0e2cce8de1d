"""The server's configuration: the environment, read once here into frozen dataclasses.

`load_config(env)` parses and validates every variable of serve/env_vars.py (the table: names, defaults,
meanings, parsers); a bad value fails at start with a message naming the variable. `with_context` fills
in the context limits the checkpoint decides. This is the one module that touches the process
environment (the two writes, before gunicorn forks and before torch starts, are kept next to the reads).
torch is never imported here.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model.checkpoint.signing import SignaturePolicy
from model.types import EngineConfig
from serve.env_vars import (
    BATCH_MAX_PAYLOAD_MB,
    DEFAULT_MAX_NEW_TOKENS,
    REALTIME_TIMEOUT_S,
    SAGEMAKER_MAX_PAYLOAD_MB,
    ConfigError,
    is_unset,
    read,
)

_ENGINE_DEFAULTS = EngineConfig()


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
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    request_timeout_s: float | None = float(REALTIME_TIMEOUT_S)  # non-streaming real-time requests; None = no deadline (batch)
    gpu_ids: tuple[str, ...] = ()  # devices visible to the server; one worker each
    log_level: str = "INFO"
    metrics_dir: str | None = None  # prometheus-client multiprocess directory (gunicorn); None: one process
    session_ttl_s: float = 1200.0  # SageMaker stateful sessions: idle time before a session expires
    session_max: int = 64  # open sessions per worker (each pins a ~37 MiB state snapshot + its KV)
    memory_arenas: int = 2  # glibc M_ARENA_MAX per worker; 0 = glibc's default (serve/memory.py)
    memory_trim: bool = True  # malloc_trim when the engine goes idle after work
    max_n: int = 8  # rows (forks) one request may ask for: OpenAI n / best_of, TGI best_of

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        for name in ("workers", "timeout_s", "max_payload_bytes", "default_max_new_tokens", "session_max",
                     "max_n"):
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
class AdapterConfig:
    """LoRA adapters (serve/adapters.py)."""

    registry_dir: str | None = None  # shared by the workers (ADAPTER_REGISTRY_DIR); None: this process only
    roots: tuple[str, ...] = ("/opt/ml",)  # local folders a src may be in (ADAPTER_SRC_ROOTS)
    sources: tuple[tuple[str, str], ...] = ()  # ADAPTERS: (name, src) registered at start
    discover_dir: str | None = "/opt/ml/model/adapters"  # <name>/ folders registered at start
    cache_dir: str = "/tmp/granite-h-cache"  # downloads and extracted archives


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelSource = field(default_factory=ModelSource)
    # Until with_context() has seen the checkpoint, the context limits here are provisional.
    engine: EngineConfig = field(default_factory=EngineConfig)
    context: Context = field(default_factory=Context)
    signature: SignaturePolicy = field(default_factory=SignaturePolicy)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)

    @property
    def threads(self) -> int:
        # gthread threads per worker: every running or queued request holds one while it waits, and
        # /ping must always find a free one, so leave headroom above the engine's slots + queue.
        return max(256, self.engine.max_concurrent_seqs + self.engine.max_queued_requests + 64)


def _engine_config(v: dict[str, Any], total: int, inp: int) -> EngineConfig:
    """EngineConfig from the variables named after its fields (MAX_STEP_TOKENS -> max_step_tokens); the two
    context limits come from the checkpoint (with_context) or their variables."""
    names = {f.name: f.name.upper() for f in fields(EngineConfig)}
    values = {name: v[var] for name, var in names.items() if var in v}
    values.update(max_total_tokens=total, max_input_tokens=inp)
    try:
        return EngineConfig(**values)
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


def prepare_adapter_registry(cfg: Config) -> str:
    """In the gunicorn master, before any worker forks: a fresh folder where the workers share adapter registrations
    (serve/adapters.py), exported as ADAPTER_REGISTRY_DIR; an earlier run's registrations are not inherited."""
    path = cfg.adapters.registry_dir or tempfile.mkdtemp(prefix="granite-adapters-")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".json"):
            os.remove(os.path.join(path, name))
    os.environ["ADAPTER_REGISTRY_DIR"] = path
    return path


def pin_gpu(gpu_id: str) -> None:
    """In a fresh gunicorn worker, before torch is imported: see only this GPU (the one write to the
    process environment, kept next to the reads)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id


def load_config(env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    v = read(env)
    # An unset SAGEMAKER_MAX_PAYLOAD_IN_MB means 6 MiB for endpoints, 100 MiB under batch transform.
    payload_mb = v["SAGEMAKER_MAX_PAYLOAD_IN_MB"]
    if v["SAGEMAKER_BATCH"] and is_unset(env, "SAGEMAKER_MAX_PAYLOAD_IN_MB"):
        payload_mb = BATCH_MAX_PAYLOAD_MB
    timeout_s = v["REQUEST_TIMEOUT"]
    if v["SAGEMAKER_BATCH"] and is_unset(env, "REQUEST_TIMEOUT"):
        timeout_s = 0  # batch transform invocations may run for up to SAGEMAKER_MODEL_SERVER_TIMEOUT
    if v["DEVICE"] == "cpu" and v["KERNELS"] == "fused":
        raise ConfigError("KERNELS=fused needs CUDA but DEVICE=cpu")
    context = Context(v["MAX_INPUT_TOKENS"], v["MAX_TOTAL_TOKENS"],
                      None if is_unset(env, "MAX_NEW_TOKENS") else v["MAX_NEW_TOKENS"])
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
            memory_arenas=v["MEMORY_ARENAS"],
            memory_trim=v["MEMORY_TRIM"],
            max_n=v["MAX_N"],
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
    adapters = AdapterConfig(registry_dir=v["ADAPTER_REGISTRY_DIR"], roots=v["ADAPTER_SRC_ROOTS"] or ("/opt/ml",),
                             sources=v["ADAPTERS"] or (), discover_dir=str(Path(v["MODEL_DIR"]) / "adapters"),
                             cache_dir=v["MODEL_CACHE_DIR"])
    return Config(server=server, model=model, context=context,
                  engine=_engine_config(v, total, context.max_input_tokens or total - 1), signature=_signature(v),
                  adapters=adapters)


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


def with_worker_dir(cfg: Config, index: int) -> Config:
    """`cfg` with the disk tier in worker `index`'s own folder, SNAPSHOT_DISK_DIR/w<index> (its snapshots, session
    pins and session table: the folder a restarted worker with the same index finds again)."""
    e = cfg.engine
    if not e.snapshot_disk_dir:
        return cfg
    return dataclasses.replace(cfg, engine=dataclasses.replace(
        e, snapshot_disk_dir=os.path.join(e.snapshot_disk_dir, f"w{index}")))


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
