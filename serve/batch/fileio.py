"""Batch transform inputs and outputs, on a local disk or S3.

Inputs: `--input` names one file, a folder, or an S3 object / prefix. A folder or prefix is walked
recursively; files whose name starts with "." or "_" and files ending in ".out" are skipped (our
own work dir, _SUCCESS markers, outputs of an earlier run in the same place). Every other file is
read as JSON Lines whatever its extension, as SageMaker does with SplitType=Line.

Records: a file's bytes split on "\\n"; one trailing "\\r" per line is dropped (CRLF files), a
UTF-8 BOM at the start of the file is dropped, and a final line without "\\n" still counts. So an
empty file has 0 records and "a\\n\\nb" has 3 (the empty line gets an error object in the output).

Outputs: `<output>/<relative input path>.out`, published whole: a local file is written to a
temp name in the same folder, fsync'd and renamed; an S3 object is uploaded in one piece
(multipart above s3io.MULTIPART_THRESHOLD, which S3 only shows once complete).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from serve.batch import s3io

_BOM = b"\xef\xbb\xbf"
_READ = 1 << 20


@dataclass(frozen=True)
class InputFile:
    uri: str  # local path or s3:// URI
    rel: str  # path relative to the input folder/prefix, "/"-separated; names the output
    identity: str  # changes when the content may have changed (size + mtime, or S3 ETag)
    mtime: int = 0  # last modified, unix seconds (stamps OpenAI `created`, so reruns give the same bytes)
    s3: s3io.S3Object | None = None


def _skipped(name: str) -> bool:
    return name.startswith((".", "_")) or name.endswith(".out")


def list_inputs(uri: str) -> list[InputFile]:
    """The input files in processing order (sorted by relative path)."""
    if s3io.is_s3(uri):
        bucket, key = s3io.split_uri(uri)
        if key and not key.endswith("/"):
            obj = s3io.head(bucket, key)
            if obj is not None:
                return [InputFile(uri, key.rsplit("/", 1)[-1], f"etag:{obj.etag}:{obj.size}", obj.mtime, obj)]
            key += "/"
        files = []
        for obj in s3io.list_objects(f"s3://{bucket}/{key}"):
            rel = obj.key[len(key):]
            if not any(_skipped(part) for part in rel.split("/")):
                files.append(InputFile(f"s3://{bucket}/{obj.key}", rel, f"etag:{obj.etag}:{obj.size}", obj.mtime, obj))
        return files
    if os.path.isfile(uri):
        return [_local_file(uri, os.path.basename(uri))]
    if not os.path.isdir(uri):
        raise FileNotFoundError(f"input {uri!r} is neither a file nor a folder")
    files = []
    for root, dirs, names in os.walk(uri):
        dirs[:] = sorted(d for d in dirs if not _skipped(d))
        for name in names:
            path = os.path.join(root, name)
            if not _skipped(name) and os.path.isfile(path):
                rel = os.path.relpath(path, uri).replace(os.sep, "/")
                files.append(_local_file(path, rel))
    files.sort(key=lambda f: f.rel)
    return files


def _local_file(path: str, rel: str) -> InputFile:
    st = os.stat(path)
    return InputFile(path, rel, f"local:{st.st_size}:{st.st_mtime_ns}", int(st.st_mtime))


def _local_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            yield chunk


def split_records(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Bytes in arbitrary chunks -> records (bytes, without line terminator). See module doc."""
    pending = b""
    first = True
    for chunk in chunks:
        pending += chunk
        if first:
            if len(pending) < len(_BOM) and _BOM.startswith(pending):
                continue  # could still be a BOM split over chunks
            if pending.startswith(_BOM):
                pending = pending[len(_BOM):]
            first = False
        lines = pending.split(b"\n")
        pending = lines.pop()
        for line in lines:
            yield line[:-1] if line.endswith(b"\r") else line
    if first and pending.startswith(_BOM):
        pending = pending[len(_BOM):]
    if pending:
        yield pending[:-1] if pending.endswith(b"\r") else pending


def iter_records(f: InputFile) -> Iterator[bytes]:
    return split_records(s3io.iter_bytes(f.s3) if f.s3 is not None else _local_chunks(f.uri))


def output_uri(output: str, rel: str) -> str:
    if s3io.is_s3(output):
        return output.rstrip("/") + "/" + rel + ".out"
    return os.path.join(output, *rel.split("/")) + ".out"


def output_exists(uri: str) -> bool:
    if s3io.is_s3(uri):
        return s3io.head(*s3io.split_uri(uri)) is not None
    return os.path.isfile(uri)


def staging_path(out_uri: str, work_dir: str, rel: str) -> str:
    """Where the finished output is assembled before publish(): next to a local output (so the
    rename stays on one file system), in the work dir for S3."""
    if s3io.is_s3(out_uri):
        return os.path.join(work_dir, *rel.split("/")) + ".out.tmp"
    head, name = os.path.split(out_uri)
    return os.path.join(head, f".{name}.tmp-{os.getpid()}")


def clean_staging(out_uri: str) -> None:
    """Remove temp files a killed earlier run left next to a local output."""
    if s3io.is_s3(out_uri):
        return
    head, name = os.path.split(out_uri)
    try:
        names = os.listdir(head or ".")
    except FileNotFoundError:
        return
    for n in names:
        if n.startswith(f".{name}.tmp-"):
            try:
                os.unlink(os.path.join(head, n))
            except FileNotFoundError:
                pass


def publish(staged: str, out_uri: str) -> None:
    """The staged file (already fsync'd) becomes the output in one step."""
    if s3io.is_s3(out_uri):
        bucket, key = s3io.split_uri(out_uri)
        s3io.upload_file(staged, bucket, key)
        os.unlink(staged)
        return
    os.replace(staged, out_uri)
    fsync_dir(os.path.dirname(out_uri) or ".")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_small(uri: str, data: bytes) -> None:
    """A small file (the summary) written atomically, locally or to S3."""
    if s3io.is_s3(uri):
        s3io.put_bytes(*s3io.split_uri(uri), data)
        return
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    tmp = f"{uri}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, uri)
