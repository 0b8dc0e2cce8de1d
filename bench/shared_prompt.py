"""Users sharing one long system prompt + tools, each with a distinct question: reuse of the snapshot at the end
of the system part (issue 20 item 1) on vs off, through the real server (chat completions, streamed), alternated
in the same run.

    python bench/shared_prompt.py [--users 32] [--system-tokens 2000] [--question-tokens 100] [--rounds 2]

Two servers on the same checkpoint (PREFIX_CACHE=false / true), each warmed with one request that shares the
system part (so "on" measures the steady state: the system part was seen before). Then rounds, alternating
off / on: every user sends its own question at once (all `users` requests in flight), new questions each round;
then `alone` users one at a time (each request alone on the server: its own prefill's latency).
Reported per mode: client TTFT p50 / p90, prompt tokens, tokens resumed from snapshots (usage cached_tokens),
prefill tokens computed (prompt - cached); ratios on / off. Greedy answers must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.http_load import WORDS, Server, machine_name, pct  # noqa: E402


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def system_and_tools(words: int) -> tuple[str, list[dict]]:
    rng = random.Random(7)
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": _words(rng, 20),
        "parameters": {"type": "object", "properties": {f"arg_{j}": {"type": "string", "description": _words(rng, 8)}
                                                        for j in range(2)}}}} for i in range(4)]
    return _words(rng, words), tools


def question(user: int, rnd: int, words: int) -> str:
    return f"user {user} round {rnd}: " + _words(random.Random(1000 * rnd + user), words)


def ask(url: str, system: str, tools: list[dict], q: str, max_new: int) -> dict:
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}], "tools": tools,
            "max_tokens": max_new, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            ev = json.loads(line[5:])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices") or ():
                delta = ch.get("delta") or {}
                if "role" in delta:  # the head chunk, sent before any token
                    continue
                if delta.get("content") is not None or delta.get("tool_calls") or ch.get("finish_reason"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(delta.get("content") or json.dumps(delta.get("tool_calls")))
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "text": "".join(text), "usage": usage}


def run_round(url: str, system: str, tools: list[dict], users: int, rnd: int, q_words: int, max_new: int,
              one_at_a_time: bool = False) -> dict:
    res: dict[int, dict] = {}

    def one(u: int) -> None:
        res[u] = ask(url, system, tools, question(u, rnd, q_words), max_new)

    t0 = time.perf_counter()
    if one_at_a_time:  # each user alone on the server: TTFT is one request's prefill, nothing queued before it
        for u in range(users):
            one(u)
        return {"wall_s": time.perf_counter() - t0, "results": [res[u] for u in range(users)]}
    threads = [threading.Thread(target=one, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(res) != users:
        raise RuntimeError(f"round {rnd}: {users - len(res)} requests failed")
    return {"wall_s": time.perf_counter() - t0, "results": [res[u] for u in range(users)]}


def summary(rounds: list[dict]) -> dict:
    rs = [r for rd in rounds for r in rd["results"]]
    ttft = [r["ttft"] * 1000 for r in rs]
    prompt = sum(r["usage"]["prompt_tokens"] for r in rs)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in rs)
    return {"requests": len(rs), "ttft_p50_ms": round(pct(ttft, 50), 1), "ttft_p90_ms": round(pct(ttft, 90), 1),
            "prompt_tokens": prompt, "cached_tokens": cached, "prefill_tokens_computed": prompt - cached,
            "prompt_tokens_per_request": round(prompt / len(rs), 1),
            "round_wall_s": [round(rd["wall_s"], 2) for rd in rounds]}


def run_shared_prompt(ckpt: Path, users: int = 32, system_words: int = 400, q_words: int = 42, rounds: int = 2,
                      max_new: int = 8, alone: int = 4) -> dict:
    system, tools = system_and_tools(system_words)
    env = {"MAX_INPUT_TOKENS": "6000", "MAX_TOTAL_TOKENS": "6144", "MAX_QUEUED_REQUESTS": str(4 * users),
           "MAX_STEP_TOKENS": "2048"}
    servers = {mode: Server(ckpt, slots=users, env={**env, "PREFIX_CACHE": str(mode == "on").lower()})
               for mode in ("off", "on")}
    try:
        warm = {m: ask(s.url, system, tools, "warm-up question", 4) for m, s in servers.items()}
        per: dict[str, list[dict]] = {"off": [], "on": []}
        for rnd in range(rounds):
            for mode in ("off", "on"):  # alternated, the same questions in both
                print(f"shared prompt: round {rnd + 1} reuse {mode} ...", flush=True)
                per[mode].append(run_round(servers[mode].url, system, tools, users, rnd, q_words, max_new))
        single: dict[str, dict] = {}
        for mode in ("off", "on"):
            print(f"shared prompt: {alone} users one at a time, reuse {mode} ...", flush=True)
            single[mode] = run_round(servers[mode].url, system, tools, alone, rounds, q_words, max_new, True)
    finally:
        for s in servers.values():
            s.stop()
    same = all(a["text"] == b["text"] for ro, rn in zip(per["off"], per["on"], strict=True)
               for a, b in zip(ro["results"], rn["results"], strict=True))
    off, on = summary(per["off"]), summary(per["on"])
    if warm["on"]["usage"]["prompt_tokens"] != warm["off"]["usage"]["prompt_tokens"]:
        raise RuntimeError("the two servers rendered the same request to different prompts")
    alone_off, alone_on = summary([single["off"]]), summary([single["on"]])
    same = same and all(a["text"] == b["text"] for a, b in zip(single["off"]["results"], single["on"]["results"],
                                                              strict=True))
    return {"users": users, "rounds": rounds, "max_new_tokens": max_new,
            "one_at_a_time": {"users": alone, "reuse_off": alone_off, "reuse_on": alone_on,
                              "ttft_p50_ratio_on_over_off": round(alone_on["ttft_p50_ms"] / max(alone_off["ttft_p50_ms"],
                                                                                                1e-9), 3)},
            "system_plus_tools_tokens": round(on["cached_tokens"] / max(on["requests"], 1), 1),
            "reuse_off": off, "reuse_on": on, "answers_identical": same,
            "ttft_p50_ratio_on_over_off": round(on["ttft_p50_ms"] / max(off["ttft_p50_ms"], 1e-9), 3),
            "prefill_tokens_reduction": round(1 - on["prefill_tokens_computed"] / max(off["prefill_tokens_computed"], 1),
                                              3),
            "targets": {"ttft_p50_ratio": 0.25, "prefill_tokens_reduction": 0.9}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--system-words", type=int, default=400, help="~2K tokens with the tools on the demo tokenizer")
    p.add_argument("--question-words", type=int, default=42)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--alone", type=int, default=4, help="users sent one at a time after the concurrent rounds")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "shared-prompt-cpu.json"))
    a = p.parse_args(argv)
    from model.checkpoint.demo import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / "demo", preset="demo")
        report = run_shared_prompt(ckpt, a.users, a.system_words, a.question_words, a.rounds, a.max_new_tokens,
                                   a.alone)
    report.update(machine=machine_name(), load_average_1m=round(os.getloadavg()[0], 2))
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
