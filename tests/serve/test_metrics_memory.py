"""/metrics accounts for what the prefix cache holds in host memory beyond its tiers (the index of snapshot keys)
and the workers' resident memory, so RSS net of the reported cache bytes can be watched (issue 20 item 4)."""

from __future__ import annotations

from serve.metrics import Metrics, resident_bytes


def test_index_bytes_boundary_snapshots_and_resident_memory():
    pc = dict(snapshots_taken=5, snapshots_boundary=2, bytes_device=10, bytes_host=20, bytes_index=4400,
              index_nodes=7, bytes_device_kv=8)
    lines = Metrics().render({"ready": True, "prefix_cache": pc}).decode().splitlines()
    for line in ('granite_prefix_cache_bytes{tier="index"} 4400.0', "granite_prefix_cache_snapshots_boundary_total 2.0",
                 "granite_prefix_cache_index_nodes 7.0",
                 "granite_prefix_cache_device_kv_bytes 8.0"):
        assert line in lines, line
    rss = next(float(x.split()[1]) for x in lines if x.startswith("granite_resident_memory_bytes "))
    assert rss > 10 << 20 and abs(rss - resident_bytes()) < 200 << 20  # this process: a Python with prometheus
