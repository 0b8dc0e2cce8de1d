"""code/granite_sm/cleanup.py: deletion order and skip-if-missing, checked against the SageMaker,
Application Auto Scaling and S3 service models (Stubber)."""

import datetime

from botocore.stub import Stubber

from tests.sdk_helpers import client, load

cleanup = load("cleanup")
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
RID = "endpoint/granite-ep/variant/AllTraffic"
DIM = "sagemaker:variant:DesiredInstanceCount"


def test_delete_endpoint_config_and_models():
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        stub.add_response("describe_endpoint", {
            "EndpointName": "granite-ep", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/granite-ep",
            "EndpointConfigName": "granite-cfg", "EndpointStatus": "InService", "CreationTime": NOW,
            "LastModifiedTime": NOW}, {"EndpointName": "granite-ep"})
        stub.add_response("delete_endpoint", {}, {"EndpointName": "granite-ep"})
        stub.add_response("describe_endpoint_config", {
            "EndpointConfigName": "granite-cfg", "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:endpoint-config/c",
            "CreationTime": NOW, "ProductionVariants": [
                {"VariantName": "AllTraffic", "ModelName": "granite-model"},
                {"VariantName": "Canary", "ModelName": "granite-model"}]}, {"EndpointConfigName": "granite-cfg"})
        stub.add_response("delete_endpoint_config", {}, {"EndpointConfigName": "granite-cfg"})
        stub.add_response("delete_model", {}, {"ModelName": "granite-model"})  # once, though two variants use it
        done = cleanup.delete_endpoint(sm, "granite-ep")
        stub.assert_no_pending_responses()
    assert done == ["endpoint granite-ep", "endpoint config granite-cfg", "model granite-model"]


def test_missing_endpoint_still_cleans_config_named_after_it_and_skips_missing_model():
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        stub.add_client_error("describe_endpoint", "ValidationException", "Could not find endpoint granite-ep.")
        stub.add_response("describe_endpoint_config", {
            "EndpointConfigName": "granite-ep", "EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:endpoint-config/c",
            "CreationTime": NOW, "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "gone"}]},
            {"EndpointConfigName": "granite-ep"})
        stub.add_response("delete_endpoint_config", {}, {"EndpointConfigName": "granite-ep"})
        stub.add_client_error("delete_model", "ValidationException", "Could not find model gone.")
        assert cleanup.delete_endpoint(sm, "granite-ep") == ["endpoint config granite-ep"]
        stub.add_client_error("describe_endpoint", "ValidationException", "Could not find endpoint x.")
        stub.add_client_error("describe_endpoint_config", "ValidationException", "Could not find config x.")
        assert cleanup.delete_endpoint(sm, "x") == []
        stub.assert_no_pending_responses()


def test_remove_scaling_policies_then_target():
    aas = client("application-autoscaling")
    key = {"ServiceNamespace": "sagemaker", "ResourceId": RID, "ScalableDimension": DIM}
    with Stubber(aas) as stub:
        stub.add_response("describe_scaling_policies", {"ScalingPolicies": [{
            "PolicyARN": "arn:p", "PolicyName": "granite-ep-concurrency-target-tracking", "PolicyType":
            "TargetTrackingScaling", "CreationTime": NOW, **key}]}, key)
        stub.add_response("delete_scaling_policy", {}, {"PolicyName": "granite-ep-concurrency-target-tracking", **key})
        stub.add_response("deregister_scalable_target", {}, key)
        assert cleanup.remove_scaling(aas, "granite-ep") == [
            "scaling policy granite-ep-concurrency-target-tracking", f"scalable target {RID}"]
        stub.add_response("describe_scaling_policies", {"ScalingPolicies": []}, key)
        stub.add_client_error("deregister_scalable_target", "ObjectNotFoundException", "No scalable target")
        assert cleanup.remove_scaling(aas, "granite-ep") == []
        stub.assert_no_pending_responses()


def test_delete_s3_prefix_in_pages():
    s3 = client("s3")
    with Stubber(s3) as stub:
        stub.add_response("list_objects_v2", {"Contents": [{"Key": "g/a"}, {"Key": "g/b"}], "IsTruncated": True,
                                              "NextContinuationToken": "t"}, {"Bucket": "b", "Prefix": "g/"})
        stub.add_response("delete_objects", {"Deleted": [{"Key": "g/a"}, {"Key": "g/b"}]},
                          {"Bucket": "b", "Delete": {"Objects": [{"Key": "g/a"}, {"Key": "g/b"}], "Quiet": True}})
        stub.add_response("list_objects_v2", {"Contents": [{"Key": "g/c"}], "IsTruncated": False},
                          {"Bucket": "b", "Prefix": "g/", "ContinuationToken": "t"})
        stub.add_response("delete_objects", {}, {"Bucket": "b", "Delete": {"Objects": [{"Key": "g/c"}], "Quiet": True}})
        assert cleanup.delete_s3_prefix(s3, "s3://b/g/") == 3
        stub.assert_no_pending_responses()


def test_cli_without_yes_deletes_nothing(capsys):
    assert cleanup.main(["--endpoint-name", "granite-ep", "--s3", "s3://b/g/"]) == 0
    assert "would_delete" in capsys.readouterr().out
