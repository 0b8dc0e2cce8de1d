"""LoRA adapters on SageMaker, the inference-component way: one base component (the base model, MAX_LORAS set) and
one adapter component per fine-tune (a tar.gz of a PEFT adapter in S3), each invoked by its component name.

    package_adapter(folder, out.tar.gz)       adapter_config.json + adapter_model.safetensors at the archive's root
    upload(s3, tar.gz, s3://bucket/key)
    deploy_components(sm, plan)               model + endpoint config (no model: components) + endpoint + base component
    create_adapter_component(sm, ...)         BaseInferenceComponentName + Container.ArtifactUrl
    invoke_component(runtime, endpoint, component, payload)

SageMaker registers each adapter component with the container by POST /adapters and sends its invocations with
the X-Amzn-SageMaker-Adapter-Identifier header (README: LoRA adapters).

    python -m granite_sm.adapters package --adapter ./my-adapter --out adapter.tar.gz [--s3 s3://bucket/lora/fr.tar.gz]
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from granite_sm.common import (
    DEFAULT_INSTANCE,
    MODEL_DATA_DOWNLOAD_TIMEOUT_S,
    STARTUP_HEALTH_CHECK_TIMEOUT_S,
    VARIANT,
    parse_s3_uri,
    unique_name,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def package_adapter(folder: str | Path, out: str | Path) -> Path:
    """A PEFT adapter folder -> a tar.gz with its files at the root (what an adapter component's ArtifactUrl holds)."""
    folder, out = Path(folder), Path(out)
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a PEFT adapter saved with safetensors: {', '.join(missing)} missing")
    if list(folder.glob("*.bin")):
        raise ValueError(f"{folder} holds pickle weights (*.bin): the container refuses them; save with safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("use_dora") or cfg.get("modules_to_save"):
        raise ValueError("DoRA and modules_to_save adapters are refused by the container (not plain LoRA)")
    with tarfile.open(out, "w:gz") as tar:
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                tar.add(f, arcname=f.name)
    return out


def upload(s3, archive: str | Path, uri: str) -> str:
    bucket, key = parse_s3_uri(uri)
    s3.upload_file(str(archive), bucket, key)
    return uri


@dataclass
class ComponentsPlan:
    image_uri: str
    role_arn: str
    model_data: str  # the base model: s3://.../model.tar.gz or an uncompressed s3:// prefix
    max_loras: int = 4
    max_lora_rank: int = 16
    env: dict[str, str] = field(default_factory=dict)
    instance_type: str = DEFAULT_INSTANCE
    accelerators: int = 1
    min_memory_mb: int = 8192
    name: str = field(default_factory=unique_name)

    @property
    def base_component(self) -> str:
        return f"{self.name}-base"


def _container(plan: ComponentsPlan) -> dict:
    env = {"MAX_LORAS": str(plan.max_loras), "MAX_LORA_RANK": str(plan.max_lora_rank), **plan.env}
    c: dict = {"Image": plan.image_uri, "Environment": env}
    if plan.model_data.endswith(".tar.gz"):
        c["ModelDataUrl"] = plan.model_data
    else:
        uri = plan.model_data if plan.model_data.endswith("/") else plan.model_data + "/"
        c["ModelDataSource"] = {"S3DataSource": {"S3Uri": uri, "S3DataType": "S3Prefix", "CompressionType": "None"}}
    return c


def deploy_components(sm, plan: ComponentsPlan) -> dict:
    """The base model as an inference component on a component endpoint (the endpoint config names no model)."""
    sm.create_model(ModelName=plan.name, PrimaryContainer=_container(plan), ExecutionRoleArn=plan.role_arn)
    sm.create_endpoint_config(EndpointConfigName=plan.name, ExecutionRoleArn=plan.role_arn, ProductionVariants=[{
        "VariantName": VARIANT, "InstanceType": plan.instance_type, "InitialInstanceCount": 1,
        "RoutingConfig": {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"}}])
    sm.create_endpoint(EndpointName=plan.name, EndpointConfigName=plan.name)
    sm.get_waiter("endpoint_in_service").wait(EndpointName=plan.name, WaiterConfig={"Delay": 30, "MaxAttempts": 120})
    sm.create_inference_component(
        InferenceComponentName=plan.base_component, EndpointName=plan.name, VariantName=VARIANT,
        Specification={"ModelName": plan.name, "StartupParameters": {
            "ModelDataDownloadTimeoutInSeconds": MODEL_DATA_DOWNLOAD_TIMEOUT_S,
            "ContainerStartupHealthCheckTimeoutInSeconds": STARTUP_HEALTH_CHECK_TIMEOUT_S},
            "ComputeResourceRequirements": {"MinMemoryRequiredInMb": plan.min_memory_mb,
                                            "NumberOfAcceleratorDevicesRequired": plan.accelerators}},
        RuntimeConfig={"CopyCount": 1})
    return {"endpoint": plan.name, "base_component": plan.base_component}


def create_adapter_component(sm, endpoint: str, name: str, base_component: str, artifact_url: str) -> str:
    """One fine-tune: a child of the base component; SageMaker downloads the tar.gz and POSTs /adapters."""
    sm.create_inference_component(InferenceComponentName=name, EndpointName=endpoint,
                                  Specification={"BaseInferenceComponentName": base_component,
                                                 "Container": {"ArtifactUrl": artifact_url}})
    return name


def invoke_component(runtime, endpoint: str, component: str, payload: dict) -> dict:
    """An invocation of the base (its component) or of one adapter (its component)."""
    resp = runtime.invoke_endpoint(EndpointName=endpoint, InferenceComponentName=component,
                                   ContentType="application/json", Accept="application/json",
                                   Body=json.dumps(payload).encode())
    return json.loads(resp["Body"].read())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m granite_sm.adapters")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("package", help="tar.gz a PEFT adapter folder (and upload it)")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--s3", help="upload to this s3://bucket/key")
    a = ap.parse_args(argv)
    try:
        out = package_adapter(a.adapter, a.out)
    except ValueError as e:
        print(f"adapters: {e}", file=sys.stderr)
        return 2
    if a.s3:
        import boto3

        upload(boto3.client("s3"), out, a.s3)
    print(a.s3 or out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
