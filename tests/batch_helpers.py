"""Small file helpers shared by the batch tests (their stand-in for handle_record is tests.fakes.fake_infer)."""

from __future__ import annotations

import json
import os


def write(path: str, data: bytes | str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def prompts(n: int, tag: str = "p") -> str:
    return "".join(json.dumps({"inputs": f"{tag}{i}"}) + "\n" for i in range(n))


def read_lines(path: str) -> list:
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(x) for x in data.split(b"\n")[:-1]]
