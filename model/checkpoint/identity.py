"""A checkpoint's identity for state kept on disk (the prefix cache's disk tier, model/runtime/disk_tier.py): a
digest that changes whenever the weights or the config that computed a snapshot may have changed. torch-free.

Hashing every weight byte costs seconds per GB at each start (README "Signed checkpoints": 5-14 s for the
6.4 GB micro checkpoint), too much to pay on every worker restart, so the identity is a fingerprint taken in
milliseconds: config.json, the model-signing bundle when there is one (its signed manifest holds a digest of
every file: the same identity as a full hash), and for each weights file its name, size, modification time,
safetensors header (every tensor's name, dtype, shape and offsets) and evenly spread samples of its bytes.
Errors only go the safe way: a re-extracted or re-downloaded checkpoint gets new modification times, so its
snapshots are discarded (a miss), never resumed under other weights.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

SAMPLES = 16  # per weights file
SAMPLE_BYTES = 64 << 10
_HEADER_MAX = 100 << 20  # safetensors caps its JSON header at 100 MB


def checkpoint_identity(path: Path, signature_file: str = "model.sig") -> str:
    """Hex digest of the checkpoint folder `path` (see the module docstring for what it covers)."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=32)
    for name in ("config.json", signature_file):
        f = path / name
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"(absent)") + b"\0")
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(f, "rb") as fh:
            raw = fh.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            h.update(raw + fh.read(min(n, _HEADER_MAX)))
            for i in range(SAMPLES):  # evenly spread, the first at the start and the last at the end
                fh.seek(max(0, st.st_size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()
