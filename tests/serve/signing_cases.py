"""Signed copies of the tiny checkpoint, one per outcome the server and the batch entrypoint must show.

Each case: a model folder, the MODEL_SIGNATURE_* environment, and the text its refusal must contain
(None: it verifies and serves)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from serve.sign import sign_checkpoint
from tests.serve.signing_keys import cert_set, key_pair


@dataclass(frozen=True)
class Case:
    name: str
    model_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    refusal: str | None = None  # a substring of the reason; None: verifies and serves


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def build_cases(ckpt: Path, tmp: Path) -> dict[str, Case]:
    keys = tmp / "keys"
    good, other = key_pair(keys, "good"), key_pair(keys, "other")
    ca, foreign_ca = cert_set(keys, "ca"), cert_set(keys, "foreign")

    def copy(name: str) -> Path:
        return Path(shutil.copytree(ckpt, tmp / name))

    def key_signed(name: str) -> Path:
        d = copy(name)
        sign_checkpoint(d, key=good.private)
        return d

    key_env = {"MODEL_SIGNATURE_PUBLIC_KEY": str(good.public)}
    cert_env = {"MODEL_SIGNATURE_CERT_CHAIN": str(ca.chain)}
    cases = [Case("key_ok", key_signed("key_ok"), key_env)]
    d = copy("cert_ok")
    sign_checkpoint(d, key=ca.key, cert=ca.cert, chain=(ca.chain,))
    cases.append(Case("cert_ok", d, cert_env))
    d = key_signed("flipped_byte")
    flip_byte(d / "model.safetensors")
    cases.append(Case("flipped_byte", d, key_env, "changed or corrupted): model.safetensors"))
    d = key_signed("extra_file")
    (d / "notes.txt").write_text("added after signing\n")
    cases.append(Case("extra_file", d, key_env, "files not covered by the signature: notes.txt"))
    d = key_signed("removed_file")
    (d / "tokenizer_config.json").unlink()
    cases.append(Case("removed_file", d, key_env, "signed files are missing: tokenizer_config.json"))
    cases.append(Case("wrong_key", key_signed("wrong_key"), {"MODEL_SIGNATURE_PUBLIC_KEY": str(other.public)},
                      "the signature was not made with this public key"))
    d = copy("foreign_ca")
    sign_checkpoint(d, key=foreign_ca.key, cert=foreign_ca.cert, chain=(foreign_ca.chain,))
    cases.append(Case("foreign_ca", d, cert_env, "signing certificate is not trusted by MODEL_SIGNATURE_CERT_CHAIN"))
    cases.append(Case("unsigned_require", copy("unsigned_require"), {"MODEL_SIGNATURE": "require", **key_env},
                      "no model signature: model.sig"))
    return {c.name: c for c in cases}
