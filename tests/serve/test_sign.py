"""`python -m serve sign`: writes a bundle the load-time check accepts (key and certificate methods)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.checkpoint.signing import SignatureError, SignaturePolicy, read_payload, verify_checkpoint
from serve.sign import main
from tests.serve.signing_keys import cert_set, key_pair
from tests.server_helpers import ROOT


@pytest.fixture
def model(tiny_ckpt, tmp_path):
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "m"))


def test_sign_with_a_key_through_the_entrypoint(model, tmp_path):
    key = key_pair(tmp_path / "k", "k")
    r = subprocess.run([sys.executable, "-m", "serve", "sign", str(model), "--key", str(key.private),
                        "--ignore", "notes.txt"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ})
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "MODEL_SIGNATURE_PUBLIC_KEY" in r.stdout
    (model / "notes.txt").write_text("ignored by the signer and recorded as such in the bundle\n")
    done = verify_checkpoint(model, SignaturePolicy(mode="require", public_key=str(key.public)))
    assert done.files == 6 and done.hashing.startswith("blake3")
    assert "notes.txt" in read_payload(model / "model.sig")["predicate"]["serialization"]["ignore_paths"]


def test_sign_with_a_certificate_and_sha256(model, tmp_path, capsys):
    ca = cert_set(tmp_path / "k", "ca")
    sig = tmp_path / "elsewhere.sig"
    assert main([str(model), "--key", str(ca.key), "--cert", str(ca.cert), "--chain", str(ca.chain),
                 "--hash", "sha256", "--signature", str(sig)]) == 0
    assert not (model / "model.sig").exists()
    pol = SignaturePolicy(file=str(sig), cert_chain=(str(ca.chain),))
    assert verify_checkpoint(model, pol).hashing.startswith("sha256")
    with pytest.raises(SignatureError, match="public-key signature|certificate-chain signature"):
        verify_checkpoint(model, SignaturePolicy(file=str(sig), public_key=str(key_pair(tmp_path, "x").public)))


def test_sign_refuses_bad_arguments(model, tmp_path, capsys):
    key = key_pair(tmp_path / "k", "k")
    assert main([str(tmp_path), "--key", str(key.private)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main([str(model), "--key", str(key.public)]) == 2  # a public key cannot sign
    assert "sign:" in capsys.readouterr().err
    assert main([str(model), "--key", str(key.private), "--chain", "x.pem"]) == 2
