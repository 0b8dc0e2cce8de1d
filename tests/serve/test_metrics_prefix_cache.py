"""/metrics renders the engine's prefix-cache counters and bytes per tier."""

from __future__ import annotations

from serve.metrics import Metrics


def test_prefix_cache_metrics():
    pc = dict(hits=3, hits_host=1, misses=2, evictions=1, demotions=4, tokens_reused=900, snapshots_taken=9,
              snapshots_device=2, snapshots_host=3, kv_blocks_held=17, sessions=1, bytes_device=1234, bytes_host=99)
    text = Metrics().render({"ready": True, "prefix_cache": pc})
    text = text.decode()
    for line in ("granite_prefix_cache_hits_total 3.0", "granite_prefix_cache_misses_total 2.0",
                 "granite_prefix_cache_evictions_total 1.0", "granite_prefix_cache_tokens_reused_total 900.0",
                 'granite_prefix_cache_bytes{tier="device"} 1234.0', 'granite_prefix_cache_bytes{tier="host"} 99.0',
                 "# TYPE granite_prefix_cache_hits_total counter", "granite_prefix_cache_sessions 1.0"):
        assert line in text.splitlines(), line
    empty = Metrics().render({"ready": True}).decode()  # prefix cache off: the metrics exist, at 0
    assert "granite_prefix_cache_hits_total 0.0" in empty.splitlines()


def test_disk_tier_metrics():
    pc = dict(bytes_device=1, bytes_host=2, bytes_disk=4096, snapshots_disk=3, hits_disk=2, spills=5,
              disk_discarded=3, disk_discarded_truncated=1, disk_discarded_corrupt=1, disk_discarded_foreign=1,
              disk_writes=7, disk_write_seconds=0.25, sessions_not_persisted=0, disk_pending_bytes=10,
              disk_read_buffer_bytes=38797312)
    m = Metrics()
    lines = m.render({"ready": True, "prefix_cache": pc}).decode().splitlines()
    for line in ('granite_prefix_cache_bytes{tier="disk"} 4096.0', "granite_prefix_cache_snapshots_disk 3.0",
                 "granite_prefix_cache_hits_disk_total 2.0", "granite_prefix_cache_spills_total 5.0",
                 "granite_prefix_cache_disk_discarded_total 3.0", "granite_prefix_cache_disk_discarded_truncated_total 1.0",
                 "granite_prefix_cache_disk_discarded_corrupt_total 1.0",
                 "granite_prefix_cache_disk_discarded_foreign_total 1.0", "granite_prefix_cache_disk_writes_total 7.0",
                 "granite_prefix_cache_disk_write_seconds_total 0.25", "granite_prefix_cache_disk_pending_bytes 10.0",
                 "granite_prefix_cache_disk_read_buffer_bytes 3.8797312e+07"):
        assert line in lines, line
    pc.update(disk_discarded_corrupt=4, disk_discarded=6)  # counters follow the engine's totals
    lines = m.render({"ready": True, "prefix_cache": pc}).decode().splitlines()
    assert "granite_prefix_cache_disk_discarded_corrupt_total 4.0" in lines
