"""A checkpoint's identity (model/checkpoint/identity.py): stable for the same files, changed by anything that may
change the weights or config a snapshot was computed under."""

from __future__ import annotations

import os
import shutil

from model.checkpoint.identity import checkpoint_identity


def test_identity_is_stable_and_changes_with_the_checkpoint(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    base = checkpoint_identity(ckpt)
    assert checkpoint_identity(ckpt) == base and len(base) == 64
    weights = sorted(ckpt.glob("*.safetensors"))[0]
    st = weights.stat()

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last sample window covers the file's end
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same time, other bytes
    assert checkpoint_identity(ckpt) != base
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert checkpoint_identity(ckpt) == base
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # re-extracted: another identity (safe side)
    assert checkpoint_identity(ckpt) != base
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert checkpoint_identity(ckpt) != base
