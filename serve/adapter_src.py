"""Where an adapter's files come from (torch-free): a registration's `src` -> a local folder holding
adapter_config.json + adapter_model.safetensors.

  local folder      absolute, no '..', inside one of ADAPTER_SRC_ROOTS (or MODEL_CACHE_DIR) once symlinks are
                    resolved; the adapter may sit in it, one folder down, or in the one *.tar.gz it holds (what
                    SageMaker downloads for an adapter inference component's ArtifactUrl)
  local *.tar.gz    the same rules; extracted under MODEL_CACHE_DIR
  s3://bucket/key   a prefix (every object under it) or one *.tar.gz, downloaded with boto3 under MODEL_CACHE_DIR
Anything else (a relative path, '..', a path outside the roots, http://, file://) is refused with the reason.
Archives are extracted with tarfile's "data" filter (no absolute paths, no '..', no links out, no devices) and
a size cap. Downloads go into a folder named by a digest of the source and are locked per folder, so several
gunicorn workers registering the same source share one copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import tarfile
from contextlib import contextmanager
from pathlib import Path

from model.types import AdapterInvalid

CONFIG = "adapter_config.json"
MAX_ARCHIVE_BYTES = 8 << 30  # an adapter of the full-size model at rank 256 is ~2 GB in fp32
DONE = ".complete"


def _bad(src: str, why: str) -> AdapterInvalid:
    return AdapterInvalid(f"adapter src {src[:200]!r}: {why}")


def adapter_dir(folder: Path) -> Path | None:
    """The folder holding adapter_config.json: `folder` itself or its one sub-folder that does."""
    if (folder / CONFIG).is_file():
        return folder
    subs = [d for d in folder.iterdir() if d.is_dir() and (d / CONFIG).is_file()]
    return subs[0] if len(subs) == 1 else None


def resolve(src: str, name: str, roots: tuple[str, ...], cache_dir: str) -> Path:
    if not isinstance(src, str) or not src or "\x00" in src or len(src) > 1024:
        raise _bad(str(src), "must be a non-empty path or s3:// URI")
    if src.startswith("s3://"):
        return _from_s3(src, Path(cache_dir))
    if "://" in src:
        raise _bad(src, "only local folders and s3:// URIs are supported")
    p = Path(src)
    if not p.is_absolute() or ".." in p.parts:
        raise _bad(src, "unsafe path: it must be absolute, without '..'")
    real = p.resolve()
    allowed = [Path(r).resolve() for r in (*roots, cache_dir) if r]
    if not any(real == r or r in real.parents for r in allowed):
        raise _bad(src, f"unsafe path: outside the allowed folders ({', '.join(map(str, allowed))}; "
                        "ADAPTER_SRC_ROOTS)")
    if not real.exists():
        raise _bad(src, "not found")
    if real.is_file():
        if not real.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise _bad(src, "a file that is not a .tar.gz archive")
        return _extracted(real, Path(cache_dir))
    found = adapter_dir(real)
    if found is not None:
        return found
    archives = sorted(real.glob("*.tar.gz")) + sorted(real.glob("*.tgz"))
    if len(archives) == 1:
        return _extracted(archives[0], Path(cache_dir))
    raise _bad(src, f"no {CONFIG} in it (nor in one sub-folder or one .tar.gz archive)")


@contextmanager
def _locked(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(str(folder) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _work_dir(cache: Path, key: str) -> Path:
    return cache / "adapters" / "sources" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _extracted(archive: Path, cache: Path) -> Path:
    st = archive.stat()
    out = _work_dir(cache, f"{archive}:{st.st_size}:{st.st_mtime_ns}")
    with _locked(out):
        if not (out / DONE).is_file():
            extract(archive, out)
            (out / DONE).touch()
    found = adapter_dir(out)
    if found is None:
        raise _bad(str(archive), f"the archive holds no {CONFIG} (at its top or in one folder)")
    return found


def extract(archive: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            if sum(m.size for m in members) > MAX_ARCHIVE_BYTES:
                raise _bad(str(archive), f"the archive holds more than {MAX_ARCHIVE_BYTES} bytes")
            if any(m.issym() or m.islnk() for m in members):
                raise _bad(str(archive), "the archive holds links")
            tar.extractall(out, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise _bad(str(archive), f"not a readable tar archive ({type(e).__name__}: {e})") from None


def _from_s3(src: str, cache: Path) -> Path:
    bucket, _, prefix = src[5:].partition("/")
    if not bucket or ".." in prefix.split("/"):
        raise _bad(src, "not a valid s3://bucket/key URI")
    out = _work_dir(cache, src)
    with _locked(out):
        if not (out / DONE).is_file():
            _download(src, bucket, prefix, out)
            (out / DONE).touch()
    found = adapter_dir(out)
    if found is None:
        archives = sorted(out.rglob("*.tar.gz"))
        if len(archives) == 1:
            return _extracted(archives[0], cache)
        raise _bad(src, f"no {CONFIG} under it (nor one .tar.gz archive)")
    return found


def _download(src: str, bucket: str, prefix: str, out: Path) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client("s3")
    out.mkdir(parents=True, exist_ok=True)
    try:
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not keys:
            raise _bad(src, "no objects under it")
        base = prefix if prefix in keys else (prefix.rstrip("/") + "/" if prefix else "")
        for key in keys:
            rel = Path(key).name if key == prefix else key[len(base):]
            target = (out / rel).resolve()
            if out.resolve() not in target.parents:
                raise _bad(src, f"unsafe object key {key!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(target))
    except (BotoCoreError, ClientError) as e:
        raise _bad(src, f"S3 download failed: {e}") from None
