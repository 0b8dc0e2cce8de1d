"""Signed checkpoints: verify a model-signing (OpenSSF) bundle before any weight is read.

The `model_signing` library does the work (hashing every file into a manifest, checking the sigstore
bundle's signature, comparing the manifests); this module chooses its configuration from a
SignaturePolicy (built by serve/config.py) and turns its exceptions into one line a person can act
on. torch-free; model_signing is imported only when a signature is checked. Signing: serve/sign.py.

The hashing method (sha256/blake2/blake3, per file or per shard) is the one the bundle declares: it
is read from the bundle to configure the library (an unauthenticated hint: the library then checks
the signature over that very payload before comparing any digest).

Size: ~310 lines, of which _explain's actionable message per library failure is a fifth.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("model.checkpoint.signing")

MODES = ("off", "verify", "require")
TRUST_BUNDLED = "bundled"  # sigstore's packaged copy of the public-good production trust root
TRUST_TUF = "tuf"  # download the trust root from Sigstore's TUF repository at start (needs internet)
_SIGSTORE_PROD_STORE = "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"
_MAX_NAMES = 5


class SignatureError(RuntimeError):
    """The checkpoint's signature is missing (under require), unusable or does not match the files."""


@dataclass(frozen=True)
class SignaturePolicy:
    mode: str = "verify"  # off | verify (when a signature is present) | require
    file: str = "model.sig"  # relative to the checkpoint folder, or absolute
    public_key: str | None = None  # PEM public key (model_signing "key" method)
    cert_chain: tuple[str, ...] = ()  # PEM files: CA chain of the signing certificate ("certificate")
    identity: str | None = None  # keyless sigstore: the signer's identity (certificate SAN) ...
    issuer: str | None = None  # ... and the OIDC issuer that vouched for it
    trust_config: str | None = None  # keyless: a ClientTrustConfig JSON path | "bundled" | "tuf"
    ignore_paths: tuple[str, ...] = ()  # relative to the checkpoint folder; never hashed
    ignore_unsigned: bool = False  # files on disk the signature does not list are ignored, not refused
    cache_dir: str = "/tmp/granite-h-cache"  # where the "bundled" trust config is written

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {'|'.join(MODES)}, got {self.mode!r}")
        methods = [m for m, on in (("MODEL_SIGNATURE_PUBLIC_KEY", self.public_key),
                                   ("MODEL_SIGNATURE_CERT_CHAIN", self.cert_chain),
                                   ("MODEL_SIGNATURE_IDENTITY", self.identity)) if on]
        if len(methods) > 1:
            raise ValueError(f"set one verification method, not {' and '.join(methods)}")
        if bool(self.identity) != bool(self.issuer):
            raise ValueError("keyless verification needs both MODEL_SIGNATURE_IDENTITY and MODEL_SIGNATURE_ISSUER")
        if self.identity and not self.trust_config:
            raise ValueError("keyless verification needs MODEL_SIGNATURE_TRUST_CONFIG: a trust config JSON path "
                             f"(offline), '{TRUST_BUNDLED}' (the sigstore release's copy, offline) or '{TRUST_TUF}' "
                             "(downloaded from Sigstore at start)")

    @property
    def method(self) -> str | None:
        if self.public_key:
            return "key"
        if self.cert_chain:
            return "certificate"
        return "sigstore" if self.identity else None

    def describe(self) -> str:
        return {"key": f"public key {self.public_key}", "certificate": f"certificate chain {', '.join(self.cert_chain)}",
                "sigstore": f"sigstore identity {self.identity} from {self.issuer} (trust: {self.trust_config})",
                }.get(self.method or "", "no method configured")


@dataclass(frozen=True)
class Verified:
    root: Path
    files: int
    bytes: int
    seconds: float
    hashing: str


def find_signature(checkpoint: Path, policy: SignaturePolicy, mount: Path | None = None) -> Path | None:
    """The bundle for `checkpoint`: policy.file if absolute, else in the checkpoint folder, else in the
    mounted folder above it (a model.tar.gz that extracted into one sub-folder)."""
    if os.path.isabs(policy.file):
        return Path(policy.file) if Path(policy.file).is_file() else None
    for folder in (checkpoint, mount):
        if folder is not None and (folder / policy.file).is_file():
            return folder / policy.file
    return None


def verify_checkpoint(checkpoint: Path, policy: SignaturePolicy, *, mount: Path | None = None,
                      allow_symlinks: bool = False) -> Verified | None:
    """Verify before any weight is read. None when there is nothing to check (off, or no signature
    under verify); SignatureError with the failed check otherwise. allow_symlinks: a Hub cache
    snapshot (its files are links into blobs/)."""
    if policy.mode == "off":
        log.warning("model signature verification is OFF (MODEL_SIGNATURE=off): %s is served unverified", checkpoint)
        return None
    sig = find_signature(checkpoint, policy, mount)
    if sig is None:
        where = policy.file if os.path.isabs(policy.file) else f"{policy.file} in {checkpoint}"
        if policy.mode == "require":
            raise SignatureError(f"no model signature: {where} not found and MODEL_SIGNATURE=require; sign the "
                                 f"checkpoint (python -m serve sign DIR --key KEY) or set MODEL_SIGNATURE_FILE")
        log.warning("no model signature (%s): serving unverified; MODEL_SIGNATURE=require refuses unsigned "
                    "checkpoints", where)
        return None
    root = sig.parent if sig.parent in (checkpoint, mount) else checkpoint
    payload = read_payload(sig)
    if policy.method is None:
        raise SignatureError(f"{sig} is present but no verification method is configured (the bundle carries "
                             f"{_bundle_kind(sig)}): set MODEL_SIGNATURE_PUBLIC_KEY, MODEL_SIGNATURE_CERT_CHAIN or "
                             f"MODEL_SIGNATURE_IDENTITY + MODEL_SIGNATURE_ISSUER, or MODEL_SIGNATURE=off")
    _check_kind(sig, policy)
    anchors = _anchors(policy, root)
    ignored = [*policy.ignore_paths, *inside(root, [sig, *anchors])]
    hashing_cfg, label = _hashing_config(payload, ignored, allow_symlinks, policy.ignore_unsigned)
    config = _verifier(policy, anchors).set_hashing_config(hashing_cfg).set_ignore_unsigned_files(policy.ignore_unsigned)
    t0 = time.perf_counter()
    try:
        config.verify(root, sig)
    except Exception as e:  # the library raises ValueError, OpenSSL/sigstore/cryptography errors
        raise SignatureError(f"model signature check failed: {_explain(e, policy, root)} [{root} against "
                             f"{policy.describe()}]") from None
    seconds = time.perf_counter() - t0
    names = [_resource_path(r["name"]) for r in payload["predicate"]["resources"]]
    size = sum((root / n).stat().st_size for n in set(names) if (root / n).is_file())
    done = Verified(root, len(set(names)), size, seconds, label)
    log.info("model signature verified (%s): %d files, %.1f MB hashed in %.2f s (%.2f GB/s, %s)",
             policy.describe(), done.files, size / 1e6, seconds, size / 1e9 / max(seconds, 1e-9), label)
    return done


def read_payload(sig: Path) -> dict:
    """The in-toto statement inside a model-signing bundle (not yet authenticated)."""
    try:
        bundle = json.loads(sig.read_text(encoding="utf-8"))
        payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        payload["predicate"]["serialization"]["method"], payload["predicate"]["resources"]  # noqa: B018
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"{sig} is not a model-signing bundle ({type(e).__name__}: {e}); re-sign the "
                             f"checkpoint or point MODEL_SIGNATURE_FILE at its bundle") from None
    return payload


def signed_files(sig: Path) -> list[str]:
    """The relative paths a bundle lists (what a Hub download must fetch for the check to pass)."""
    return sorted({_resource_path(r["name"]) for r in read_payload(sig)["predicate"]["resources"]})


def _resource_path(name: str) -> str:
    # shard serialization names resources "path:start:end"
    return re.sub(r":\d+:\d+$", "", name)


_KINDS = {"publicKey": ("key", "a public-key signature"),
          "x509CertificateChain": ("certificate", "a certificate-chain signature"),
          "certificate": ("sigstore", "a keyless sigstore signature")}


def _bundle_kind(sig: Path) -> str:
    material = json.loads(sig.read_text(encoding="utf-8")).get("verificationMaterial") or {}
    return next((text for key, (_, text) in _KINDS.items() if key in material), "an unknown signature kind")


def _check_kind(sig: Path, policy: SignaturePolicy) -> None:
    # key and certificate bundles say which they are; a mismatch would otherwise fail deep in the library
    material = json.loads(sig.read_text(encoding="utf-8")).get("verificationMaterial") or {}
    wanted = {"key": "publicKey", "certificate": "x509CertificateChain"}.get(policy.method or "")
    if wanted and wanted not in material:
        raise SignatureError(f"the bundle {sig.name} carries {_bundle_kind(sig)}, but the {policy.method} method is "
                             f"configured ({policy.describe()}): configure the method it was signed with")


def _anchors(policy: SignaturePolicy, root: Path) -> list[Path]:
    """The trust material, relative paths taken inside the model folder (mounted with the model)."""
    paths = [policy.public_key] if policy.public_key else list(policy.cert_chain)
    if policy.method == "sigstore" and policy.trust_config not in (TRUST_BUNDLED, TRUST_TUF):
        paths = [policy.trust_config]
    out = [Path(p) if os.path.isabs(p) else root / p for p in paths]
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise SignatureError(f"trust material not found: {', '.join(missing)} (absolute, or relative to {root})")
    mounted = inside(root, out)
    if mounted:
        log.warning("trust material %s lies inside the model folder: this detects corruption, but whoever can "
                    "rewrite the model can replace it too; mount it separately for provenance", mounted)
    return out


def inside(root: Path, paths: list[Path]) -> list[str]:
    rel = []
    for p in paths:
        try:
            rel.append(str(p.resolve().relative_to(root.resolve())))
        except ValueError:
            pass
    return rel


def _hashing_config(payload: dict, ignored: list[str], allow_symlinks: bool, ignore_unsigned: bool):
    from model_signing import hashing

    ser = payload["predicate"]["serialization"]
    method, algo = ser.get("method"), ser.get("hash_type", "sha256")
    workers = os.cpu_count() or 1
    links = allow_symlinks or bool(ser.get("allow_symlinks"))
    if ignore_unsigned and method == "shards":  # model-signing 1.1 takes shard names for paths there
        raise SignatureError("MODEL_SIGNATURE_IGNORE_UNSIGNED does not work with a shard-serialized signature "
                             "(model-signing 1.1); list the extra files in MODEL_SIGNATURE_IGNORE_PATHS instead")
    try:
        if method == "files":
            cfg = hashing.Config().use_file_serialization(hashing_algorithm=algo, max_workers=workers,
                                                          allow_symlinks=links)
            label = f"{algo} per file, {workers} workers"
        elif method == "shards":
            cfg = hashing.Config().use_shard_serialization(hashing_algorithm=algo, shard_size=int(ser["shard_size"]),
                                                           max_workers=workers, allow_symlinks=links)
            label = f"{algo} per {int(ser['shard_size']) / 1e6:.0f} MB shard, {workers} workers"
        else:
            raise ValueError(f"unknown serialization method {method!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"the signature declares a hashing method this library cannot use: {e}") from None
    return cfg.set_ignored_paths(paths=ignored).set_allow_symlinks(links), label


def _verifier(policy: SignaturePolicy, anchors: list[Path]):
    from model_signing import verifying

    config = verifying.Config()
    if policy.method == "key":
        return config.use_elliptic_key_verifier(public_key=anchors[0])
    if policy.method == "certificate":
        return config.use_certificate_verifier(certificate_chain=anchors)
    trust = None  # TRUST_TUF: the library fetches Sigstore's production trust root (network)
    if policy.trust_config == TRUST_BUNDLED:
        trust = bundled_trust_config(Path(policy.cache_dir))
    elif policy.trust_config != TRUST_TUF:
        trust = anchors[0]
    if trust is None:
        log.warning("MODEL_SIGNATURE_TRUST_CONFIG=tuf: downloading Sigstore's trust root now")
    try:
        return config.use_sigstore_verifier(identity=policy.identity, oidc_issuer=policy.issuer, trust_config=trust)
    except Exception as e:
        raise SignatureError(f"cannot load the sigstore trust config {trust or 'from TUF'}: "
                             f"{type(e).__name__}: {e}") from None


def bundled_trust_config(cache_dir: Path) -> Path:
    """A ClientTrustConfig file made from the production trusted root and signing config that the
    installed sigstore release ships (its TUF bootstrap copy): offline, as current as that release."""
    from importlib.resources import files

    store = files("sigstore._store") / _SIGSTORE_PROD_STORE
    config = {"mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
              "trustedRoot": json.loads((store / "trusted_root.json").read_text()),
              "signingConfig": json.loads((store / "signing_config.v0.2.json").read_text())}
    out = cache_dir / "sigstore-trust-config.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(config))
    return out


def _explain(e: Exception, policy: SignaturePolicy, root: Path) -> str:
    """One line naming the check that failed (and the files), from the library's exception."""
    msg = str(e).strip()
    kind = type(e).__name__
    if msg.startswith("Signature mismatch"):
        parts = []
        # The library's message is a list's repr: where a digest's bytes hold a quote, repr escapes the names' quotes.
        changed = sorted({_resource_path(n) for n in re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", msg)})
        if changed:
            parts.append(f"content differs from the signed digest (changed or corrupted): {_names(', '.join(changed))}")
        extra = re.search(r"Extra files found in model '[^']*': ([^\"\]]+?)['\"]?(?:,\s*['\"]|\]|$)", msg)
        if extra:
            parts.append(f"files not covered by the signature: {_names(extra.group(1))} (remove them, "
                         f"re-sign, or set MODEL_SIGNATURE_IGNORE_PATHS / MODEL_SIGNATURE_IGNORE_UNSIGNED)")
        missing = re.search(r"Missing files in model '[^']*': ([^\"\]]+?)['\"]?(?:,\s*['\"]|\]|$)", msg)
        if missing:
            parts.append(f"signed files are missing: {_names(missing.group(1))}")
        return "; ".join(parts) or msg[:300]
    if msg.startswith("Cannot use '") and "could be missing" in msg:
        path = msg.split("'")[1]
        return f"signed files are missing (or unreadable): {inside(root, [Path(path)])[0] if inside(root, [Path(path)]) else path}"
    if "symlink" in msg:
        return msg[:300]
    if kind == "InvalidSignature" or msg.startswith("Key mismatch"):
        if policy.method == "key":
            return ("the signature was not made with this public key (signed with another key, or the bundle was "
                    "altered)")
        return "the signature does not match the signing certificate's key (the bundle was altered)"
    if kind == "X509StoreContextError":
        return (f"the signing certificate is not trusted by MODEL_SIGNATURE_CERT_CHAIN ({msg}): issued by another "
                f"CA, expired, or the chain is incomplete")
    if policy.method == "sigstore":
        return f"sigstore verification failed ({kind}): {msg[:300]}"
    return f"{kind}: {msg[:300]}" if msg else kind


def _names(listed: str) -> str:
    names = sorted({_resource_path(n.strip().strip("'\"")) for n in listed.split(", ")})
    more = f" (+{len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else ""
    return ", ".join(names[:_MAX_NAMES]) + more
