"""code/granite_sm/scale.py: Application Auto Scaling requests checked against the service model (Stubber)."""

import pytest
from botocore.stub import Stubber

from tests.sdk_helpers import client, load

scale = load("scale")
RID = "endpoint/granite-ep/variant/AllTraffic"


@pytest.mark.parametrize("metric,predefined,target", [
    ("concurrency", "SageMakerVariantConcurrentRequestsPerModelHighResolution", 24.0),
    ("invocations", "SageMakerVariantInvocationsPerInstance", 60.0),
])
def test_register_and_target_tracking(metric, predefined, target, capsys, monkeypatch):
    aas = client("application-autoscaling")
    with Stubber(aas) as stub:
        stub.add_response("register_scalable_target", {}, {
            "ServiceNamespace": "sagemaker", "ResourceId": RID,
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount", "MinCapacity": 1, "MaxCapacity": 6})
        stub.add_response("put_scaling_policy", {"PolicyARN": "arn:aws:autoscaling:us-east-1:1:scalingPolicy:p",
                                                 "Alarms": []}, {
            "PolicyName": f"granite-ep-{metric}-target-tracking", "ServiceNamespace": "sagemaker",
            "ResourceId": RID, "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": target, "PredefinedMetricSpecification": {"PredefinedMetricType": predefined},
                "ScaleInCooldown": 600, "ScaleOutCooldown": 30}})
        monkeypatch.setattr(scale, "clients", lambda region, profile, *names: [aas])
        assert scale.main(["--endpoint-name", "granite-ep", "--min", "1", "--max", "6", "--metric", metric,
                           "--scale-in-cooldown", "600", "--scale-out-cooldown", "30"]) == 0
        stub.assert_no_pending_responses()
    assert predefined in capsys.readouterr().out


def test_predefined_metrics_exist_in_the_service_model():
    enum = client("application-autoscaling").meta.service_model.shape_for("MetricType").enum
    assert set(scale.METRICS.values()) <= set(enum)


@pytest.mark.parametrize("lo,hi", [(0, 2), (3, 2)])
def test_bad_capacity_is_refused(lo, hi):
    with pytest.raises(ValueError, match="min"):
        scale.register(client("application-autoscaling"), "granite-ep", lo, hi)
