"""Example SageMaker override hooks, shipped as code/inference.py inside model.tar.gz (or the S3 prefix).

The container looks for <model_dir>/code/inference.py and lets each hook found here replace its default:
model_fn(model_dir), input_fn(body, content_type), predict_fn(data, model), output_fn(prediction, accept),
or transform_fn(model, body, content_type, accept). This one keeps the default model and predict step and:
- input_fn: adds a fixed system prompt to chat requests (`messages`) that have none, also per line of
  application/jsonlines bodies (lines that are not JSON are left alone: the server answers them with an
  error line, so line counts still match);
- output_fn: strips surrounding whitespace from generated text and marks responses with
  "postprocessed": true. Streams are passed through untouched (their events are already on the wire).
The defaults live in serve.handler (part of the container image), so the rest behaves as without this file.
"""

from __future__ import annotations

import json

from serve.handler import JsonLines, Stream, default_input_fn, default_output_fn

SYSTEM_PROMPT = "You are Granite, a concise assistant. Answer in at most three sentences."


def with_system_prompt(request):
    """A chat request without a system message gets ours first; anything else is returned as is."""
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        return request
    if any(isinstance(m, dict) and m.get("role") == "system" for m in request["messages"]):
        return request
    return {**request, "messages": [{"role": "system", "content": SYSTEM_PROMPT}, *request["messages"]]}


def _inject_line(line):
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return line
    changed = with_system_prompt(request)
    return line if changed is request else json.dumps(changed)


def input_fn(body, content_type):
    data = default_input_fn(body, content_type)  # JSON -> dict/list; JSON Lines -> JsonLines of raw lines
    if isinstance(data, JsonLines):
        return JsonLines(_inject_line(line) for line in data)
    return with_system_prompt(data)


def postprocess(item):
    """One response object: a TGI item, an OpenAI chat/completions response, or an error (left alone)."""
    if not isinstance(item, dict) or "error" in item:
        return item
    item = dict(item)
    if isinstance(item.get("generated_text"), str):
        item["generated_text"] = item["generated_text"].strip()
    choices = []
    for choice in item.get("choices", []):
        choice = dict(choice)
        if isinstance(choice.get("message"), dict) and isinstance(choice["message"].get("content"), str):
            choice["message"] = {**choice["message"], "content": choice["message"]["content"].strip()}
        if isinstance(choice.get("text"), str):
            choice["text"] = choice["text"].strip()
        choices.append(choice)
    if choices:
        item["choices"] = choices
    item["postprocessed"] = True
    return item


def output_fn(prediction, accept):
    if isinstance(prediction, Stream):
        return default_output_fn(prediction, accept)
    if isinstance(prediction, JsonLines):
        return default_output_fn(JsonLines(postprocess(x) for x in prediction), accept)
    if isinstance(prediction, list):
        return default_output_fn([postprocess(x) for x in prediction], accept)
    return default_output_fn(postprocess(prediction), accept)
