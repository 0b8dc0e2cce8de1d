"""Model resolution and engine construction, written once for the server and the batch CLI.

    resolve_model_source(cfg) -> ResolvedModel   which checkpoint (demo / MODEL_DIR / HF_MODEL_ID), validated
    build_engine(cfg)         -> (Engine, cfg)   the engine for it (not started), and cfg with the context
                                                 limits the checkpoint decides (serve/config.with_context)

Checks that must pass before any weight is loaded belong in resolve_model_source.
"""

from __future__ import annotations

import dataclasses
import logging

from model.checkpoint.loader import ResolvedModel, resolve_model
from serve.config import Config, with_context
from serve.engine_client import EngineClient

log = logging.getLogger("serve")


def resolve_model_source(cfg: Config) -> ResolvedModel:
    """The checkpoint to serve (path, name, is_demo, config); ModelLoadError saying what is missing."""
    m = cfg.model
    # the checkpoint's signature (MODEL_SIGNATURE*) is checked in resolve_model, before any file is read
    resolved = resolve_model(m.model_dir, m.hf_model_id, m.hf_revision, m.hf_token, m.model_id, m.cache_dir,
                             cfg.signature)
    if resolved.is_demo:
        log.warning("!" * 78)
        log.warning("DEMO MODEL: %s has RANDOM WEIGHTS; its text is meaningless. Set MODEL_DIR or "
                    "HF_MODEL_ID to serve Granite.", resolved.name)
        log.warning("!" * 78)
    return resolved


def build_engine(cfg: Config, model_dir: str | None = None, model_id: str | None = None) -> tuple[EngineClient, Config]:
    """The engine for the configured model (model_dir / model_id: the batch CLI's overrides), not started."""
    from model.engine.engine import Engine

    if model_dir or model_id:
        src = cfg.model
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            src, model_dir=model_dir or src.model_dir, model_id=model_id or src.model_id,
            hf_model_id=None if model_dir else src.hf_model_id))
    resolved = resolve_model_source(cfg)
    cfg = with_context(cfg, resolved.config.get("max_position_embeddings"))
    e = cfg.engine
    log.info("context: MAX_TOTAL_TOKENS=%d MAX_INPUT_TOKENS=%d (%s)", e.max_total_tokens, e.max_input_tokens,
             "set" if cfg.context.max_total_tokens else "the checkpoint's max_position_embeddings")
    return Engine(resolved.path, cfg.engine, resolved.name), cfg
