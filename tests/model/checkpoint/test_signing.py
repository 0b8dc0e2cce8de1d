"""model/checkpoint/signing.py in-process: every outcome of the check on signed copies of the tiny checkpoint,
the policy's validation, Hub downloads fetching the signature, and the keyless sigstore path as far
as it goes offline (trust-root loading, identity policy, bundle parsing; no socket is opened)."""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import pytest

from model.checkpoint.loader import ALLOW_PATTERNS, resolve_model
from model.checkpoint.signing import (
    SignatureError,
    SignaturePolicy,
    _explain,
    bundled_trust_config,
    read_payload,
    signed_files,
    verify_checkpoint,
)
from serve.config import ConfigError, load_config
from serve.sign import sign_checkpoint
from tests.serve.signing_cases import build_cases
from tests.serve.signing_keys import cert_set, key_pair


@pytest.fixture(scope="module")
def cases(tiny_ckpt, tmp_path_factory):
    return build_cases(tiny_ckpt, tmp_path_factory.mktemp("signed"))


def policy(case, **kw) -> SignaturePolicy:
    sig = load_config({**case.env, "MODEL_CACHE_DIR": "/tmp/unused"}).signature
    return SignaturePolicy(**{**sig.__dict__, **kw})


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during verification: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("name", ["key_ok", "cert_ok", "flipped_byte", "extra_file", "removed_file", "wrong_key",
                                  "foreign_ca", "unsigned_require"])
def test_each_case_verifies_or_refuses_with_its_own_reason(cases, name, no_network):
    case = cases[name]
    if case.refusal is None:
        done = verify_checkpoint(case.model_dir, policy(case))
        assert done.files == 6 and done.bytes > 1_000_000 and done.root == case.model_dir
        return
    with pytest.raises(SignatureError) as err:
        verify_checkpoint(case.model_dir, policy(case))
    assert case.refusal in str(err.value)
    others = [c.refusal for c in cases.values() if c.refusal and c is not case]
    assert not any(o in str(err.value) for o in others), "each failure must say which check failed"


def test_ignore_paths_and_ignore_unsigned_accept_an_added_file(cases):
    case = cases["extra_file"]
    assert verify_checkpoint(case.model_dir, policy(case, ignore_paths=("notes.txt",))) is not None
    assert verify_checkpoint(case.model_dir, policy(case, ignore_unsigned=True)) is not None
    with pytest.raises(SignatureError, match="signed files are missing"):  # ignoring never hides a removal
        verify_checkpoint(cases["removed_file"].model_dir, policy(cases["removed_file"], ignore_unsigned=True))


def test_off_and_unsigned_verify_log_that_nothing_was_checked(cases, caplog):
    case = cases["unsigned_require"]
    with caplog.at_level(logging.WARNING, logger="model.checkpoint.signing"):
        assert verify_checkpoint(case.model_dir, policy(case, mode="verify")) is None
        assert verify_checkpoint(cases["flipped_byte"].model_dir, policy(case, mode="off")) is None
    assert "no model signature" in caplog.text and "verification is OFF" in caplog.text


def test_a_signature_without_a_configured_method_fails_closed(cases):
    with pytest.raises(SignatureError, match="no verification method is configured .*public-key signature"):
        verify_checkpoint(cases["key_ok"].model_dir, SignaturePolicy())
    with pytest.raises(SignatureError, match="certificate-chain signature, but the key method"):
        verify_checkpoint(cases["cert_ok"].model_dir, policy(cases["key_ok"]))


def test_tampered_or_foreign_bundle(cases, tmp_path):
    d = Path(shutil.copytree(cases["key_ok"].model_dir, tmp_path / "m"))
    bundle = json.loads((d / "model.sig").read_text())
    payload = read_payload(d / "model.sig")
    payload["predicate"]["resources"][0]["digest"] = "00" * 32  # re-encode a changed manifest, same signature
    import base64

    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    (d / "model.sig").write_text(json.dumps(bundle))
    with pytest.raises(SignatureError, match="not made with this public key|bundle was altered|inconsistent"):
        verify_checkpoint(d, policy(cases["key_ok"]))
    (d / "model.sig").write_text("not json")
    with pytest.raises(SignatureError, match="is not a model-signing bundle"):
        verify_checkpoint(d, policy(cases["key_ok"]))


def test_nested_checkpoint_signed_at_the_mount_root_covers_code(cases, tmp_path):
    key = key_pair(tmp_path / "k", "k")
    mount = tmp_path / "opt-ml-model"
    shutil.copytree(cases["unsigned_require"].model_dir, mount / "granite")
    (mount / "code").mkdir()
    (mount / "code" / "inference.py").write_text("# hooks\n")
    sign_checkpoint(mount, key=key.private)
    pol = SignaturePolicy(mode="require", public_key=str(key.public))
    resolved = resolve_model(str(mount), None, None, None, None, str(tmp_path), pol)
    assert resolved.path == mount / "granite"
    (mount / "code" / "inference.py").write_text("# changed hooks\n")
    with pytest.raises(SignatureError, match="changed or corrupted\\): code/inference.py"):
        resolve_model(str(mount), None, None, None, None, str(tmp_path), pol)


def test_trust_material_inside_the_model_is_resolved_there_and_not_hashed(cases, tmp_path, caplog):
    d = Path(shutil.copytree(cases["key_ok"].model_dir, tmp_path / "m"))
    shutil.copy(policy(cases["key_ok"]).public_key, d / "signer.pub")  # mounted with the model, after signing
    with caplog.at_level(logging.WARNING, logger="model.checkpoint.signing"):
        assert verify_checkpoint(d, SignaturePolicy(public_key="signer.pub")) is not None
    assert "inside the model folder" in caplog.text
    with pytest.raises(SignatureError, match="trust material not found"):
        verify_checkpoint(d, SignaturePolicy(public_key="absent.pub"))


def test_sha256_signatures_and_shard_signatures_verify_with_their_own_method(tiny_ckpt, tmp_path):
    from model_signing import hashing, signing

    key = key_pair(tmp_path / "k", "k")
    a = Path(shutil.copytree(tiny_ckpt, tmp_path / "sha"))
    sign_checkpoint(a, key=key.private, algorithm="sha256")
    assert verify_checkpoint(a, SignaturePolicy(public_key=str(key.public))).hashing.startswith("sha256 per file")
    b = Path(shutil.copytree(tiny_ckpt, tmp_path / "shards"))  # as the library's CLI may sign
    hcfg = hashing.Config().use_shard_serialization(shard_size=300_000).set_ignored_paths(paths=["model.sig"])
    signing.Config().set_hashing_config(hcfg).use_elliptic_key_signer(private_key=key.private).sign(b, b / "model.sig")
    pol = SignaturePolicy(public_key=str(key.public))
    assert "shard" in verify_checkpoint(b, pol).hashing
    assert signed_files(b / "model.sig") == sorted(p.name for p in tiny_ckpt.iterdir())
    with pytest.raises(SignatureError, match="IGNORE_UNSIGNED does not work with a shard"):
        verify_checkpoint(b, SignaturePolicy(public_key=str(key.public), ignore_unsigned=True))


@pytest.mark.parametrize("env, error", [
    ({"MODEL_SIGNATURE": "maybe"}, "MODEL_SIGNATURE='maybe' is invalid"),
    ({"MODEL_SIGNATURE_PUBLIC_KEY": "k.pub", "MODEL_SIGNATURE_CERT_CHAIN": "c.pem"}, "set one verification method"),
    ({"MODEL_SIGNATURE_IDENTITY": "me@example.com"}, "needs both MODEL_SIGNATURE_IDENTITY and MODEL_SIGNATURE_ISSUER"),
    ({"MODEL_SIGNATURE_IDENTITY": "me@example.com", "MODEL_SIGNATURE_ISSUER": "https://accounts.google.com"},
     "needs MODEL_SIGNATURE_TRUST_CONFIG"),
])
def test_config_errors_name_the_variables(env, error):
    with pytest.raises(ConfigError, match=error):
        load_config(env)


def test_config_defaults_and_lists():
    sig = load_config({"MODEL_SIGNATURE_CERT_CHAIN": "a.pem, b.pem", "MODEL_SIGNATURE_IGNORE_PATHS": "x,y/"}).signature
    assert (sig.mode, sig.file, sig.cert_chain, sig.ignore_paths) == ("verify", "model.sig", ("a.pem", "b.pem"),
                                                                      ("x", "y/"))


def test_hub_download_fetches_the_signature_and_every_file_it_lists(monkeypatch, cases, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    case = cases["key_ok"]
    snapshot = Path(shutil.copytree(case.model_dir, tmp_path / "snap"))
    (snapshot / "README.md").write_text("card\n")  # a signed file the default patterns would skip
    sign_checkpoint(snapshot, key=Path(policy(case).public_key).with_suffix(".key"))
    calls = []

    def hub_download(repo_id, filename, **kw):
        calls.append(("file", filename))
        if repo_id == "org/unsigned":
            raise EntryNotFoundError("404")
        return str(snapshot / filename)

    def snapshot_download(**kw):
        calls.append(("snapshot", kw["allow_patterns"]))
        return str(snapshot if kw["repo_id"] == "org/signed" else cases["unsigned_require"].model_dir)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    resolved = resolve_model(None, "org/signed", None, None, None, str(tmp_path), policy(case, mode="require"))
    assert resolved.path == snapshot
    (_, sig), (_, patterns) = calls
    assert sig == "model.sig" and patterns[:len(ALLOW_PATTERNS)] == ALLOW_PATTERNS
    assert {"model.sig", "README.md", "model.safetensors"} <= set(patterns)
    calls.clear()
    with pytest.raises(SignatureError, match="no model signature"):
        resolve_model(None, "org/unsigned", None, None, None, str(tmp_path), policy(case, mode="require"))
    assert calls[1] == ("snapshot", ALLOW_PATTERNS)


def test_hub_cache_symlinks_are_followed_for_downloads_only(cases, tmp_path):
    case = cases["key_ok"]
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in case.model_dir.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(blobs / f.name)
    assert verify_checkpoint(snap, policy(case), allow_symlinks=True) is not None
    with pytest.raises(SignatureError, match="symlink"):
        verify_checkpoint(snap, policy(case))


# ---- keyless sigstore, offline ----

def test_bundled_trust_config_loads_offline(tmp_path, no_network):
    from sigstore.models import ClientTrustConfig

    path = bundled_trust_config(tmp_path)
    root = ClientTrustConfig.from_json(path.read_text()).trusted_root
    assert root.get_fulcio_certs() and root.rekor_keyring is not None
    from model_signing import verifying  # the library's own loader of a trust config file

    verifying.Config().use_sigstore_verifier(identity="x@example.com", oidc_issuer="https://issuer.example",
                                             trust_config=path)


def test_keyless_policy_refuses_a_non_sigstore_bundle_without_network(cases, tmp_path, no_network):
    pol = SignaturePolicy(identity="release@ibm.com", issuer="https://accounts.example", trust_config="bundled",
                          cache_dir=str(tmp_path))
    with pytest.raises(SignatureError, match="sigstore verification failed") as err:
        verify_checkpoint(cases["cert_ok"].model_dir, pol)
    assert "release@ibm.com" in str(err.value)


def test_keyless_trust_config_file_mounted_with_the_model(cases, tmp_path, no_network):
    d = Path(shutil.copytree(cases["unsigned_require"].model_dir, tmp_path / "m"))
    key = key_pair(tmp_path / "k", "k")
    sign_checkpoint(d, key=key.private)
    shutil.copy(bundled_trust_config(tmp_path / "cache"), d / "trust_config.json")
    pol = SignaturePolicy(identity="a@b.c", issuer="https://issuer.example", trust_config="trust_config.json")
    with pytest.raises(SignatureError, match="sigstore verification failed"):  # loaded, then the bundle is wrong
        verify_checkpoint(d, pol)
    (d / "trust_config.json").write_text("{}")
    with pytest.raises(SignatureError, match="cannot load the sigstore trust config"):
        verify_checkpoint(d, pol)


def test_identity_policy_matches_san_and_issuer(tmp_path):
    """sigstore's Identity policy (what MODEL_SIGNATURE_IDENTITY/ISSUER configure) on a Fulcio-style
    certificate made here: right identity and issuer pass, either one wrong fails."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from sigstore.errors import VerificationError
    from sigstore.verify.policy import Identity

    from tests.serve.signing_keys import _cert

    issuer = "https://token.actions.githubusercontent.com"
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ext = [(x509.SubjectAlternativeName([x509.RFC822Name("release@example.com")]), True),  # as Fulcio writes them
           (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1"), issuer.encode()), False),
           (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8"),
                                       b"\x0c" + bytes([len(issuer)]) + issuer.encode()), False)]
    cert = _cert("signer", key, "fulcio", ca_key, ca=False, extensions=ext)
    Identity(identity="release@example.com", issuer=issuer).verify(cert)
    for ident, iss in (("someone@example.com", issuer), ("release@example.com", "https://accounts.google.com")):
        with pytest.raises(VerificationError):
            Identity(identity=ident, issuer=iss).verify(cert)


def test_trusting_only_the_root_ca_is_enough_and_an_expired_ca_is_refused(tiny_ckpt, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.serve.signing_keys import _cert, _pem, _write_key

    ca = cert_set(tmp_path / "k", "ca")
    d = Path(shutil.copytree(tiny_ckpt, tmp_path / "m"))
    sign_checkpoint(d, key=ca.key, cert=ca.cert, chain=(ca.chain,))
    root_only = tmp_path / "root.pem"  # the bundle carries the intermediate; a verifier needs only the root
    root_only.write_text(ca.chain.read_text().split("-----END CERTIFICATE-----\n", 1)[1])
    assert verify_checkpoint(d, SignaturePolicy(cert_chain=(str(root_only),))) is not None
    # a CA whose validity ended before the signing certificate was issued (checked at signing time)
    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _cert("old root", root_key, "old root", root_key, ca=True, days=(-30, -10))
    leaf = _cert("signer", leaf_key, "old root", root_key, ca=False, days=(-1, 30))
    pair = _write_key(leaf_key, tmp_path / "k", "old-leaf")
    (tmp_path / "old-leaf.pem").write_bytes(_pem(leaf))
    (tmp_path / "old-root.pem").write_bytes(_pem(root))
    e = Path(shutil.copytree(tiny_ckpt, tmp_path / "e"))
    sign_checkpoint(e, key=pair.private, cert=tmp_path / "old-leaf.pem", chain=(tmp_path / "old-root.pem",))
    with pytest.raises(SignatureError, match=r"not trusted by MODEL_SIGNATURE_CERT_CHAIN \(certificate has expired"):
        verify_checkpoint(e, SignaturePolicy(cert_chain=(str(tmp_path / "old-root.pem"),)))


def test_the_check_runs_before_the_checkpoint_is_read(cases, tmp_path, monkeypatch):
    """A tampered config.json that would also fail validation reports the signature, not the config:
    resolve_model verifies before validate_checkpoint (and so before the engine reads weights)."""
    import model.checkpoint.loader as loader

    case = cases["key_ok"]
    d = Path(shutil.copytree(case.model_dir, tmp_path / "m"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    read = []
    monkeypatch.setattr(loader, "validate_checkpoint", lambda path: read.append(path))
    with pytest.raises(SignatureError, match="changed or corrupted\\): config.json"):
        resolve_model(str(d), None, None, None, None, str(tmp_path), policy(case))
    assert read == []


@pytest.mark.parametrize("digest", [b"\x00ab", b"a'b", b"a'b\""])
def test_a_changed_file_is_named_whatever_bytes_its_digest_holds(digest, tmp_path):
    """The library's mismatch message is a list's repr: a quote in a digest's bytes makes repr escape the quotes
    around the file name (seen as a random failure: the digest of a random checkpoint held a quote)."""
    item = f"Hash mismatch for 'model.safetensors': Expected 'Digest(digest_value={digest!r})', Actual 'x'"
    msg = _explain(ValueError(f"Signature mismatch: {[item]!r}"), SignaturePolicy(), tmp_path)
    assert "changed or corrupted): model.safetensors" in msg, msg
