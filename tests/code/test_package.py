"""code/granite_sm/package.py: model.tar.gz layout, S3 uploads (Stubber on the S3 service model),
Hub snapshots without network."""

import tarfile

import pytest
from botocore.stub import ANY, Stubber

from tests.sdk_helpers import client, load

package = load("package")


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    (d / ".cache" / "huggingface").mkdir(parents=True)
    (d / ".cache" / "huggingface" / "x.lock").write_text("lock")
    (d / "code").mkdir()
    (d / "code" / "inference.py").write_text("# the checkpoint's own\n")
    for name, text in {"config.json": "{}", "model.safetensors": "W" * 100, "tokenizer.json": "{}",
                       "chat_template.jinja": "{{ x }}"}.items():
        (d / name).write_text(text)
    return d


@pytest.fixture
def user_inference(tmp_path):
    p = tmp_path / "mine.py"
    p.write_text("# user hooks\n")
    return p


def test_tarball_has_files_at_root_and_replaces_inference_py(ckpt, user_inference, tmp_path):
    tar = package.make_tarball(ckpt, tmp_path / "out" / "model.tar.gz", inference_py=user_inference)
    with tarfile.open(tar) as t:
        names = sorted(t.getnames())
        assert t.extractfile("code/inference.py").read() == b"# user hooks\n"
    assert names == ["chat_template.jinja", "code/inference.py", "config.json", "model.safetensors",
                     "tokenizer.json"]


def test_tarball_keeps_checkpoint_inference_py_without_override(ckpt, tmp_path):
    tar = package.make_tarball(ckpt, tmp_path / "model.tar.gz")
    with tarfile.open(tar) as t:
        assert t.extractfile("code/inference.py").read() == b"# the checkpoint's own\n"
        assert not any(n.startswith(".cache") for n in t.getnames())


def test_missing_inference_py_is_an_error(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError):
        package.make_tarball(ckpt, tmp_path / "m.tar.gz", inference_py=tmp_path / "nope.py")


def test_upload_prefix_puts_every_file_under_prefix(ckpt, user_inference):
    s3 = client("s3")
    with Stubber(s3) as stub:
        for rel in ["chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json",
                    "code/inference.py"]:
            stub.add_response("put_object", {"ETag": '"e"'}, {"Bucket": "bucket", "Key": f"granite/model/{rel}",
                                                             "Body": ANY, "ChecksumAlgorithm": ANY})
        uri = package.upload_prefix(s3, ckpt, "bucket", "/granite/model/", inference_py=user_inference)
        stub.assert_no_pending_responses()
    assert uri == "s3://bucket/granite/model/"


def test_upload_tarball(ckpt, tmp_path):
    tar = package.make_tarball(ckpt, tmp_path / "model.tar.gz")
    s3 = client("s3")
    with Stubber(s3) as stub:
        stub.add_response("put_object", {"ETag": '"e"'}, {"Bucket": "bucket", "Key": "granite/model.tar.gz",
                                                         "Body": ANY, "ChecksumAlgorithm": ANY})
        assert package.upload_file(s3, tar, "bucket", "granite/model.tar.gz") == "s3://bucket/granite/model.tar.gz"
        stub.assert_no_pending_responses()


def test_snapshot_local_folder_and_hub_id(ckpt, monkeypatch, tmp_path):
    assert package.snapshot(str(ckpt)) == ckpt
    seen = {}

    def fake_download(**kw):
        seen.update(kw)
        return str(tmp_path / "dl")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    out = package.snapshot("ibm-granite/granite-4.0-h-micro", revision="main", local_dir=tmp_path / "dl")
    assert out == tmp_path / "dl"
    assert seen["repo_id"] == "ibm-granite/granite-4.0-h-micro" and seen["revision"] == "main"
    assert "*.safetensors" in seen["allow_patterns"] and not any("bin" in p for p in seen["allow_patterns"])


def test_cli_local_only(ckpt, user_inference, tmp_path, capsys):
    assert package.main(["--model", str(ckpt), "--work-dir", str(tmp_path / "w"), "--format", "tar",
                         "--inference-py", str(user_inference)]) == 0
    assert (tmp_path / "w" / "model.tar.gz").is_file()
    assert "model.tar.gz" in capsys.readouterr().out
