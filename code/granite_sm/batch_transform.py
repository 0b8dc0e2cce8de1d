"""Batch transform over JSON Lines: upload, create_transform_job (MultiRecord, Line split/assemble), wait,
download the `<input>.out` files and pair each output line with its input line.

Batch transform needs a model whose data is model.tar.gz (ModelDataUrl) or HF_MODEL_ID: it does not
accept uncompressed S3-prefix model data. SageMaker hands whole input *files* to instances, so with
--instance-count N the records are written as N files (one per instance).

    python -m granite_sm.batch_transform --model-name granite-4-h-micro-tar --input prompts.jsonl \
        --s3 s3://my-bucket/granite/batch --instance-type ml.g5.xlarge --instance-count 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from granite_sm.common import (
    DEFAULT_INSTANCE,
    INSTANCE_TYPES,
    INVOCATIONS_TIMEOUT_S,
    add_aws_args,
    boto_session,
    parse_env,
    parse_s3_uri,
    s3_uri,
    show,
    unique_name,
)

JSONL = "application/jsonlines"


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_shards(records: list[dict], out_dir: str | Path, shards: int = 1, stem: str = "part") -> list[Path]:
    """Records -> `shards` JSON Lines files of contiguous runs (so concatenating the outputs in file
    order keeps the input order)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = max(1, min(shards, len(records) or 1))
    size = -(-len(records) // shards)  # ceil
    paths = []
    for i in range(shards):
        path = out / f"{stem}-{i:05d}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records[i * size:(i + 1) * size]), encoding="utf-8")
        paths.append(path)
    return paths


def upload_inputs(s3, paths: list[Path], input_uri: str) -> str:
    """Upload input files under `input_uri` (a prefix); returns it with a trailing '/'."""
    bucket, prefix = parse_s3_uri(input_uri)
    prefix = prefix.strip("/")
    for path in paths:
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return s3_uri(bucket, prefix + "/")


def transform_job_request(job_name: str, model_name: str, input_uri: str, output_uri: str, *,
                          instance_type: str = DEFAULT_INSTANCE, instance_count: int = 1,
                          max_concurrent: int | None = None, max_payload_mb: int = 6,
                          invocations_timeout_s: int = INVOCATIONS_TIMEOUT_S, max_retries: int = 1,
                          env: dict[str, str] | None = None) -> dict:
    """CreateTransformJob parameters. MultiRecord + SplitType=Line packs many lines into each request
    (up to MaxPayloadInMB); the container answers one line per line, and AssembleWith=Line joins them
    into <input>.out. Without max_concurrent, SageMaker asks the container's /execution-parameters."""
    req = {
        "TransformJobName": job_name,
        "ModelName": model_name,
        "BatchStrategy": "MultiRecord",
        "MaxPayloadInMB": max_payload_mb,
        "ModelClientConfig": {"InvocationsTimeoutInSeconds": invocations_timeout_s,
                              "InvocationsMaxRetries": max_retries},
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
            "ContentType": JSONL,
            "SplitType": "Line",
            "CompressionType": "None",
        },
        "TransformOutput": {"S3OutputPath": output_uri, "Accept": JSONL, "AssembleWith": "Line"},
        "TransformResources": {"InstanceType": instance_type, "InstanceCount": instance_count},
    }
    if max_concurrent:
        req["MaxConcurrentTransforms"] = max_concurrent
    if env:
        req["Environment"] = dict(env)
    return req


def transform_with_sdk(model_name: str, input_uri: str, output_uri: str, *, instance_type: str = DEFAULT_INSTANCE,
                       instance_count: int = 1, max_concurrent: int | None = None, max_payload_mb: int = 6,
                       invocations_timeout_s: int = INVOCATIONS_TIMEOUT_S, job_name: str | None = None,
                       wait: bool = True):
    """The same job through the SageMaker Python SDK's Transformer: sagemaker.core.transformer in 3.x,
    sagemaker.transformer in 2.x (same arguments)."""
    try:
        from sagemaker.core.transformer import Transformer  # SDK 3.x
    except ImportError:
        from sagemaker.transformer import Transformer  # SDK 2.x

    transformer = Transformer(model_name=model_name, instance_count=instance_count, instance_type=instance_type,
                              strategy="MultiRecord", assemble_with="Line", output_path=output_uri,
                              accept=JSONL, max_concurrent_transforms=max_concurrent, max_payload=max_payload_mb)
    transformer.transform(input_uri, data_type="S3Prefix", content_type=JSONL, split_type="Line",
                          job_name=job_name, wait=wait, logs=False,
                          model_client_config={"InvocationsTimeoutInSeconds": invocations_timeout_s,
                                               "InvocationsMaxRetries": 1})
    return transformer


def wait_transform_job(sm, job_name: str, delay_s: int = 30, max_attempts: int = 240) -> dict:
    waiter = sm.get_waiter("transform_job_completed_or_stopped")
    try:
        waiter.wait(TransformJobName=job_name, WaiterConfig={"Delay": delay_s, "MaxAttempts": max_attempts})
    except Exception:
        pass  # the waiter also gives up on Failed: describe says why
    desc = sm.describe_transform_job(TransformJobName=job_name)
    if desc["TransformJobStatus"] != "Completed":
        raise RuntimeError(f"transform job {job_name} is {desc['TransformJobStatus']}: "
                           f"{desc.get('FailureReason', '')} (see CloudWatch /aws/sagemaker/TransformJobs)")
    return desc


def download_outputs(s3, output_uri: str, local_dir: str | Path) -> list[Path]:
    """Every object under output_uri (the <input>.out files) -> local_dir, sorted by name."""
    bucket, prefix = parse_s3_uri(output_uri)
    prefix = prefix.strip("/") + "/"
    out = Path(local_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            path = out / obj["Key"][len(prefix):]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            paths.append(path)
    return sorted(paths)


def pair_results(input_paths: list[Path], output_dir: str | Path) -> list[tuple[dict, dict]]:
    """(input record, output record) for every line; <name>.out answers <name> line by line."""
    pairs = []
    for path in input_paths:
        inputs = read_jsonl(path)
        outputs = read_jsonl(Path(output_dir) / f"{path.name}.out")
        if len(inputs) != len(outputs):
            raise ValueError(f"{path.name}: {len(inputs)} input lines but {len(outputs)} output lines")
        pairs.extend(zip(inputs, outputs, strict=True))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run a SageMaker batch transform over a JSON Lines file.")
    p.add_argument("--model-name", required=True, help="a SageMaker model with model.tar.gz or HF_MODEL_ID data")
    p.add_argument("--input", required=True, help="local JSON Lines file (one request per line)")
    p.add_argument("--s3", required=True, help="s3://bucket/prefix for <prefix>/input/ and <prefix>/output/")
    p.add_argument("--job-name", help="default: timestamped")
    p.add_argument("--instance-type", default=DEFAULT_INSTANCE, choices=list(INSTANCE_TYPES))
    p.add_argument("--instance-count", type=int, default=1, help="instances; the input is split into this many files")
    p.add_argument("--max-concurrent", type=int, help="MaxConcurrentTransforms (default: container's hint)")
    p.add_argument("--max-payload-mb", type=int, default=6, help="MaxPayloadInMB per request")
    p.add_argument("--invocations-timeout", type=int, default=INVOCATIONS_TIMEOUT_S,
                   help="InvocationsTimeoutInSeconds per request (up to 3600)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE", help="container environment (repeatable)")
    p.add_argument("--work-dir", default="build/batch", help="local folder for shards and results")
    p.add_argument("--no-wait", action="store_true")
    add_aws_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    session = boto_session(args.region, args.profile)
    sm, s3 = session.client("sagemaker"), session.client("s3")
    job = args.job_name or unique_name("granite-batch")
    work = Path(args.work_dir) / job
    shards = write_shards(read_jsonl(args.input), work / "input", args.instance_count)
    base = args.s3.rstrip("/")
    input_uri = upload_inputs(s3, shards, f"{base}/{job}/input")
    output_uri = f"{base}/{job}/output"
    sm.create_transform_job(**transform_job_request(
        job, args.model_name, input_uri, output_uri, instance_type=args.instance_type,
        instance_count=args.instance_count, max_concurrent=args.max_concurrent, max_payload_mb=args.max_payload_mb,
        invocations_timeout_s=args.invocations_timeout, env=parse_env(args.env)))
    print(f"transform job {job}: {input_uri} -> {output_uri}")
    if args.no_wait:
        return 0
    wait_transform_job(sm, job)
    download_outputs(s3, output_uri, work / "output")
    for record, result in pair_results(shards, work / "output"):
        show({"input": record, "output": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
