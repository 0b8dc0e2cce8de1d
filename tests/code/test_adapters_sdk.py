"""code/granite_sm/adapters.py: an adapter packaged the way an adapter inference component's ArtifactUrl holds it
(read back by the container's own src resolver), and the base + adapter inference components created and invoked
with boto3, checked by Stubber against botocore's SageMaker service model (parameter names and shapes)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from tests.lora_helpers import make_adapter
from tests.sdk_helpers import IMAGE, ROLE, client, load

ad = load("adapters")


@pytest.fixture(scope="module")
def adapter(tiny_ckpt, tmp_path_factory):
    return make_adapter(tiny_ckpt, tmp_path_factory.mktemp("ad") / "fr", seed=1, r=2, lora_alpha=4,
                        target_modules=["q_proj", "in_proj"])


def test_package_has_the_adapter_files_at_the_root_and_the_container_reads_it(adapter, tmp_path):
    from serve.adapter_src import resolve

    out = ad.package_adapter(adapter, tmp_path / "fr.tar.gz")
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(names) and all("/" not in n for n in names)
    found = resolve(str(out), "fr", (str(tmp_path),), str(tmp_path / "cache"))
    assert (found / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()


def test_package_refuses_what_the_container_refuses(adapter, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"r": 2, "use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="DoRA"):
        ad.package_adapter(bad, tmp_path / "x.tar.gz")
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors missing"):
        ad.package_adapter(bad, tmp_path / "x.tar.gz")


def test_base_and_adapter_components_and_invocations():
    sm, rt = client("sagemaker"), client("sagemaker-runtime")
    plan = ad.ComponentsPlan(image_uri=IMAGE, role_arn=ROLE, model_data="s3://bucket/granite/", name="granite-ic",
                             instance_type="ml.g6e.xlarge")
    arn = "arn:aws:sagemaker:us-east-1:111122223333:{}/granite-ic"
    with Stubber(sm) as s:
        s.add_response("create_model", {"ModelArn": arn.format("model")}, {
            "ModelName": "granite-ic", "ExecutionRoleArn": ROLE, "PrimaryContainer": {
                "Image": IMAGE, "Environment": {"MAX_LORAS": "4", "MAX_LORA_RANK": "16"},
                "ModelDataSource": {"S3DataSource": {"S3Uri": "s3://bucket/granite/", "S3DataType": "S3Prefix",
                                                     "CompressionType": "None"}}}})
        s.add_response("create_endpoint_config", {"EndpointConfigArn": arn.format("endpoint-config")}, {
            "EndpointConfigName": "granite-ic", "ExecutionRoleArn": ROLE, "ProductionVariants": [{
                "VariantName": "AllTraffic", "InstanceType": "ml.g6e.xlarge", "InitialInstanceCount": 1,
                "RoutingConfig": {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"}}]})
        s.add_response("create_endpoint", {"EndpointArn": arn.format("endpoint")},
                       {"EndpointName": "granite-ic", "EndpointConfigName": "granite-ic"})
        import datetime

        now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        s.add_response("describe_endpoint", {"EndpointName": "granite-ic", "EndpointArn": arn.format("endpoint"),
                                             "EndpointConfigName": "granite-ic", "EndpointStatus": "InService",
                                             "CreationTime": now, "LastModifiedTime": now},
                       {"EndpointName": "granite-ic"})
        s.add_response("create_inference_component", {"InferenceComponentArn": arn.format("inference-component")}, {
            "InferenceComponentName": "granite-ic-base", "EndpointName": "granite-ic", "VariantName": "AllTraffic",
            "Specification": {"ModelName": "granite-ic", "StartupParameters": {
                "ModelDataDownloadTimeoutInSeconds": 1200, "ContainerStartupHealthCheckTimeoutInSeconds": 900},
                "ComputeResourceRequirements": {"MinMemoryRequiredInMb": 8192, "NumberOfAcceleratorDevicesRequired": 1}},
            "RuntimeConfig": {"CopyCount": 1}})
        s.add_response("create_inference_component", {"InferenceComponentArn": arn.format("inference-component")}, {
            "InferenceComponentName": "fr", "EndpointName": "granite-ic", "Specification": {
                "BaseInferenceComponentName": "granite-ic-base",
                "Container": {"ArtifactUrl": "s3://bucket/lora/fr.tar.gz"}}})
        names = ad.deploy_components(sm, plan)
        assert ad.create_adapter_component(sm, names["endpoint"], "fr", names["base_component"],
                                           "s3://bucket/lora/fr.tar.gz") == "fr"
        s.assert_no_pending_responses()
    body = b'[{"generated_text": "bonjour"}]'
    with Stubber(rt) as s:
        s.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(body), len(body)),
                                           "ContentType": "application/json"},
                       {"EndpointName": "granite-ic", "InferenceComponentName": "fr", "ContentType": "application/json",
                        "Accept": "application/json", "Body": b'{"inputs": "hello"}'})
        assert ad.invoke_component(rt, "granite-ic", "fr", {"inputs": "hello"}) == [{"generated_text": "bonjour"}]
        s.assert_no_pending_responses()
