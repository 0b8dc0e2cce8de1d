"""S3 access for the batch transform: list a prefix, stream an object, upload a whole object.

boto3 finds region and credentials through its usual chain, and an endpoint override through
its own `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` variables (tests point it at moto), so no
environment variable is read here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("serve.batch")

_CHUNK = 1 << 20  # bytes per read from a streaming body
MULTIPART_THRESHOLD = 64 << 20  # objects above this upload in parts (S3's minimum part is 5 MiB)
_MAX_REOPENS = 8  # a broken read stream is resumed with a Range request this many times

_client_lock = threading.Lock()
_client = None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_uri(uri: str) -> tuple[str, str]:
    """"s3://bucket/a/b" -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, key


def client():
    global _client
    with _client_lock:
        if _client is None:
            import boto3
            from botocore.config import Config

            # Many worker threads share one client (boto3 clients are thread-safe).
            _client = boto3.client(
                "s3", config=Config(retries={"max_attempts": 10, "mode": "adaptive"}, max_pool_connections=32)
            )
        return _client


def reset_client() -> None:
    """Forget the cached client (tests change the endpoint between runs)."""
    global _client
    with _client_lock:
        _client = None


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str
    size: int
    etag: str
    mtime: int = 0  # LastModified, unix seconds


def list_objects(uri: str) -> list[S3Object]:
    """Every object under the prefix (recursively), sorted by key; "folder" markers are skipped."""
    bucket, prefix = split_uri(uri)
    out = []
    pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for o in page.get("Contents", ()):
            if not o["Key"].endswith("/"):
                out.append(S3Object(bucket, o["Key"], int(o["Size"]), o["ETag"], int(o["LastModified"].timestamp())))
    out.sort(key=lambda o: o.key)
    return out


def head(bucket: str, key: str) -> S3Object | None:
    from botocore.exceptions import ClientError

    try:
        r = client().head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return S3Object(bucket, key, int(r["ContentLength"]), r["ETag"], int(r["LastModified"].timestamp()))


def iter_bytes(obj: S3Object) -> Iterator[bytes]:
    """The object's bytes in chunks, streamed. A stream that breaks (or idles out while the batch
    is busy) is reopened at the byte where it stopped, pinned to the same ETag."""
    from botocore.exceptions import BotoCoreError

    pos, reopens = 0, 0
    while pos < obj.size or obj.size == 0:
        kwargs = {"Bucket": obj.bucket, "Key": obj.key, "IfMatch": obj.etag}
        if pos:
            kwargs["Range"] = f"bytes={pos}-"
        try:
            body = client().get_object(**kwargs)["Body"]
            for chunk in body.iter_chunks(_CHUNK):
                pos += len(chunk)
                yield chunk
            return
        except (BotoCoreError, ConnectionError, OSError) as e:
            if reopens >= _MAX_REOPENS:
                raise
            reopens += 1
            log.warning("s3://%s/%s: read broke at byte %d (%s); reopening", obj.bucket, obj.key, pos, e)


def upload_file(path: str, bucket: str, key: str, content_type: str = "application/jsonlines") -> None:
    """One complete object appears at once (a single PUT, or a multipart upload completed at the end)."""
    from boto3.s3.transfer import TransferConfig

    cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
    client().upload_file(path, bucket, key, ExtraArgs={"ContentType": content_type}, Config=cfg)


def put_bytes(bucket: str, key: str, data: bytes, content_type: str = "application/json") -> None:
    client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
