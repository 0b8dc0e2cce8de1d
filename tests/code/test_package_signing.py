"""code/granite_sm/package.py --sign-key: the signature covers exactly what ships (code/ included), the
container-side check accepts the extracted model.tar.gz, and the source checkpoint is left untouched."""

import shutil
import tarfile
from pathlib import Path

import pytest

from model.checkpoint.signing import SignatureError, SignaturePolicy, verify_checkpoint
from tests.sdk_helpers import load
from tests.serve.signing_keys import cert_set, key_pair

package = load("package")


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    d = Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))
    (d / ".cache").mkdir()
    (d / ".cache" / "x.lock").write_text("lock")
    (d / "model.sig").write_text("an old signature, replaced")
    return d


def extract(tar: Path, dest: Path) -> Path:
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    return dest


def test_tarball_signed_while_packing_verifies_after_extraction(ckpt, tmp_path):
    key = key_pair(tmp_path / "keys", "signer")
    hooks = tmp_path / "hooks.py"
    hooks.write_text("# user hooks\n")
    weights_before = (ckpt / "model.safetensors").read_bytes()
    assert package.main(["--model", str(ckpt), "--work-dir", str(tmp_path / "w"), "--format", "tar",
                         "--inference-py", str(hooks), "--sign-key", str(key.private)]) == 0
    served = extract(tmp_path / "w" / "model.tar.gz", tmp_path / "opt-ml-model")
    assert (served / "code" / "inference.py").read_text() == "# user hooks\n"
    pol = SignaturePolicy(mode="require", public_key=str(key.public))
    assert verify_checkpoint(served, pol).files == 7  # 6 checkpoint files + code/inference.py
    assert (ckpt / "model.sig").read_text() == "an old signature, replaced"  # never written through a link
    assert (ckpt / "model.safetensors").read_bytes() == weights_before
    (served / "code" / "inference.py").write_text("import os  # swapped hooks\n")
    with pytest.raises(SignatureError, match="changed or corrupted\\): code/inference.py"):
        verify_checkpoint(served, pol)


def test_certificate_signed_prefix_layout(ckpt, tmp_path):
    ca = cert_set(tmp_path / "keys", "ca")
    staged = package.stage_signed(ckpt, tmp_path / "staged", ca.key, ca.cert, (ca.chain,))
    names = sorted(rel for _, rel in package.model_files(staged))
    assert "model.sig" in names and not any(n.startswith(".cache") for n in names)
    assert verify_checkpoint(staged, SignaturePolicy(cert_chain=(str(ca.chain),))) is not None
