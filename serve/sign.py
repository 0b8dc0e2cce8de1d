"""`python -m serve sign MODEL_DIR --key KEY [--cert CERT --chain PEM ...]`: sign a checkpoint.

Writes a model-signing (OpenSSF) bundle, by default MODEL_DIR/model.sig, over every file in MODEL_DIR
(but the bundle, git files and --ignore paths), so that the server and `python -m serve batch` can
verify it before loading (MODEL_SIGNATURE_PUBLIC_KEY / MODEL_SIGNATURE_CERT_CHAIN). Sign the folder
exactly as it will be served: add code/inference.py first, since any later file fails the check.
Keyless sigstore signing needs an OIDC login and the internet: use the library's own CLI,
`model_signing sign sigstore MODEL_DIR`. Exit status 0 signed, 2 bad arguments or signing failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from model.checkpoint.signing import inside, read_payload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve sign", description="Sign a checkpoint folder (model-signing).")
    p.add_argument("model_dir", type=Path, help="the checkpoint folder, as it will be mounted at /opt/ml/model")
    p.add_argument("--key", type=Path, required=True, help="PEM EC private key (P-256/384/521)")
    p.add_argument("--cert", type=Path, help="signing certificate for --key (certificate method)")
    p.add_argument("--chain", type=Path, action="append", default=[],
                   help="PEM CA certificates of --cert (repeatable); verifiers trust its root")
    p.add_argument("--signature", type=Path, help="bundle to write (default: MODEL_DIR/model.sig)")
    p.add_argument("--ignore", action="append", default=[], help="path relative to MODEL_DIR to leave out (repeatable)")
    p.add_argument("--hash", choices=("blake3", "sha256"), default="blake3",
                   help="per-file digest (default blake3: ~2x sha256 here, one file on every core)")
    p.add_argument("--password-file", type=Path, help="file holding the password of an encrypted --key")
    return p


def sign_checkpoint(model_dir: Path, *, key: Path, cert: Path | None = None, chain: tuple[Path, ...] = (),
                    signature: Path | None = None, ignore_paths: tuple[str, ...] = (), algorithm: str = "blake3",
                    password: str | None = None) -> Path:
    """Sign every file of model_dir (but the bundle itself and ignore_paths) with an EC private key,
    or with a signing certificate (+ its CA chain) when cert is given. Returns the bundle path.
    Per-file digests (what MODEL_SIGNATURE_IGNORE_UNSIGNED needs): blake3 hashes one file on every
    core, sha256 hashes files in parallel (one core each)."""
    from model_signing import hashing, signing

    model_dir = Path(model_dir)
    signature = Path(signature) if signature else model_dir / "model.sig"
    ignored = [*ignore_paths, *inside(model_dir, [signature, Path(key), *([Path(cert)] if cert else []),
                                                    *map(Path, chain)])]
    workers = os.cpu_count() or 1
    hcfg = hashing.Config().use_file_serialization(hashing_algorithm=algorithm, max_workers=workers)
    config = signing.Config().set_hashing_config(hcfg.set_ignored_paths(paths=ignored))
    if cert:
        config = config.use_certificate_signer(private_key=key, signing_certificate=cert, certificate_chain=chain)
    else:
        config = config.use_elliptic_key_signer(private_key=key, password=password)
    config.sign(model_dir, signature)
    return signature


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        print(f"sign: {args.model_dir} holds no config.json (not a checkpoint folder)", file=sys.stderr)
        return 2
    if args.chain and not args.cert:
        print("sign: --chain needs --cert", file=sys.stderr)
        return 2
    password = args.password_file.read_text().strip() if args.password_file else None
    try:
        sig = sign_checkpoint(args.model_dir, key=args.key, cert=args.cert, chain=tuple(args.chain),
                              signature=args.signature, ignore_paths=tuple(args.ignore), algorithm=args.hash,
                              password=password)
    except Exception as e:  # bad key/certificate files, unreadable folder, symlinks
        print(f"sign: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    files = len(read_payload(sig)["predicate"]["resources"])
    method = "certificate" if args.cert else "key"
    print(f"sign: wrote {sig} ({method} method, {args.hash}, {files} files); verify with "
          + ("MODEL_SIGNATURE_CERT_CHAIN=<root/chain PEM>" if args.cert else "MODEL_SIGNATURE_PUBLIC_KEY=<public key>"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
