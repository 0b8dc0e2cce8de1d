"""Helpers for the code/ (granite_sm) tests: import path, offline boto3 clients, real event streams."""

from __future__ import annotations

import binascii
import json
import struct
import sys
from pathlib import Path

import boto3
from botocore.eventstream import EventStream
from botocore.parsers import EventStreamJSONParser

ROOT = Path(__file__).resolve().parents[1]
CODE = ROOT / "code"
if str(CODE) not in sys.path:
    sys.path.insert(0, str(CODE))

REGION = "us-east-1"
ROLE = "arn:aws:iam::111122223333:role/SageMakerRole"
IMAGE = "111122223333.dkr.ecr.us-east-1.amazonaws.com/granite-h:1.0"


def client(name: str):
    """A real botocore client with fake credentials: a Stubber answers it, nothing goes on the network."""
    return boto3.Session(aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                         region_name=REGION).client(name)


def _header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return struct.pack("!B", len(n)) + n + struct.pack("!BH", 7, len(v)) + v  # 7 = string


def encode_event(event_type: str, payload: bytes, message_type: str = "event") -> bytes:
    """One AWS event-stream message (the binary framing InvokeEndpointWithResponseStream uses):
    prelude (total length, headers length, CRC32), headers, payload, CRC32 of everything before.
    message_type "exception": a modeled stream error (ModelStreamError, InternalStreamFailure), JSON payload."""
    if message_type == "exception":
        headers = (_header(":exception-type", event_type) + _header(":message-type", message_type)
                   + _header(":content-type", "application/json"))
    else:
        headers = (_header(":event-type", event_type) + _header(":message-type", message_type)
                   + _header(":content-type", "application/octet-stream"))
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(headers))
    prelude += struct.pack("!I", binascii.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + headers + payload
    return message + struct.pack("!I", binascii.crc32(message) & 0xFFFFFFFF)


class _Raw:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self):
        yield from self.chunks

    def close(self) -> None:
        pass


def payload_event_stream(parts: list[bytes], wire_chunk: int = 7, error: tuple[str, dict] | None = None) -> EventStream:
    """A botocore EventStream like the one InvokeEndpointWithResponseStream returns: each part is one
    PayloadPart event, then (if given) an exception event `error` = (type, JSON fields); the encoded
    bytes arrive from the "socket" in wire_chunk-sized pieces."""
    wire = b"".join(encode_event("PayloadPart", p) for p in parts)
    if error is not None:
        wire += encode_event(error[0], json.dumps(error[1]).encode(), "exception")
    chunks = [wire[i:i + wire_chunk] for i in range(0, len(wire), wire_chunk)]
    op = client("sagemaker-runtime").meta.service_model.operation_model("InvokeEndpointWithResponseStream")
    return EventStream(_Raw(chunks), op.output_shape.members["Body"], EventStreamJSONParser(),
                       "InvokeEndpointWithResponseStream")


def load(module: str):
    """granite_sm.<module> (code/ is put on sys.path above, so import through this helper)."""
    import importlib

    return importlib.import_module(f"granite_sm.{module}")
