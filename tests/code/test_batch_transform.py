"""code/granite_sm/batch_transform.py: CreateTransformJob settings checked against the SageMaker service
model (Stubber), sharding for several instances, S3 upload/download, result pairing."""

import datetime
import io
import json
import sys
import types

import pytest
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber

from tests.sdk_helpers import client, load

bt = load("batch_transform")
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
RECORDS = [{"inputs": f"prompt {i}", "parameters": {"max_new_tokens": 8}} for i in range(5)]


def test_create_transform_job_multirecord_jsonlines():
    sm = client("sagemaker")
    req = bt.transform_job_request("granite-batch-1", "granite-tar", "s3://b/batch/input/", "s3://b/batch/output",
                                   instance_type="ml.g6e.xlarge", instance_count=3, max_concurrent=16,
                                   max_payload_mb=4, invocations_timeout_s=1800, env={"MAX_NEW_TOKENS": "64"})
    with Stubber(sm) as stub:
        stub.add_response("create_transform_job", {"TransformJobArn": "arn:aws:sagemaker:us-east-1:1:transform-job/x"}, {
            "TransformJobName": "granite-batch-1",
            "ModelName": "granite-tar",
            "BatchStrategy": "MultiRecord",
            "MaxConcurrentTransforms": 16,
            "MaxPayloadInMB": 4,
            "ModelClientConfig": {"InvocationsTimeoutInSeconds": 1800, "InvocationsMaxRetries": 1},
            "Environment": {"MAX_NEW_TOKENS": "64"},
            "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix",
                                                               "S3Uri": "s3://b/batch/input/"}},
                               "ContentType": "application/jsonlines", "SplitType": "Line",
                               "CompressionType": "None"},
            "TransformOutput": {"S3OutputPath": "s3://b/batch/output", "Accept": "application/jsonlines",
                                "AssembleWith": "Line"},
            "TransformResources": {"InstanceType": "ml.g6e.xlarge", "InstanceCount": 3}})
        sm.create_transform_job(**req)
        stub.assert_no_pending_responses()


def test_defaults_leave_concurrency_to_the_container():
    req = bt.transform_job_request("j", "m", "s3://b/i/", "s3://b/o")
    assert "MaxConcurrentTransforms" not in req and "Environment" not in req
    assert req["MaxPayloadInMB"] == 6 and req["ModelClientConfig"]["InvocationsTimeoutInSeconds"] == 600


def test_shards_keep_order_and_cover_every_record(tmp_path):
    paths = bt.write_shards(RECORDS, tmp_path, shards=3)
    assert [p.name for p in paths] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert [r for p in paths for r in bt.read_jsonl(p)] == RECORDS
    assert len(bt.write_shards(RECORDS[:2], tmp_path / "few", shards=8)) == 2  # no empty files


def test_upload_wait_download_and_pair(tmp_path):
    shards = bt.write_shards(RECORDS, tmp_path / "in", shards=2)
    s3, sm = client("s3"), client("sagemaker")
    outputs = {p.name: [{"generated_text": f"out {r['inputs']}"} for r in bt.read_jsonl(p)] for p in shards}
    with Stubber(s3) as s3stub, Stubber(sm) as smstub:
        for p in shards:
            s3stub.add_response("put_object", {"ETag": '"e"'}, {"Bucket": "b", "Key": f"batch/j/input/{p.name}",
                                                               "Body": ANY, "ChecksumAlgorithm": ANY})
        assert bt.upload_inputs(s3, shards, "s3://b/batch/j/input") == "s3://b/batch/j/input/"
        desc = {"TransformJobName": "j", "TransformJobArn": "arn:aws:sagemaker:us-east-1:1:transform-job/j",
                "ModelName": "m", "CreationTime": NOW,
                "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://b/i/"}}},
                "TransformResources": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 2}}
        smstub.add_response("describe_transform_job", {**desc, "TransformJobStatus": "Completed"},
                            {"TransformJobName": "j"})
        smstub.add_response("describe_transform_job", {**desc, "TransformJobStatus": "Completed"},
                            {"TransformJobName": "j"})
        assert bt.wait_transform_job(sm, "j", delay_s=0)["TransformJobStatus"] == "Completed"
        keys = [f"batch/j/output/{p.name}.out" for p in shards]
        s3stub.add_response("list_objects_v2", {"Contents": [{"Key": k, "Size": 1} for k in keys], "KeyCount": 2},
                            {"Bucket": "b", "Prefix": "batch/j/output/"})
        for p, k in zip(shards, keys, strict=True):
            body = "".join(json.dumps(x) + "\n" for x in outputs[p.name]).encode()
            s3stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(body), len(body))},
                                {"Bucket": "b", "Key": k})
        got = bt.download_outputs(s3, "s3://b/batch/j/output", tmp_path / "out")
        s3stub.assert_no_pending_responses()
        smstub.assert_no_pending_responses()
    assert [p.name for p in got] == ["part-00000.jsonl.out", "part-00001.jsonl.out"]
    pairs = bt.pair_results(shards, tmp_path / "out")
    assert [(a["inputs"], b["generated_text"]) for a, b in pairs] == [(r["inputs"], f"out {r['inputs']}")
                                                                      for r in RECORDS]


def test_failed_job_raises_with_reason():
    sm = client("sagemaker")
    desc = {"TransformJobName": "j", "TransformJobArn": "arn:aws:sagemaker:us-east-1:1:transform-job/j",
            "ModelName": "m", "CreationTime": NOW, "TransformJobStatus": "Failed",
            "FailureReason": "ClientError: See job logs",
            "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://b/i/"}}},
            "TransformResources": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1}}
    with Stubber(sm) as stub:
        stub.add_response("describe_transform_job", desc, {"TransformJobName": "j"})
        stub.add_response("describe_transform_job", desc, {"TransformJobName": "j"})
        with pytest.raises(RuntimeError, match="Failed: ClientError"):
            bt.wait_transform_job(sm, "j", delay_s=0)


def test_pair_results_detects_lost_lines(tmp_path):
    (shard,) = bt.write_shards(RECORDS, tmp_path)
    (tmp_path / f"{shard.name}.out").write_text('{"generated_text": "only one"}\n')
    with pytest.raises(ValueError, match="5 input lines but 1 output lines"):
        bt.pair_results([shard], tmp_path)


def test_sdk_transformer_arguments(monkeypatch):
    calls = {}

    class Transformer:
        def __init__(self, **kw):
            calls["init"] = kw

        def transform(self, data, **kw):
            calls["transform"] = {"data": data, **kw}

    for name in ("sagemaker", "sagemaker.core"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    mod = types.ModuleType("sagemaker.core.transformer")
    mod.Transformer = Transformer
    monkeypatch.setitem(sys.modules, "sagemaker.core.transformer", mod)
    bt.transform_with_sdk("m", "s3://b/i/", "s3://b/o", instance_count=2, max_concurrent=8)
    expected = {"strategy": "MultiRecord", "assemble_with": "Line", "accept": "application/jsonlines",
                "instance_count": 2, "max_concurrent_transforms": 8, "max_payload": 6, "output_path": "s3://b/o"}
    assert {k: calls["init"][k] for k in expected} == expected
    t = calls["transform"]
    assert (t["content_type"], t["split_type"], t["data"]) == ("application/jsonlines", "Line", "s3://b/i/")
    assert t["model_client_config"]["InvocationsTimeoutInSeconds"] == 600


def test_cli_main_end_to_end(tmp_path, monkeypatch, capsys):
    """Shards for 2 instances -> upload -> create job -> wait -> download -> paired output."""
    from tests.fakes import FakeSession

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    s3, sm = client("s3"), client("sagemaker")
    monkeypatch.setattr(bt, "boto_session", lambda region, profile: FakeSession(sagemaker=sm, s3=s3))
    monkeypatch.setattr(bt, "wait_transform_job", lambda sm_, name: {"TransformJobStatus": "Completed"})
    base = "batch/job1"
    with Stubber(s3) as s3stub, Stubber(sm) as smstub:
        for i in range(2):
            s3stub.add_response("put_object", {"ETag": '"e"'}, {"Bucket": "b", "Key": f"{base}/input/part-0000{i}.jsonl",
                                                               "Body": ANY, "ChecksumAlgorithm": ANY})
        smstub.add_response("create_transform_job", {"TransformJobArn": "arn:aws:sagemaker:us-east-1:1:transform-job/j"},
                            bt.transform_job_request("job1", "granite-tar", f"s3://b/{base}/input/",
                                                     f"s3://b/{base}/output", instance_type="ml.g5.xlarge",
                                                     instance_count=2, invocations_timeout_s=900))
        s3stub.add_response("list_objects_v2", {"Contents": [{"Key": f"{base}/output/part-0000{i}.jsonl.out"}
                                                             for i in range(2)]},
                            {"Bucket": "b", "Prefix": f"{base}/output/"})
        for i, n in ((0, 3), (1, 2)):
            body = "".join(json.dumps({"generated_text": f"g{i}{k}"}) + "\n" for k in range(n)).encode()
            s3stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(body), len(body))},
                                {"Bucket": "b", "Key": f"{base}/output/part-0000{i}.jsonl.out"})
        assert bt.main(["--model-name", "granite-tar", "--input", str(src), "--s3", "s3://b/batch/",
                        "--job-name", "job1", "--instance-count", "2", "--invocations-timeout", "900",
                        "--work-dir", str(tmp_path / "work")]) == 0
        s3stub.assert_no_pending_responses()
        smstub.assert_no_pending_responses()
    out = capsys.readouterr().out
    assert out.count('"input"') == 5 and '"generated_text": "g11"' in out
