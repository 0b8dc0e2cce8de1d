"""Shared pieces: instance table, timeouts, names, S3 URIs, boto3 clients, common CLI flags."""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from typing import Any

MODEL_ID = "ibm-granite/granite-4.0-h-micro"
BASE_NAME = "granite-4-h-micro"
VARIANT = "AllTraffic"


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpus: int
    gpu: str
    gpu_mem_gib: int  # per GPU
    note: str


# Granite 4.0 H micro is ~6.4 GB in bf16 (3.2B params): it fits one GPU of any of these. The container
# runs one engine replica per GPU, so the 8-GPU instances serve 8 copies behind one endpoint.
INSTANCE_TYPES: dict[str, InstanceType] = {t.name: t for t in (
    InstanceType("ml.g5.xlarge", 1, "A10G", 24, "cheapest; fine for development and light traffic"),
    InstanceType("ml.g6e.xlarge", 1, "L40S", 48, "more memory for long contexts / many concurrent sequences"),
    InstanceType("ml.p4d.24xlarge", 8, "A100", 40, "8 replicas; high throughput"),
    InstanceType("ml.p5.48xlarge", 8, "H100", 80, "8 replicas; highest throughput"),
)}
DEFAULT_INSTANCE = "ml.g5.xlarge"

# A 6 GB model: S3 download + load + warm-up take minutes, well past SageMaker's defaults on a cold
# instance. Both are maximums, not waits: the endpoint goes InService as soon as /ping says 200.
STARTUP_HEALTH_CHECK_TIMEOUT_S = 900  # ContainerStartupHealthCheckTimeoutInSeconds (60..3600)
MODEL_DATA_DOWNLOAD_TIMEOUT_S = 1200  # ModelDataDownloadTimeoutInSeconds (60..3600)
INVOCATIONS_TIMEOUT_S = 600  # batch transform: ModelClientConfig.InvocationsTimeoutInSeconds (1..3600)

_NAME_BAD = re.compile(r"[^a-zA-Z0-9-]+")


def unique_name(prefix: str = BASE_NAME, now: float | None = None) -> str:
    """`<prefix>-YYYYmmdd-HHMMSS`, a valid SageMaker name (alphanumerics and '-', at most 63 chars)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    base = _NAME_BAD.sub("-", prefix).strip("-")[: 63 - len(stamp) - 1].rstrip("-")
    return f"{base}-{stamp}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key/part -> ("bucket", "key/part")."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, key


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key.lstrip('/')}"


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    """["K=V", ...] -> {"K": "V"}; the value may contain '='."""
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def boto_session(region: str | None = None, profile: str | None = None):
    import boto3

    return boto3.Session(region_name=region, profile_name=profile)


def clients(region: str | None = None, profile: str | None = None, *names: str) -> list[Any]:
    session = boto_session(region, profile)
    return [session.client(n) for n in names]


def add_aws_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", help="AWS region (default: the boto3 session's, e.g. AWS_DEFAULT_REGION)")
    parser.add_argument("--profile", help="AWS profile name")


def instance_table() -> str:
    rows = [f"{'instance':18} {'GPUs':>4}  {'GPU':5} {'GiB/GPU':>7}  note"]
    for t in INSTANCE_TYPES.values():
        rows.append(f"{t.name:18} {t.gpus:>4}  {t.gpu:5} {t.gpu_mem_gib:>7}  {t.note}")
    return "\n".join(rows)


def show(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
