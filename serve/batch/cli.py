"""`python -m serve batch`: offline batch transform through the same engine as the server.

    python -m serve batch --input PATH|s3://bucket/prefix --output PATH|s3://bucket/prefix
        [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--stop S ...]
        [--parameters JSON] [--seed BASE] [--concurrency N] [--join-input]
        [--model-dir DIR | --model-id demo] [--work-dir DIR] [--progress auto|bar|log|none]

Every input line goes through serve.handler.handle_records (the code behind the server's JSON
Lines route) with the server's limits, so a line's output is what a SageMaker batch transform
through /invocations would have written for it.
Output `<output>/<input name>.out` (one line per input line, in order), a summary in
`<output>/_SUMMARY.json` and on stdout. Records are journalled as they finish (serve/batch/journal.py),
so a run that is killed resumes where it stopped when started again with the same arguments.
Exit status: 0 when every file was written, 1 when some file (or the listing) failed, 2 bad
arguments/model/input, 130 interrupted (SIGINT/SIGTERM; run again to resume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys

from serve.batch import s3io
from serve.batch.fileio import list_inputs
from serve.batch.runner import BatchJob, BatchRun
from serve.config import Config
from serve.engine_client import EngineClient
from serve.protocol import Limits, ProtocolError, tgi_params

log = logging.getLogger("serve.batch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve batch", description="Offline batch transform (JSON Lines).")
    p.add_argument("--input", required=True, help="a file, a folder, s3://bucket/key or s3://bucket/prefix")
    p.add_argument("--output", required=True, help="a folder or s3://bucket/prefix for <name>.out files")
    p.add_argument("--max-new-tokens", type=int, help="default max_new_tokens for records that do not say")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--parameters", default="{}", help='TGI-style defaults as JSON, e.g. \'{"do_sample": true}\'')
    p.add_argument("--seed", type=int, default=0,
                   help="base of the per-record seeds (each record: hash of base, file and line)")
    p.add_argument("--concurrency", type=_non_negative, default=0,
                   help="records in flight (default: engine slots + queue headroom)")
    p.add_argument("--join-input", action="store_true",
                   help='write the input object with a "SageMakerOutput" key (SageMaker JoinSource=Input)')
    p.add_argument("--model-dir", help="checkpoint folder (default: MODEL_DIR / HF_MODEL_ID / MODEL_ID)")
    p.add_argument("--model-id", help="'demo' for the built-in demo model")
    p.add_argument("--work-dir", help="journals and done markers (default: <output>/.batch, or a folder "
                                      "under MODEL_CACHE_DIR for s3:// output)")
    p.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto")
    return p


def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def job_defaults(args: argparse.Namespace) -> dict:
    """--parameters plus the named flags, as TGI `parameters` (validated here, once)."""
    try:
        defaults = json.loads(args.parameters)
    except ValueError as e:
        raise SystemExit(f"--parameters is not valid JSON: {e}") from None
    if not isinstance(defaults, dict):
        raise SystemExit("--parameters must be a JSON object")
    for key in ("max_new_tokens", "temperature", "top_p", "top_k", "stop"):
        if getattr(args, key) is not None:
            defaults[key] = getattr(args, key)
    sampling_values(defaults)
    return defaults


def sampling_values(defaults: dict) -> dict:
    """TGI parameters -> the SamplingParams fields they set (what the handler applies under each
    record's own). Response options cannot be job defaults: the handler takes them per record."""
    try:
        values, _ = tgi_params(defaults, Limits())
    except ProtocolError as e:
        raise SystemExit(f"bad default parameters: {e.message}") from None
    per_record = sorted(k for k in ("details", "return_full_text", "truncate", "grammar")
                        if defaults.get(k) is not None)
    if per_record:
        raise SystemExit(f"{', '.join(per_record)} cannot be a job default; set it in each record's parameters")
    return {k: v for k, v in values.items() if v is not None}


def make_infer(engine: EngineClient, cfg: Config, defaults: dict):
    """(record, defaults) -> response object, through the server's JSON Lines record path with the
    server's limits (MAX_NEW_TOKENS etc.); `defaults` differ from the job's only by a per-record seed."""
    from serve.handler import error_record, handle_records

    values = sampling_values(defaults)
    limits = Limits.from_config(cfg.engine, cfg.server.default_max_new_tokens, base=values)

    def infer(record: str, record_defaults: dict | None):
        lim = limits
        seed = (record_defaults or {}).get("seed")
        if seed is not None and seed != values.get("seed"):
            lim = limits.with_base({"seed": seed})
        try:
            return handle_records(engine, [record], limits=lim)[0]
        except Exception as e:  # the contract is "never raises"; keep it so whatever happens
            return error_record(e)

    return infer


def default_work_dir(output: str, cache_dir: str) -> str:
    if s3io.is_s3(output):
        digest = hashlib.sha256(output.rstrip("/").encode()).hexdigest()[:16]
        return os.path.join(cache_dir, "batch", digest)
    return os.path.join(output, ".batch")


def default_concurrency(engine_cfg) -> int:
    # Keep every slot busy plus a waiting batch behind them, never more than the queue admits.
    return engine_cfg.max_concurrent_seqs + min(engine_cfg.max_queued_requests, engine_cfg.max_concurrent_seqs)


def start_engine(cfg: Config, model_dir: str | None, model_id: str | None) -> tuple[EngineClient, str, Config]:
    """-> (engine, model name, cfg with the checkpoint's context limits) once ready; SystemExit(2) with the
    reason when loading fails."""
    from serve.engine_setup import build_engine

    try:
        engine, cfg = build_engine(cfg, model_dir, model_id)
    except Exception as e:
        log.error("batch: %s", e)
        raise SystemExit(2) from None
    engine.start()
    if not engine.wait_ready():
        log.error("batch: %s", engine.error or "the engine did not start")
        engine.shutdown(timeout=1.0)
        raise SystemExit(2)
    return engine, engine.model_name, cfg


def check_input(uri: str) -> None:
    """Fail before loading the model when the input is missing or unreadable."""
    try:
        files = list_inputs(uri)
    except Exception as e:
        raise SystemExit(f"cannot read input {uri}: {e}") from None
    if not files:
        log.warning("batch: no input files under %s", uri)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from serve.config import ConfigError, load_config

    try:
        cfg = load_config()
    except ConfigError as e:
        print(f"batch: configuration error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.server.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        defaults = job_defaults(args)
        check_input(args.input)
        engine, name, cfg = start_engine(cfg, args.model_dir, args.model_id)
    except SystemExit as e:
        if isinstance(e.code, str):
            log.error("batch: %s", e.code)
        return 2
    infer = make_infer(engine, cfg, defaults)
    job = BatchJob(input=args.input, output=args.output,
                   work_dir=args.work_dir or default_work_dir(args.output, cfg.model.cache_dir),
                   defaults=defaults, join_input=args.join_input, seed=args.seed,
                   concurrency=args.concurrency or default_concurrency(cfg.engine), model_name=name,
                   progress=args.progress)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # docker stop / SageMaker: stop cleanly
    try:
        summary = BatchRun(job, infer).run()
    except KeyboardInterrupt:
        log.warning("batch: interrupted; finished records are journalled, run again to resume")
        return 130
    except Exception as e:  # e.g. the input listing failed (S3 permissions)
        log.error("batch: %s: %s", type(e).__name__, e)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.shutdown(timeout=5.0)
    summary["engine"] = {k: v for k, v in engine.stats().items() if isinstance(v, (int, float, str))}
    print(json.dumps(summary), flush=True)
    return 1 if summary["files_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
