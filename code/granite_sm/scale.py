"""Autoscale an endpoint variant with Application Auto Scaling target tracking.

Metrics:
- invocations: SageMakerVariantInvocationsPerInstance (per minute per instance; classic, 1-minute metrics);
- concurrency: SageMakerVariantConcurrentRequestsPerModelHighResolution (in-flight requests per model copy,
  10-second metrics: reacts faster, and suits LLMs whose requests last seconds).
With this container one model copy runs per GPU and batches continuously, so a concurrency target a bit
under the engine's MAX_CONCURRENT_SEQS per GPU keeps queues short.

    python -m granite_sm.scale --endpoint-name granite-4-h-micro-... --min 1 --max 4 \
        --metric concurrency --target 24
"""

from __future__ import annotations

import argparse
import sys

from granite_sm.common import VARIANT, add_aws_args, clients, show

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
METRICS = {
    "invocations": "SageMakerVariantInvocationsPerInstance",
    "concurrency": "SageMakerVariantConcurrentRequestsPerModelHighResolution",
}


def resource_id(endpoint_name: str, variant: str = VARIANT) -> str:
    return f"endpoint/{endpoint_name}/variant/{variant}"


def policy_name(endpoint_name: str, metric: str) -> str:
    return f"{endpoint_name}-{metric}-target-tracking"


def register(aas, endpoint_name: str, min_instances: int, max_instances: int, variant: str = VARIANT) -> None:
    if not 1 <= min_instances <= max_instances:
        raise ValueError(f"need 1 <= min ({min_instances}) <= max ({max_instances}) for an instance-based endpoint")
    aas.register_scalable_target(ServiceNamespace=NAMESPACE, ResourceId=resource_id(endpoint_name, variant),
                                 ScalableDimension=DIMENSION, MinCapacity=min_instances, MaxCapacity=max_instances)


def put_target_tracking(aas, endpoint_name: str, metric: str, target: float, scale_in_cooldown_s: int = 300,
                        scale_out_cooldown_s: int = 60, variant: str = VARIANT) -> str:
    """Add instances quickly, remove them slowly (scale-in drains requests; a new GPU instance takes
    minutes to load the model). Returns the policy ARN."""
    resp = aas.put_scaling_policy(
        PolicyName=policy_name(endpoint_name, metric),
        ServiceNamespace=NAMESPACE,
        ResourceId=resource_id(endpoint_name, variant),
        ScalableDimension=DIMENSION,
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": float(target),
            "PredefinedMetricSpecification": {"PredefinedMetricType": METRICS[metric]},
            "ScaleInCooldown": scale_in_cooldown_s,
            "ScaleOutCooldown": scale_out_cooldown_s,
        },
    )
    return resp["PolicyARN"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Register an endpoint variant for autoscaling with a "
                                            "target-tracking policy.")
    p.add_argument("--endpoint-name", required=True)
    p.add_argument("--variant", default=VARIANT)
    p.add_argument("--min", dest="min_instances", type=int, default=1, help="minimum instances (>= 1)")
    p.add_argument("--max", dest="max_instances", type=int, default=4, help="maximum instances")
    p.add_argument("--metric", choices=list(METRICS), default="concurrency")
    p.add_argument("--target", type=float, default=None,
                   help="target value (default: 24 concurrent requests, or 60 invocations/instance/minute)")
    p.add_argument("--scale-in-cooldown", type=int, default=300)
    p.add_argument("--scale-out-cooldown", type=int, default=60)
    add_aws_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target = args.target if args.target is not None else (24.0 if args.metric == "concurrency" else 60.0)
    (aas,) = clients(args.region, args.profile, "application-autoscaling")
    register(aas, args.endpoint_name, args.min_instances, args.max_instances, args.variant)
    arn = put_target_tracking(aas, args.endpoint_name, args.metric, target, args.scale_in_cooldown,
                              args.scale_out_cooldown, args.variant)
    show({"resource_id": resource_id(args.endpoint_name, args.variant), "policy_arn": arn,
          "metric": METRICS[args.metric], "target": target})
    return 0


if __name__ == "__main__":
    sys.exit(main())
