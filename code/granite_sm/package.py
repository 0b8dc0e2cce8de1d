"""Package a Hugging Face checkpoint for SageMaker and upload it to S3.

Two layouts, both served from /opt/ml/model inside the container:
- model.tar.gz (ModelDataUrl): required by batch transform; SageMaker downloads and extracts it.
- an uncompressed S3 prefix (ModelDataSource S3DataType=S3Prefix, CompressionType=None): recommended
  for real-time endpoints with large models: no tar/untar, faster start.
Either may carry code/inference.py (the SageMaker override hooks, see code/inference.py).
--sign-key signs exactly the files that ship (code/ included) into a model.sig at the root, which the
container verifies before loading (MODEL_SIGNATURE_PUBLIC_KEY or, with --sign-cert, _CERT_CHAIN).

    python -m granite_sm.package --model ibm-granite/granite-4.0-h-micro --bucket my-bucket \
        --prefix granite --format both --inference-py code/inference.py [--sign-key signer.key]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from granite_sm.common import MODEL_ID, add_aws_args, clients, parse_s3_uri, s3_uri

# What the server needs: config, safetensors weights (+ index), tokenizer files, chat template.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model"]
CODE_DIR = "code"
SIGNATURE = "model.sig"


def snapshot(model: str, revision: str | None = None, local_dir: str | Path | None = None,
             token: str | None = None) -> Path:
    """A local checkpoint folder: `model` itself if it is a folder, else a Hub download of `model`."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=model, revision=revision, local_dir=local_dir, token=token,
                                  allow_patterns=ALLOW_PATTERNS))


def model_files(model_dir: str | Path, inference_py: str | Path | None = None,
                requirements: str | Path | None = None) -> Iterator[tuple[Path, str]]:
    """(local path, relative name) for every file to ship, in a stable order. Hidden folders (the Hub's
    .cache) are skipped; a given inference.py/requirements.txt replaces the checkpoint's own."""
    root = Path(model_dir)
    extra = {f"{CODE_DIR}/inference.py": inference_py, f"{CODE_DIR}/requirements.txt": requirements}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        if extra.get(rel):
            continue
        yield path, rel
    for rel, src in extra.items():
        if src:
            if not Path(src).is_file():
                raise FileNotFoundError(src)
            yield Path(src), rel


def stage_signed(model_dir: str | Path, out_dir: str | Path, key: str | Path, cert: str | Path | None = None,
                 chain: tuple[str | Path, ...] = (), inference_py: str | Path | None = None,
                 requirements: str | Path | None = None) -> Path:
    """out_dir holding exactly the files that ship (hard links where possible: no copy of the weights)
    plus their model.sig, so the signature covers the folder the container will serve. A model.sig
    already in model_dir is replaced, never written through a link."""
    try:
        from serve.sign import sign_checkpoint
    except ImportError:
        raise SystemExit("signing needs this repository installed: pip install '.[client]'") from None
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    for path, rel in model_files(model_dir, inference_py, requirements):
        if rel == SIGNATURE:
            continue
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path.resolve(), dest)
        except OSError:  # another filesystem
            shutil.copy2(path, dest)
    sign_checkpoint(out, key=Path(key), cert=Path(cert) if cert else None, chain=tuple(Path(c) for c in chain),
                    signature=out / SIGNATURE)
    return out


def make_tarball(model_dir: str | Path, out_path: str | Path, inference_py: str | Path | None = None,
                 requirements: str | Path | None = None, compresslevel: int = 1) -> Path:
    """model.tar.gz with the checkpoint files at the archive root (SageMaker extracts it into
    /opt/ml/model). safetensors barely compress, so level 1 saves minutes for little size."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz", compresslevel=compresslevel) as tar:
        for path, rel in model_files(model_dir, inference_py, requirements):
            tar.add(path, arcname=rel, recursive=False)
    return out


def upload_file(s3, path: str | Path, bucket: str, key: str) -> str:
    """Managed (multipart above 8 MiB) upload; returns the s3:// URI."""
    s3.upload_file(str(path), bucket, key)
    return s3_uri(bucket, key)


def upload_prefix(s3, model_dir: str | Path, bucket: str, prefix: str, inference_py: str | Path | None = None,
                  requirements: str | Path | None = None) -> str:
    """Upload the checkpoint uncompressed under `prefix/`; returns the prefix URI (ends in '/'),
    which is what ModelDataSource.S3DataSource.S3Uri wants for S3DataType=S3Prefix."""
    prefix = prefix.strip("/")
    for path, rel in model_files(model_dir, inference_py, requirements):
        upload_file(s3, path, bucket, f"{prefix}/{rel}")
    return s3_uri(bucket, prefix + "/")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Package a Hugging Face checkpoint as model.tar.gz and/or an "
                                            "uncompressed S3 prefix, and upload it.")
    p.add_argument("--model", default=MODEL_ID, help=f"Hub model id or local folder (default: {MODEL_ID})")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--hf-token", help="token for gated/private models (default: huggingface_hub's login)")
    p.add_argument("--work-dir", default="build/model", help="where to download and write model.tar.gz")
    p.add_argument("--format", choices=("tar", "prefix", "both"), default="both")
    p.add_argument("--inference-py", help="a code/inference.py to include (e.g. code/inference.py)")
    p.add_argument("--requirements", help="a code/requirements.txt to include")
    p.add_argument("--s3", help="destination s3://bucket/prefix; without it, only the local model.tar.gz")
    p.add_argument("--sign-key", help="PEM EC private key: write a model-signing model.sig over the shipped files")
    p.add_argument("--sign-cert", help="signing certificate of --sign-key (certificate method)")
    p.add_argument("--sign-chain", action="append", default=[], help="CA certificates of --sign-cert (repeatable)")
    add_aws_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(args.work_dir)
    model_dir = snapshot(args.model, args.revision, work / "snapshot", args.hf_token)
    print(f"checkpoint: {model_dir}")
    inference_py, requirements = args.inference_py, args.requirements
    if args.sign_key:
        model_dir = stage_signed(model_dir, work / "signed", args.sign_key, args.sign_cert, tuple(args.sign_chain),
                                 inference_py, requirements)
        inference_py = requirements = None  # staged already
        print(f"signed: {model_dir / SIGNATURE}")
    s3 = clients(args.region, args.profile, "s3")[0] if args.s3 else None
    bucket, prefix = parse_s3_uri(args.s3) if args.s3 else ("", "")
    prefix = prefix.strip("/")
    if args.format in ("tar", "both"):
        tar = make_tarball(model_dir, work / "model.tar.gz", inference_py, requirements)
        print(f"model.tar.gz: {tar} ({tar.stat().st_size / 2**20:.1f} MiB)")
        if s3 is not None:
            print(f"ModelDataUrl: {upload_file(s3, tar, bucket, f'{prefix}/model.tar.gz'.lstrip('/'))}")
    if args.format in ("prefix", "both") and s3 is not None:
        uri = upload_prefix(s3, model_dir, bucket, f"{prefix}/model".lstrip("/"), inference_py, requirements)
        print(f"ModelDataSource S3Prefix: {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
