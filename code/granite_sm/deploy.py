"""Deploy a real-time endpoint: image URI + model data (model.tar.gz, an S3 prefix, or HF_MODEL_ID).

Three equivalent ways, pick one with --sdk:
- boto3 (default): create_model -> create_endpoint_config -> create_endpoint -> wait InService;
- v3: SageMaker Python SDK 3.x resources (sagemaker.core.resources Model / EndpointConfig / Endpoint);
- v2: SageMaker Python SDK 2.x (`pip install 'sagemaker<3'`): sagemaker.model.Model(...).deploy(...).

    python -m granite_sm.deploy --image-uri 123456789012.dkr.ecr.us-east-1.amazonaws.com/granite-h:latest \
        --model-data s3://my-bucket/granite/model/ --role-arn arn:aws:iam::123456789012:role/SageMakerRole \
        --instance-type ml.g5.xlarge
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from granite_sm.common import (
    DEFAULT_INSTANCE,
    INSTANCE_TYPES,
    MODEL_DATA_DOWNLOAD_TIMEOUT_S,
    STARTUP_HEALTH_CHECK_TIMEOUT_S,
    VARIANT,
    add_aws_args,
    boto_session,
    instance_table,
    parse_env,
    show,
    unique_name,
)


@dataclass
class DeployPlan:
    image_uri: str
    role_arn: str
    model_data: str | None = None  # s3://.../model.tar.gz, or an s3://.../prefix/ of uncompressed files
    env: dict[str, str] = field(default_factory=dict)
    instance_type: str = DEFAULT_INSTANCE
    instance_count: int = 1
    startup_timeout_s: int = STARTUP_HEALTH_CHECK_TIMEOUT_S
    download_timeout_s: int = MODEL_DATA_DOWNLOAD_TIMEOUT_S
    name: str = field(default_factory=unique_name)  # endpoint name; model and config derive from it

    @property
    def model_name(self) -> str:
        return self.name

    @property
    def config_name(self) -> str:
        return self.name

    @property
    def compressed(self) -> bool:
        return bool(self.model_data) and self.model_data.endswith(".tar.gz")


def s3_prefix_source(uri: str) -> dict:
    """ModelDataSource for an uncompressed prefix: SageMaker copies every object under it into
    /opt/ml/model (the trailing '/' keeps `model` from also matching `model-old/`)."""
    return {"S3DataSource": {"S3Uri": uri if uri.endswith("/") else uri + "/", "S3DataType": "S3Prefix",
                             "CompressionType": "None"}}


def container_definition(plan: DeployPlan) -> dict:
    container: dict = {"Image": plan.image_uri, "Environment": dict(plan.env)}
    if plan.model_data and plan.compressed:
        container["ModelDataUrl"] = plan.model_data
    elif plan.model_data:
        container["ModelDataSource"] = s3_prefix_source(plan.model_data)
    elif "HF_MODEL_ID" not in plan.env:
        raise ValueError("give model data (S3) or HF_MODEL_ID in the environment: the container never "
                         "falls back to a random model")
    return container


def production_variant(plan: DeployPlan) -> dict:
    return {
        "VariantName": VARIANT,
        "ModelName": plan.model_name,
        "InstanceType": plan.instance_type,
        "InitialInstanceCount": plan.instance_count,
        "ContainerStartupHealthCheckTimeoutInSeconds": plan.startup_timeout_s,
        "ModelDataDownloadTimeoutInSeconds": plan.download_timeout_s,
    }


def wait_in_service(sm, endpoint_name: str, delay_s: int = 30, max_attempts: int = 120) -> dict:
    """Poll until InService; raise with SageMaker's FailureReason if it fails."""
    waiter = sm.get_waiter("endpoint_in_service")
    try:
        waiter.wait(EndpointName=endpoint_name, WaiterConfig={"Delay": delay_s, "MaxAttempts": max_attempts})
    except Exception as e:
        desc = sm.describe_endpoint(EndpointName=endpoint_name)
        raise RuntimeError(f"endpoint {endpoint_name} is {desc['EndpointStatus']}: "
                           f"{desc.get('FailureReason', e)}") from e
    return sm.describe_endpoint(EndpointName=endpoint_name)


def deploy_boto3(sm, plan: DeployPlan, wait: bool = True, poll_s: int = 30) -> dict:
    """Plain boto3: what the other two SDK paths do under the hood. Returns the names created."""
    sm.create_model(ModelName=plan.model_name, PrimaryContainer=container_definition(plan),
                    ExecutionRoleArn=plan.role_arn)
    sm.create_endpoint_config(EndpointConfigName=plan.config_name, ProductionVariants=[production_variant(plan)])
    sm.create_endpoint(EndpointName=plan.name, EndpointConfigName=plan.config_name)
    names = {"endpoint": plan.name, "endpoint_config": plan.config_name, "model": plan.model_name}
    if wait:
        names["status"] = wait_in_service(sm, plan.name, delay_s=poll_s)["EndpointStatus"]
    return names


def deploy_sdk_v3(plan: DeployPlan, region: str | None = None, wait: bool = True, session=None):
    """SageMaker Python SDK 3.x (sagemaker-core resources; names checked against sagemaker-core 2.27).
    The resource classes map 1:1 onto the API shapes above, which keeps both timeouts explicit.
    ModelBuilder(image_uri=..., s3_model_data_url=..., role_arn=...).deploy(...) is the higher-level
    alternative. Needs a region: AWS_DEFAULT_REGION or `region`."""
    from sagemaker.core.resources import Endpoint, EndpointConfig, Model
    from sagemaker.core.shapes import (
        ContainerDefinition,
        ModelDataSource,
        ProductionVariant,
        S3ModelDataSource,
    )

    c = container_definition(plan)
    container = {"image": plan.image_uri, "environment": c["Environment"]}
    if "ModelDataUrl" in c:
        container["model_data_url"] = c["ModelDataUrl"]
    elif "ModelDataSource" in c:
        s3 = c["ModelDataSource"]["S3DataSource"]
        container["model_data_source"] = ModelDataSource(s3_data_source=S3ModelDataSource(
            s3_uri=s3["S3Uri"], s3_data_type=s3["S3DataType"], compression_type=s3["CompressionType"]))
    Model.create(model_name=plan.model_name, execution_role_arn=plan.role_arn, region=region, session=session,
                 primary_container=ContainerDefinition(**container))
    v = production_variant(plan)
    EndpointConfig.create(endpoint_config_name=plan.config_name, region=region, session=session, production_variants=[
        ProductionVariant(variant_name=v["VariantName"], model_name=v["ModelName"],
                          instance_type=v["InstanceType"], initial_instance_count=v["InitialInstanceCount"],
                          container_startup_health_check_timeout_in_seconds=plan.startup_timeout_s,
                          model_data_download_timeout_in_seconds=plan.download_timeout_s)])
    endpoint = Endpoint.create(endpoint_name=plan.name, endpoint_config_name=plan.config_name, region=region,
                               session=session)
    if wait:
        endpoint.wait_for_status("InService")
    return endpoint


def deploy_sdk_v2(plan: DeployPlan, boto_sess=None, wait: bool = True):
    """SageMaker Python SDK 2.x (`sagemaker<3`): Model(...).deploy(...) -> Predictor (JSON in/out)."""
    import sagemaker
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.model import Model
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer

    c = container_definition(plan)
    model_data = c.get("ModelDataUrl") or c.get("ModelDataSource")  # v2 takes the dict form as is
    model = Model(image_uri=plan.image_uri, model_data=model_data, role=plan.role_arn, env=c["Environment"],
                  name=plan.model_name, predictor_cls=Predictor,
                  sagemaker_session=sagemaker.Session(boto_session=boto_sess or boto_session()))
    return model.deploy(initial_instance_count=plan.instance_count, instance_type=plan.instance_type,
                        endpoint_name=plan.name, wait=wait,
                        container_startup_health_check_timeout=plan.startup_timeout_s,
                        model_data_download_timeout=plan.download_timeout_s,
                        serializer=JSONSerializer(), deserializer=JSONDeserializer())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Deploy the container as a SageMaker real-time endpoint.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="instance types:\n" + instance_table())
    p.add_argument("--image-uri", required=True, help="ECR image URI of the container")
    p.add_argument("--role-arn", required=True, help="SageMaker execution role ARN (reads S3, pulls ECR)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-data", help="s3://.../model.tar.gz, or s3://.../prefix/ of uncompressed files")
    src.add_argument("--hf-model-id", help="download this Hub model at start instead (sets HF_MODEL_ID)")
    p.add_argument("--instance-type", default=DEFAULT_INSTANCE, choices=list(INSTANCE_TYPES))
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--name", help="endpoint name (also used for the model and config); default: timestamped")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="container environment (repeatable)")
    p.add_argument("--startup-timeout", type=int, default=STARTUP_HEALTH_CHECK_TIMEOUT_S,
                   help="ContainerStartupHealthCheckTimeoutInSeconds")
    p.add_argument("--download-timeout", type=int, default=MODEL_DATA_DOWNLOAD_TIMEOUT_S,
                   help="ModelDataDownloadTimeoutInSeconds")
    p.add_argument("--sdk", choices=("boto3", "v3", "v2"), default="boto3")
    p.add_argument("--no-wait", action="store_true", help="return once creation has started")
    add_aws_args(p)
    return p


def plan_from_args(args: argparse.Namespace) -> DeployPlan:
    env = parse_env(args.env)
    if args.hf_model_id:
        env["HF_MODEL_ID"] = args.hf_model_id
    return DeployPlan(image_uri=args.image_uri, role_arn=args.role_arn, model_data=args.model_data, env=env,
                      instance_type=args.instance_type, instance_count=args.instance_count,
                      startup_timeout_s=args.startup_timeout, download_timeout_s=args.download_timeout,
                      **({"name": args.name} if args.name else {}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_from_args(args)
    session = boto_session(args.region, args.profile)
    if args.sdk == "boto3":
        show(deploy_boto3(session.client("sagemaker"), plan, wait=not args.no_wait))
    elif args.sdk == "v3":
        deploy_sdk_v3(plan, session.region_name, wait=not args.no_wait, session=session)
        print(plan.name)
    else:
        deploy_sdk_v2(plan, session, wait=not args.no_wait)
        print(plan.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
