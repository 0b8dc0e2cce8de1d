"""Delete what deploy/scale/batch_transform/package created: scaling policies and target, the endpoint,
its endpoint config and models, extra models (e.g. the batch one), and optionally S3 prefixes.
Everything missing is skipped, so it is safe to run twice or after a failed deploy.

    python -m granite_sm.cleanup --endpoint-name granite-4-h-micro-... --s3 s3://my-bucket/granite/ --yes
"""

from __future__ import annotations

import argparse
import sys

from botocore.exceptions import ClientError

from granite_sm.common import VARIANT, add_aws_args, boto_session, parse_s3_uri, show
from granite_sm.scale import DIMENSION, NAMESPACE, resource_id


def _missing(e: ClientError) -> bool:
    err = e.response.get("Error", {})
    return err.get("Code") in ("ObjectNotFoundException", "NoSuchKey", "NoSuchBucket") or (
        err.get("Code") == "ValidationException" and "Could not find" in err.get("Message", ""))


def remove_scaling(aas, endpoint_name: str, variant: str = VARIANT) -> list[str]:
    """Delete the variant's scaling policies, then deregister it. Returns what was deleted."""
    rid = resource_id(endpoint_name, variant)
    done = []
    policies = aas.describe_scaling_policies(ServiceNamespace=NAMESPACE, ResourceId=rid,
                                             ScalableDimension=DIMENSION).get("ScalingPolicies", [])
    for policy in policies:
        aas.delete_scaling_policy(PolicyName=policy["PolicyName"], ServiceNamespace=NAMESPACE, ResourceId=rid,
                                  ScalableDimension=DIMENSION)
        done.append(f"scaling policy {policy['PolicyName']}")
    try:
        aas.deregister_scalable_target(ServiceNamespace=NAMESPACE, ResourceId=rid, ScalableDimension=DIMENSION)
        done.append(f"scalable target {rid}")
    except ClientError as e:
        if not _missing(e):
            raise
    return done


def delete_model(sm, model_name: str) -> bool:
    try:
        sm.delete_model(ModelName=model_name)
        return True
    except ClientError as e:
        if _missing(e):
            return False
        raise


def delete_endpoint(sm, endpoint_name: str) -> list[str]:
    """Endpoint -> its config -> the config's models, each deleted once found."""
    done = []
    try:
        config_name = sm.describe_endpoint(EndpointName=endpoint_name)["EndpointConfigName"]
    except ClientError as e:
        if not _missing(e):
            raise
        config_name = endpoint_name  # deploy.py names the config after the endpoint
    else:
        sm.delete_endpoint(EndpointName=endpoint_name)
        done.append(f"endpoint {endpoint_name}")
    try:
        variants = sm.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"]
    except ClientError as e:
        if not _missing(e):
            raise
        return done
    sm.delete_endpoint_config(EndpointConfigName=config_name)
    done.append(f"endpoint config {config_name}")
    for name in dict.fromkeys(v["ModelName"] for v in variants):
        if delete_model(sm, name):
            done.append(f"model {name}")
    return done


def delete_s3_prefix(s3, uri: str) -> int:
    """Delete every object under an s3:// prefix; returns how many."""
    bucket, prefix = parse_s3_uri(uri)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:  # a page holds at most 1000 keys, the delete_objects limit
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            count += len(keys)
    return count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Delete the endpoint, its config, models, scaling and S3 data.")
    p.add_argument("--endpoint-name", help="endpoint to delete (with its config, models and autoscaling)")
    p.add_argument("--variant", default=VARIANT)
    p.add_argument("--model-name", action="append", default=[], help="extra model to delete (repeatable)")
    p.add_argument("--s3", action="append", default=[], help="s3:// prefix to empty (repeatable)")
    p.add_argument("--yes", action="store_true", help="really delete (otherwise only say what would go)")
    add_aws_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.yes:
        show({"would_delete": {"endpoint": args.endpoint_name, "models": args.model_name, "s3": args.s3},
              "hint": "add --yes"})
        return 0
    session = boto_session(args.region, args.profile)
    sm = session.client("sagemaker")
    done: list[str] = []
    if args.endpoint_name:
        done += remove_scaling(session.client("application-autoscaling"), args.endpoint_name, args.variant)
        done += delete_endpoint(sm, args.endpoint_name)
    done += [f"model {m}" for m in args.model_name if delete_model(sm, m)]
    if args.s3:
        s3 = session.client("s3")
        done += [f"{delete_s3_prefix(s3, uri)} objects under {uri}" for uri in args.s3]
    show({"deleted": done})
    return 0


if __name__ == "__main__":
    sys.exit(main())
