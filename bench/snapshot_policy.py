"""Which prompts deserve a snapshot (issue 20 item 4), measured on the real scheduler + prefix cache with the
value-keeping copier of the tests (torch-free, seconds): a host tier with room for a few dozen snapshots, traffic of
chat users sharing a system prompt mixed with one-off raw prompts, and three policies for the raw prompts' interval
snapshots: none, every interval of every prompt ("always"), every interval of a prefix seen before ("seen twice",
the default). Reported: prompt tokens resumed, hits of the shared system part, snapshots evicted before any resume.

    python bench/snapshot_policy.py [--requests 400]

Sizes are in proportion to the full-size micro: a snapshot's fixed state weighs as much as ~2,300 tokens of KV.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.engine.prefix_cache import PrefixCache  # noqa: E402
from model.engine.scheduler import Scheduler  # noqa: E402
from model.engine.sequence import checked  # noqa: E402
from model.runtime.blocks import SlotAllocator  # noqa: E402
from model.types import EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from tests.fakes import BS, ListCopier  # noqa: E402

SYSTEM, QUESTION, RAW = 600, 60, 1800  # tokens


class MicroCopier(ListCopier):
    state_bytes = 2300 * 40 // BS  # the state as ~2,300 tokens of KV (37 MiB vs 16 KiB a token)


def run(policy: str, requests: int, chat_share: float, snapshots_room: int, seed: int = 0) -> dict:
    alloc = SlotAllocator(4, 4096, BS)
    cop = MicroCopier(4, 4096)
    room = snapshots_room * (cop.state_bytes + (SYSTEM + RAW) // 2 * 40 // BS)
    cache = PrefixCache(alloc, cop, 0, room)  # host tier only
    if policy == "always":
        cache.seen_before = lambda ids, points, namespace="": sorted(points)
    cfg = EngineConfig(max_concurrent_seqs=4, max_step_tokens=4096, prefill_chunk_tokens=512, max_input_tokens=4000,
                       max_total_tokens=4100, snapshot_interval_tokens=0 if policy == "none" else 512)
    sched = Scheduler(cfg, alloc, cache, eos_token_id=0)
    rng = random.Random(seed)
    system = [rng.randrange(3, 500) for _ in range(SYSTEM)]
    raw_pool = [[rng.randrange(3, 500) for _ in range(RAW)] for _ in range(8)]  # a few raw prefixes that recur
    reused = shared_hits = prompt_tokens = 0
    for _ in range(requests):
        r = rng.random()
        if r < chat_share:
            ids, at = system + [rng.randrange(3, 500) for _ in range(QUESTION)], (SYSTEM,)
        elif r < chat_share + 0.1:  # a raw prompt whose first 1,024 tokens recur (a template sent as text)
            ids, at = rng.choice(raw_pool)[:1024] + [rng.randrange(3, 500) for _ in range(400)], None
        else:  # a one-off raw prompt
            ids, at = [rng.randrange(3, 500) for _ in range(RAW)], None
        s = checked(GenerationRequest(tuple(ids), SamplingParams(max_new_tokens=2), snapshot_at=at), cfg, 10**6, 10**6)
        sched.add(s)
        while sched.has_work():
            seqs, batch = sched.schedule()
            for c in batch.chunks:
                cop.feed(alloc, c.slot, c.start, c.token_ids)
            sched.postprocess(seqs, [7 if c.want_logits else None for c in batch.chunks])
        reused += s.cached_tokens
        prompt_tokens += len(ids)
        shared_hits += at is not None and s.cached_tokens >= SYSTEM
    c = cache.counters
    return {"policy": policy, "prompt_tokens_resumed_share": round(reused / prompt_tokens, 3),
            "shared_system_hits": shared_hits, "snapshots_taken": c["snapshots_taken"],
            "interval_and_boundary_snapshots": c["snapshots_boundary"], "evictions": c["evictions"],
            "evictions_unused": c["evictions_unused"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "snapshot-policy.json"))
    a = p.parse_args(argv)
    rows = [run(policy, a.requests, 0.3, 24) for policy in ("none", "always", "seen twice")]
    report = {"requests": a.requests, "chat_share": 0.3, "recurring_raw_share": 0.1, "host_room_snapshots": 24,
              "tokens": {"system": SYSTEM, "question": QUESTION, "raw": RAW}, "policies": rows}
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
