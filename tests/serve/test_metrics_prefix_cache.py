"""/metrics renders the engine's prefix-cache counters and bytes per tier."""

from __future__ import annotations

from serve.metrics import Metrics


def test_prefix_cache_metrics():
    pc = dict(hits=3, hits_host=1, misses=2, evictions=1, demotions=4, tokens_reused=900, snapshots_taken=9,
              snapshots_device=2, snapshots_host=3, kv_blocks_held=17, sessions=1, bytes_device=1234, bytes_host=99)
    text = Metrics().render({"ready": True, "prefix_cache": pc})
    for line in ("granite_prefix_cache_hits_total 3", "granite_prefix_cache_misses_total 2",
                 "granite_prefix_cache_evictions_total 1", "granite_prefix_cache_tokens_reused_total 900",
                 'granite_prefix_cache_bytes{tier="device"} 1234', 'granite_prefix_cache_bytes{tier="host"} 99',
                 "# TYPE granite_prefix_cache_hits_total counter", "granite_prefix_cache_sessions 1"):
        assert line in text.splitlines(), line
    assert "prefix_cache" not in Metrics().render({"ready": True})
