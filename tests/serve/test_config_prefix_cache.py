"""The prefix-cache variables reach EngineConfig; bad values name the variable."""

from __future__ import annotations

import pytest

from serve.config import ConfigError, load_config


def test_prefix_cache_variables_are_read():
    e = load_config({"PREFIX_CACHE": "off", "SNAPSHOT_DEVICE_SHARE": "0.5", "SNAPSHOT_HOST_BYTES": "1000"}).engine
    assert (e.prefix_cache, e.snapshot_device_share, e.snapshot_host_bytes) == (False, 0.5, 1000)
    d = load_config({}).engine
    assert d.prefix_cache is True and 0 < d.snapshot_device_share <= 1 and d.snapshot_host_bytes > 0


@pytest.mark.parametrize("env,name", [({"SNAPSHOT_DEVICE_SHARE": "1.5"}, "SNAPSHOT_DEVICE_SHARE"),
                                      ({"SNAPSHOT_DEVICE_SHARE": "half"}, "SNAPSHOT_DEVICE_SHARE"),
                                      ({"SNAPSHOT_HOST_BYTES": "-1"}, "SNAPSHOT_HOST_BYTES"),
                                      ({"PREFIX_CACHE": "maybe"}, "PREFIX_CACHE")])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        load_config(env)
