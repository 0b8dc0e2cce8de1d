"""code/granite_sm/deploy.py: the boto3 path against the SageMaker service model (Stubber), the v3 path
(sagemaker-core resources) and the v2 path (Model.deploy) with recording stand-ins for the SDKs."""

import datetime
import sys
import types

import pytest
from botocore.stub import Stubber

from tests.sdk_helpers import IMAGE, ROLE, client, load

deploy = load("deploy")
common = load("common")
STARTUP_HEALTH_CHECK_TIMEOUT_S = common.STARTUP_HEALTH_CHECK_TIMEOUT_S
MODEL_DATA_DOWNLOAD_TIMEOUT_S = common.MODEL_DATA_DOWNLOAD_TIMEOUT_S

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
ARN = "arn:aws:sagemaker:us-east-1:111122223333:{}/{}"


def plan(**kw):
    base = dict(image_uri=IMAGE, role_arn=ROLE, model_data="s3://bucket/granite/model/",
                env={"MAX_CONCURRENT_SEQS": "64"}, instance_type="ml.g6e.xlarge", name="granite-ep")
    return deploy.DeployPlan(**{**base, **kw})


def describe(status: str, **extra) -> dict:
    return {"EndpointName": "granite-ep", "EndpointArn": ARN.format("endpoint", "granite-ep"),
            "EndpointConfigName": "granite-ep", "EndpointStatus": status, "CreationTime": NOW,
            "LastModifiedTime": NOW, **extra}


def expect_creates(stub: Stubber, container: dict, instance_type: str = "ml.g6e.xlarge", count: int = 1) -> None:
    stub.add_response("create_model", {"ModelArn": ARN.format("model", "granite-ep")}, {
        "ModelName": "granite-ep", "ExecutionRoleArn": ROLE, "PrimaryContainer": container})
    stub.add_response("create_endpoint_config", {"EndpointConfigArn": ARN.format("endpoint-config", "granite-ep")}, {
        "EndpointConfigName": "granite-ep",
        "ProductionVariants": [{
            "VariantName": "AllTraffic", "ModelName": "granite-ep", "InstanceType": instance_type,
            "InitialInstanceCount": count,
            "ContainerStartupHealthCheckTimeoutInSeconds": STARTUP_HEALTH_CHECK_TIMEOUT_S,
            "ModelDataDownloadTimeoutInSeconds": MODEL_DATA_DOWNLOAD_TIMEOUT_S}]})
    stub.add_response("create_endpoint", {"EndpointArn": ARN.format("endpoint", "granite-ep")},
                      {"EndpointName": "granite-ep", "EndpointConfigName": "granite-ep"})


def test_boto3_deploy_uncompressed_prefix_and_wait():
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        expect_creates(stub, {
            "Image": IMAGE, "Environment": {"MAX_CONCURRENT_SEQS": "64"},
            "ModelDataSource": {"S3DataSource": {"S3Uri": "s3://bucket/granite/model/", "S3DataType": "S3Prefix",
                                                 "CompressionType": "None"}}})
        stub.add_response("describe_endpoint", describe("Creating"), {"EndpointName": "granite-ep"})
        stub.add_response("describe_endpoint", describe("InService"), {"EndpointName": "granite-ep"})
        stub.add_response("describe_endpoint", describe("InService"), {"EndpointName": "granite-ep"})
        names = deploy.deploy_boto3(sm, plan(), poll_s=0)
        stub.assert_no_pending_responses()
    assert names == {"endpoint": "granite-ep", "endpoint_config": "granite-ep", "model": "granite-ep",
                     "status": "InService"}


def test_boto3_deploy_tarball_multi_instance_no_wait():
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        expect_creates(stub, {"Image": IMAGE, "Environment": {}, "ModelDataUrl": "s3://bucket/granite/model.tar.gz"},
                       instance_type="ml.p5.48xlarge", count=2)
        names = deploy.deploy_boto3(sm, plan(model_data="s3://bucket/granite/model.tar.gz", env={},
                                             instance_type="ml.p5.48xlarge", instance_count=2), wait=False)
        stub.assert_no_pending_responses()
    assert "status" not in names


def test_boto3_deploy_from_hub_id_via_cli_args():
    args = deploy.build_parser().parse_args([
        "--image-uri", IMAGE, "--role-arn", ROLE, "--hf-model-id", "ibm-granite/granite-4.0-h-micro",
        "--instance-type", "ml.g5.xlarge", "--name", "granite-ep", "--env", "MAX_NEW_TOKENS=512",
        "--env", "HF_TOKEN=a=b"])
    p = deploy.plan_from_args(args)
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        expect_creates(stub, {"Image": IMAGE, "Environment": {
            "MAX_NEW_TOKENS": "512", "HF_TOKEN": "a=b", "HF_MODEL_ID": "ibm-granite/granite-4.0-h-micro"}},
            instance_type="ml.g5.xlarge")
        deploy.deploy_boto3(sm, p, wait=False)
        stub.assert_no_pending_responses()


def test_failed_endpoint_reports_failure_reason():
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        expect_creates(stub, {"Image": IMAGE, "Environment": {"MAX_CONCURRENT_SEQS": "64"},
                              "ModelDataSource": deploy.s3_prefix_source("s3://bucket/granite/model")})
        failed = describe("Failed", FailureReason="health check did not pass within 900 s")
        stub.add_response("describe_endpoint", failed, {"EndpointName": "granite-ep"})
        stub.add_response("describe_endpoint", failed, {"EndpointName": "granite-ep"})
        with pytest.raises(RuntimeError, match="Failed: health check did not pass"):
            deploy.deploy_boto3(sm, plan(), poll_s=0)


def test_no_model_source_is_refused():
    with pytest.raises(ValueError, match="HF_MODEL_ID"):
        deploy.container_definition(plan(model_data=None, env={}))


def test_cli_rejects_unknown_instance_type(capsys):
    with pytest.raises(SystemExit):
        deploy.build_parser().parse_args(["--image-uri", IMAGE, "--role-arn", ROLE, "--model-data", "s3://b/m/",
                                          "--instance-type", "ml.t2.medium"])
    assert "invalid choice" in capsys.readouterr().err


def test_unique_names_are_valid_sagemaker_names():
    import re

    name = common.unique_name("Granite 4.0_H micro!" * 5, now=0)
    assert len(name) <= 63 and re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*", name), name
    assert name.endswith("-19700101-000000")


class Recorder:
    """Stands in for an SDK class: records constructor/classmethod/method calls."""

    calls: list = []

    def __init__(self, *args, **kw):
        Recorder.calls.append((type(self).__name__, "init", kw))

    def __getattr__(self, name):
        return lambda *a, **kw: Recorder.calls.append((type(self).__name__, name, kw)) or self


def fake_modules(monkeypatch, modules: dict[str, list[str]]) -> None:
    Recorder.calls = []
    for mod_name, class_names in modules.items():
        mod = types.ModuleType(mod_name)
        for cls in class_names:
            klass = type(cls, (Recorder,), {})
            klass.create = classmethod(lambda c, **kw: Recorder.calls.append((c.__name__, "create", kw)) or c())
            setattr(mod, cls, klass)
        monkeypatch.setitem(sys.modules, mod_name, mod)


def test_sdk_v3_passes_timeouts_and_prefix(monkeypatch):
    fake_modules(monkeypatch, {
        "sagemaker": [], "sagemaker.core": [],
        "sagemaker.core.resources": ["Endpoint", "EndpointConfig", "Model"],
        "sagemaker.core.shapes": ["ContainerDefinition", "ModelDataSource", "ProductionVariant", "S3ModelDataSource"]})
    deploy.deploy_sdk_v3(plan(), region="us-east-1")
    calls = {(c, m): kw for c, m, kw in Recorder.calls}
    assert calls[("S3ModelDataSource", "init")] == {"s3_uri": "s3://bucket/granite/model/", "s3_data_type": "S3Prefix",
                                                     "compression_type": "None"}
    assert calls[("ContainerDefinition", "init")]["image"] == IMAGE
    assert calls[("ProductionVariant", "init")] == {
        "variant_name": "AllTraffic", "model_name": "granite-ep", "instance_type": "ml.g6e.xlarge",
        "initial_instance_count": 1,
        "container_startup_health_check_timeout_in_seconds": STARTUP_HEALTH_CHECK_TIMEOUT_S,
        "model_data_download_timeout_in_seconds": MODEL_DATA_DOWNLOAD_TIMEOUT_S}
    assert calls[("Endpoint", "create")]["endpoint_config_name"] == "granite-ep"
    assert ("Endpoint", "wait_for_status", {}) in Recorder.calls


def test_sdk_v3_against_real_sagemaker_core_if_installed():
    """With sagemaker-core installed, its resources must send exactly the boto3 path's requests."""
    resources = pytest.importorskip("sagemaker.core.resources", reason="sagemaker-core (SDK v3) not installed")
    import boto3
    from sagemaker.core.utils.utils import SageMakerClient

    sess = boto3.Session(aws_access_key_id="x", aws_secret_access_key="y", region_name="us-east-1")
    sm = SageMakerClient(session=sess, region_name="us-east-1").sagemaker_client
    p = plan()
    with Stubber(sm) as stub:
        stub.add_response("create_model", {"ModelArn": ARN.format("model", "granite-ep")}, {
            "ModelName": "granite-ep", "ExecutionRoleArn": ROLE, "PrimaryContainer": deploy.container_definition(p)})
        stub.add_response("describe_model", {"ModelName": "granite-ep", "CreationTime": NOW,
                                             "ModelArn": ARN.format("model", "granite-ep")})
        stub.add_response("create_endpoint_config", {"EndpointConfigArn": ARN.format("endpoint-config", "x")}, {
            "EndpointConfigName": "granite-ep", "ProductionVariants": [deploy.production_variant(p)]})
        stub.add_response("describe_endpoint_config", {
            "EndpointConfigName": "granite-ep", "EndpointConfigArn": ARN.format("endpoint-config", "x"),
            "ProductionVariants": [deploy.production_variant(p)], "CreationTime": NOW})
        stub.add_response("create_endpoint", {"EndpointArn": ARN.format("endpoint", "granite-ep")},
                          {"EndpointName": "granite-ep", "EndpointConfigName": "granite-ep"})
        stub.add_response("describe_endpoint", describe("Creating"))
        ep = deploy.deploy_sdk_v3(p, region="us-east-1", wait=False, session=sess)
        stub.assert_no_pending_responses()
    assert isinstance(ep, resources.Endpoint) and ep.endpoint_name == "granite-ep"


def test_sdk_v2_model_deploy_arguments(monkeypatch):
    fake_modules(monkeypatch, {"sagemaker": ["Session"], "sagemaker.model": ["Model"],
                               "sagemaker.predictor": ["Predictor"], "sagemaker.serializers": ["JSONSerializer"],
                               "sagemaker.deserializers": ["JSONDeserializer"]})
    deploy.deploy_sdk_v2(plan(), boto_sess=object())
    calls = {(c, m): kw for c, m, kw in Recorder.calls}
    model = calls[("Model", "init")]
    assert model["image_uri"] == IMAGE and model["role"] == ROLE and model["name"] == "granite-ep"
    assert model["model_data"] == deploy.s3_prefix_source("s3://bucket/granite/model/")
    dep = calls[("Model", "deploy")]
    assert dep["container_startup_health_check_timeout"] == STARTUP_HEALTH_CHECK_TIMEOUT_S
    assert dep["model_data_download_timeout"] == MODEL_DATA_DOWNLOAD_TIMEOUT_S
    assert dep["instance_type"] == "ml.g6e.xlarge" and dep["endpoint_name"] == "granite-ep"


def test_cli_main_deploys_with_boto3(monkeypatch, capsys):
    from tests.fakes import FakeSession

    sm = client("sagemaker")
    monkeypatch.setattr(deploy, "boto_session", lambda region, profile: FakeSession(sagemaker=sm))
    with Stubber(sm) as stub:
        expect_creates(stub, {"Image": IMAGE, "Environment": {}, "ModelDataUrl": "s3://bucket/m/model.tar.gz"},
                       instance_type="ml.p4d.24xlarge")
        assert deploy.main(["--image-uri", IMAGE, "--role-arn", ROLE, "--model-data", "s3://bucket/m/model.tar.gz",
                            "--instance-type", "ml.p4d.24xlarge", "--name", "granite-ep", "--no-wait"]) == 0
        stub.assert_no_pending_responses()
    assert '"endpoint": "granite-ep"' in capsys.readouterr().out
