"""Test trust material made here: EC key pairs and a two-level certificate chain per CA (cryptography)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path


@dataclass(frozen=True)
class CertSet:
    key: Path  # the signing certificate's private key
    cert: Path  # the signing (leaf) certificate
    chain: Path  # intermediate + root, what a verifier trusts


def _write_key(key: ec.EllipticCurvePrivateKey, out: Path, name: str) -> KeyPair:
    priv = out / f"{name}.key"
    pub = out / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(priv, pub)


def key_pair(out: Path, name: str) -> KeyPair:
    out.mkdir(parents=True, exist_ok=True)
    return _write_key(ec.generate_private_key(ec.SECP256R1()), out, name)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, days: tuple[int, int] = (-1, 365),
          extensions=()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now + dt.timedelta(days=days[0])).not_valid_after(now + dt.timedelta(days=days[1]))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def cert_set(out: Path, ca_name: str) -> CertSet:
    """root CA -> intermediate CA -> code-signing leaf, all made here."""
    out.mkdir(parents=True, exist_ok=True)
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert(f"{ca_name} root", root_key, f"{ca_name} root", root_key, ca=True)
    mid = _cert(f"{ca_name} intermediate", mid_key, f"{ca_name} root", root_key, ca=True)
    leaf = _cert(f"{ca_name} model signer", leaf_key, f"{ca_name} intermediate", mid_key, ca=False)
    pair = _write_key(leaf_key, out, f"{ca_name}-leaf")
    (out / f"{ca_name}-leaf.pem").write_bytes(_pem(leaf))
    (out / f"{ca_name}-chain.pem").write_bytes(_pem(mid, root))
    return CertSet(pair.private, out / f"{ca_name}-leaf.pem", out / f"{ca_name}-chain.pem")
