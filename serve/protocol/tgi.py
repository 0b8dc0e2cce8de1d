"""Hugging Face TGI shape (torch-free): `{"inputs": str | [str], "parameters": {...}, "stream": bool}`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model.types import Constraint, SamplingParams
from serve.protocol.constraints import tgi_grammar
from serve.protocol.fields import MAX_TOP_N, Fields, Limits, ProtocolError, invalid, max_new, sampling_params

TGI_TOP = frozenset({"inputs", "parameters", "stream"})
TGI_PARAMS = frozenset({
    "max_new_tokens", "temperature", "top_k", "top_p", "typical_p", "do_sample", "seed", "repetition_penalty",
    "frequency_penalty", "stop", "truncate", "return_full_text", "details", "decoder_input_details",
    "top_n_tokens", "best_of", "watermark", "grammar", "adapter_id",
})


@dataclass(frozen=True)
class TextRequest:
    """TGI shape. `batched`: inputs came as a list (the response is one element per input)."""

    inputs: tuple[str, ...]
    params: SamplingParams
    batched: bool = False
    stream: bool = False
    details: bool = False
    return_full_text: bool = False
    truncate: int | None = None  # keep only the last `truncate` prompt tokens
    constraint: Constraint | None = None  # parameters.grammar: every input's output matches it
    best_of: int = 1  # rows generated per input; the one with the highest cumulative logprob is returned
    n: int = 1  # answers per input (TGI: always one)
    adapter_id: str | None = None  # a registered LoRA adapter (serve/adapters.py)


def tgi_params(raw: Any, limits: Limits) -> tuple[dict[str, Any], dict[str, Any]]:
    """TGI "parameters" -> (SamplingParams fields, response options and the grammar's constraint). Also used for
    batch defaults."""
    f = Fields({} if raw is None else raw, "parameters", TGI_PARAMS)
    f.null_or("watermark", (False,), "watermarking is not implemented")
    f.null_or("decoder_input_details", (False,), "prompt token logprobs are not computed")

    v: dict[str, Any] = {
        **max_new(f, ("max_new_tokens",), limits),
        "temperature": f.float("temperature", 0.0, 100.0),
        "top_k": f.int("top_k", 0, 1_000_000),
        "top_p": f.float("top_p", 0.0, 1.0, lo_open=True),
        "typical_p": f.float("typical_p", 0.0, 1.0, lo_open=True),
        "repetition_penalty": f.float("repetition_penalty", 0.0, 100.0, lo_open=True),
        "frequency_penalty": f.float("frequency_penalty", -2.0, 2.0),
        "seed": f.seed("seed"),
        "stop": f.stop("stop"),
        "top_n_tokens": f.int("top_n_tokens", 0, MAX_TOP_N),
    }
    do_sample = f.bool("do_sample")
    # TGI: any sampling knob away from its neutral value turns sampling on.
    warped = (v["temperature"] not in (None, 1.0) or (v["top_k"] or 0) > 0
              or (v["top_p"] or 1.0) < 1.0 or (v["typical_p"] or 1.0) < 1.0)
    if do_sample is not None or warped:
        v["do_sample"] = bool(do_sample) or warped
    details = bool(f.bool("details"))
    if details:
        v["logprobs"] = True
    best_of = f.int("best_of", 1, limits.max_n) or 1
    if best_of > 1 and not v.get("do_sample"):  # TGI's validation: several rows of one greedy answer say nothing
        raise invalid("parameters.best_of > 1 needs sampling (do_sample=true or a sampling parameter)")
    opts = {"details": details, "return_full_text": bool(f.bool("return_full_text")),
            "truncate": f.int("truncate", 1, 10_000_000), "constraint": tgi_grammar(f.get("grammar")),
            "best_of": best_of, "adapter_id": f.str("adapter_id") or None}
    return v, opts


def parse_tgi(obj: dict, limits: Limits) -> TextRequest:
    f = Fields(obj, "", TGI_TOP)
    raw = obj.get("inputs")
    batched = isinstance(raw, list)
    inputs = raw if batched else [raw]
    if not inputs:
        raise invalid("inputs must not be empty")
    for i, text in enumerate(inputs):
        where = f"inputs[{i}]" if batched else "inputs"
        if not isinstance(text, str):
            raise invalid(f"{where} must be a string")
        if not text:
            raise invalid(f"{where} must not be empty")
    stream = bool(f.bool("stream"))
    if stream and len(inputs) > 1:
        raise invalid("stream=true takes a single input, not a list of several")
    values, opts = tgi_params(obj.get("parameters"), limits)
    if stream and opts["best_of"] > 1:
        raise invalid("parameters.best_of > 1 cannot be streamed (stream=true)")
    return TextRequest(inputs=tuple(inputs), params=sampling_params(limits, values), batched=batched,
                       stream=stream, **opts)


def may_sample(obj: dict, defaults: Mapping[str, Any]) -> bool:
    """Whether this body, under a batch job's default parameters, samples rather than decodes greedily:
    its parameters over the defaults, read as tgi_params reads them (any warping knob turns sampling on)."""
    own = obj.get("parameters")
    try:
        values, _ = tgi_params({**defaults, **(own if isinstance(own, dict) else {})}, Limits())
    except ProtocolError:
        return False  # the record fails validation in the handler anyway
    return not sampling_params(Limits(), values).greedy
