import dataclasses
import subprocess
import sys

import pytest

from model.types import EngineConfig
from serve.config import Config, ConfigError, Context, load_config, with_context
from serve.env_vars import VARS, describe


def test_defaults_match_sagemaker_contract():
    cfg = load_config({})
    assert cfg.server.port == 8080
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.max_payload_bytes == 6_291_456
    assert cfg.server.workers == 1
    assert cfg.server.batch is False
    assert cfg.server.batch_strategy == "MULTI_RECORD"
    assert cfg.server.max_concurrent_transforms is None
    assert cfg.model.model_dir == "/opt/ml/model"
    assert cfg.model.model_id is None and cfg.model.hf_model_id is None
    assert cfg.context == Context()  # the context limits come from the checkpoint (with_context)
    # the server's disk tier is on (8 GiB under /tmp; tests/conftest.py gives each test its own folder), the
    # engine's own default has none
    assert cfg.engine.snapshot_disk_bytes == 8 << 30 and cfg.engine.snapshot_disk_dir
    assert {v["name"]: v["default"] for v in describe()}["SNAPSHOT_DISK_DIR"] == "/tmp/granite-h-snapshots"
    assert dataclasses.replace(cfg.engine, max_input_tokens=8192, max_total_tokens=16384, snapshot_disk_dir="",
                               snapshot_disk_bytes=0) == EngineConfig()
    assert cfg.server.gpu_ids == ()


def test_config_is_frozen():
    cfg = load_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.engine.max_concurrent_seqs = 3  # type: ignore[misc]


def test_sagemaker_port_wins_over_port():
    assert load_config({"PORT": "9000"}).server.port == 9000
    assert load_config({"PORT": "9000", "SAGEMAKER_BIND_TO_PORT": "7070"}).server.port == 7070


@pytest.mark.parametrize("raw", ["true", "True", "TRUE", " true "])
def test_sagemaker_batch_case_insensitive(raw):
    assert load_config({"SAGEMAKER_BATCH": raw}).server.batch is True
    assert load_config({"SAGEMAKER_BATCH": "false"}).server.batch is False


def test_payload_and_strategy():
    cfg = load_config({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "20", "SAGEMAKER_BATCH_STRATEGY": "single_record",
                       "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "4"})
    assert cfg.server.max_payload_bytes == 20 * 1024 * 1024
    assert cfg.server.batch_strategy == "SINGLE_RECORD"
    assert cfg.server.max_concurrent_transforms == 4


def test_engine_limits_are_read():
    cfg = load_config({"MAX_INPUT_TOKENS": "100", "MAX_TOTAL_TOKENS": "200", "MAX_CONCURRENT_SEQS": "3",
                       "MAX_QUEUED_REQUESTS": "5", "PREFILL_CHUNK_TOKENS": "16", "KV_CACHE_TOKENS": "4096",
                       "MAX_STEP_TOKENS": "64", "DTYPE": "bfloat16", "SSM_STATE_DTYPE": "float32",
                       "DEVICE": "cpu", "CUDA_GRAPHS": "0", "KERNELS": "reference", "MAX_NEW_TOKENS": "7"})
    e = cfg.engine
    assert (e.max_input_tokens, e.max_total_tokens, e.max_concurrent_seqs) == (100, 200, 3)
    assert (e.max_queued_requests, e.prefill_chunk_tokens, e.kv_cache_tokens) == (5, 16, 4096)
    assert (e.max_step_tokens, e.dtype, e.ssm_state_dtype, e.device) == (64, "bfloat16", "float32", "cpu")
    assert e.cuda_graphs is False and e.kernels == "reference"
    assert cfg.server.default_max_new_tokens == 7


def test_model_source_and_token_hidden():
    cfg = load_config({"MODEL_DIR": "/m", "HF_MODEL_ID": "ibm/x", "HF_MODEL_REVISION": "abc",
                       "HF_TOKEN": "secret-token", "MODEL_ID": "demo", "MODEL_CACHE_DIR": "/c"})
    assert cfg.model.model_dir == "/m" and cfg.model.hf_model_id == "ibm/x"
    assert cfg.model.hf_revision == "abc" and cfg.model.model_id == "demo" and cfg.model.cache_dir == "/c"
    assert cfg.model.hf_token == "secret-token"
    assert "secret-token" not in repr(cfg)


@pytest.mark.parametrize(
    "env,names",
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"SAGEMAKER_BIND_TO_PORT": "-1"}, "SAGEMAKER_BIND_TO_PORT"),
        ({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "0"}, "SAGEMAKER_MAX_PAYLOAD_IN_MB"),
        ({"SAGEMAKER_BATCH": "maybe"}, "SAGEMAKER_BATCH"),
        ({"SAGEMAKER_BATCH_STRATEGY": "ALL"}, "SAGEMAKER_BATCH_STRATEGY"),
        ({"MAX_CONCURRENT_SEQS": "0"}, "MAX_CONCURRENT_SEQS"),
        ({"MAX_INPUT_TOKENS": "500", "MAX_TOTAL_TOKENS": "400"}, "MAX_INPUT_TOKENS"),
        ({"MAX_NEW_TOKENS": "20000", "MAX_TOTAL_TOKENS": "16384"}, "MAX_NEW_TOKENS"),
        ({"DTYPE": "int8"}, "DTYPE"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"KERNELS": "fused", "DEVICE": "cpu"}, "KERNELS"),
        ({"CUDA_GRAPHS": "sometimes"}, "CUDA_GRAPHS"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"HF_TOKEN": " "}, None),  # empty means unset, not an error
    ],
)
def test_invalid_values_name_the_variable(env, names):
    if names is None:
        assert load_config(env).model.hf_token is None
        return
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert names in str(err.value)


def test_default_max_new_tokens_yields_to_a_small_context():
    assert load_config({"MAX_TOTAL_TOKENS": "100", "MAX_INPUT_TOKENS": "50"}).server.default_max_new_tokens == 99


def test_gpus_decide_workers():
    assert load_config({"SM_NUM_GPUS": "4"}).server.workers == 4
    assert load_config({"SM_NUM_GPUS": "4"}).server.gpu_ids == ("0", "1", "2", "3")
    cfg = load_config({"CUDA_VISIBLE_DEVICES": "2,5"})
    assert cfg.server.gpu_ids == ("2", "5") and cfg.server.workers == 2
    assert load_config({"CUDA_VISIBLE_DEVICES": "2,5", "SAGEMAKER_MODEL_SERVER_WORKERS": "1"}).server.workers == 1
    assert load_config({"CUDA_VISIBLE_DEVICES": ""}).server.workers == 1
    assert load_config({"SM_NUM_GPUS": "4", "DEVICE": "cpu"}).server.workers == 1


def test_threads_cover_slots_and_queue():
    cfg = load_config({"MAX_CONCURRENT_SEQS": "300", "MAX_QUEUED_REQUESTS": "400"})
    assert cfg.threads >= 700
    assert Config().threads >= 256


def test_describe_lists_every_variable_once():
    rows = describe()
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)) == len(VARS)
    for required in ("SAGEMAKER_BIND_TO_PORT", "SAGEMAKER_MAX_PAYLOAD_IN_MB", "MODEL_DIR", "HF_TOKEN",
                     "MAX_NEW_TOKENS", "CUDA_VISIBLE_DEVICES", "LOG_LEVEL"):
        assert required in names
    assert all(r["meaning"] and r["default"] for r in rows)
    assert not any("|" in r["meaning"] or "|" in r["default"] for r in rows)  # renders as a Markdown table
    assert {r["name"]: r["default"] for r in rows}["SAGEMAKER_MAX_PAYLOAD_IN_MB"] == "6"


def test_no_torch_import():
    code = "import sys, serve.config, serve.protocol; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batch_mode_raises_the_default_payload_limit_only_when_unset():
    assert load_config({}).server.max_payload_bytes == 6 * 1024 * 1024
    assert load_config({"SAGEMAKER_BATCH": "True"}).server.max_payload_bytes == 100 * 1024 * 1024
    cfg = load_config({"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20"})
    assert cfg.server.max_payload_bytes == 20 * 1024 * 1024


ENV_NAMES = ("environ", "environb", "getenv", "getenvb", "putenv", "unsetenv")


def test_only_config_touches_the_process_environment():
    """serve/config.py is the one module that reads (or writes) os.environ; gunicorn_conf goes through it."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in sorted([*(root / "serve").rglob("*.py"), *(root / "model").rglob("*.py")]):
        if path == root / "serve" / "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            hit = isinstance(node, ast.Attribute) and node.attr in ENV_NAMES and \
                isinstance(node.value, ast.Name) and node.value.id == "os"
            hit = hit or (isinstance(node, ast.ImportFrom) and node.module == "os"
                          and any(a.name in ENV_NAMES for a in node.names))
            if hit:
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders


def test_context_defaults_to_the_checkpoint():
    # Unset limits: the checkpoint's context length (131,072 for micro), not a fixed 8K/16K.
    cfg = with_context(load_config({}), 131072)
    assert (cfg.engine.max_total_tokens, cfg.engine.max_input_tokens) == (131072, 131071)
    assert cfg.server.default_max_new_tokens == 256
    small = with_context(load_config({}), 100)  # the default max_new_tokens yields to a small context
    assert (small.engine.max_total_tokens, small.server.default_max_new_tokens) == (100, 99)
    set_ = with_context(load_config({"MAX_TOTAL_TOKENS": "4000", "MAX_INPUT_TOKENS": "1000"}), 131072)
    assert (set_.engine.max_total_tokens, set_.engine.max_input_tokens) == (4000, 1000)  # explicit wins
    only_input = with_context(load_config({"MAX_INPUT_TOKENS": "50000"}), 32768)
    assert (only_input.engine.max_total_tokens, only_input.engine.max_input_tokens) == (50001, 50000)
    assert load_config({"MAX_NEW_TOKENS": "20000"}).server.default_max_new_tokens == 20000  # checked later


@pytest.mark.parametrize("env,context,names", [
    ({"KV_CACHE_TOKENS": "4096"}, 131072, ("KV_CACHE_TOKENS=4096", "MAX_TOTAL_TOKENS=131072",
                                             "max_position_embeddings")),
    ({"KV_CACHE_TOKENS": "4096", "MAX_TOTAL_TOKENS": "8192"}, 131072, ("KV_CACHE_TOKENS=4096", "MAX_TOTAL_TOKENS=8192")),
    ({"MAX_NEW_TOKENS": "20000"}, 16384, ("MAX_NEW_TOKENS", "MAX_TOTAL_TOKENS")),
])
def test_context_that_cannot_work_refuses_to_start_naming_the_variables(env, context, names):
    cfg = load_config(env)
    with pytest.raises(ConfigError) as err:
        with_context(cfg, context)
    for name in names:
        assert name in str(err.value)


ENGINE_VALUES = {"MAX_CONCURRENT_SEQS": ("7", 7), "MAX_QUEUED_REQUESTS": ("9", 9), "MAX_STEP_TOKENS": ("70", 70),
                 "PREFILL_TIME_SHARE": ("0.5", 0.5), "PREFILL_CHUNK_TOKENS": ("11", 11), "KV_CACHE_TOKENS": ("4096", 4096),
                 "DTYPE": ("bfloat16", "bfloat16"), "SSM_STATE_DTYPE": ("bfloat16", "bfloat16"), "DEVICE": ("cpu", "cpu"),
                 "CUDA_GRAPHS": ("off", False), "KERNELS": ("reference", "reference"), "PREFIX_CACHE": ("no", False),
                 "SNAPSHOT_DEVICE_SHARE": ("0.5", 0.5), "SNAPSHOT_HOST_BYTES": ("123", 123),
                 "SNAPSHOT_BOUNDARY_TOKENS": ("300", 300), "SNAPSHOT_INTERVAL_TOKENS": ("0", 0),
                 "SNAPSHOT_DISK_DIR": ("/x/y", "/x/y"), "SNAPSHOT_DISK_BYTES": ("456", 456), "MAX_LORAS": ("3", 3),
                 "MAX_LORA_RANK": ("64", 64), "LORA_HOST_BYTES": ("1000", 1000)}
# the server's default differs from the engine's on purpose: the disk tier is on when serving, off for an Engine
# built in code (a library user or a test never writes under the shared /tmp folder unasked)
SERVER_DEFAULTS = {"SNAPSHOT_DISK_DIR", "SNAPSHOT_DISK_BYTES"}


def test_each_engine_variable_reaches_the_field_of_its_name():
    fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    knobs = {v.name for v in VARS if v.name.lower() in fields} - {"MAX_INPUT_TOKENS", "MAX_TOTAL_TOKENS"}
    assert knobs == ENGINE_VALUES.keys()
    for v in VARS:
        if v.name in knobs - SERVER_DEFAULTS:
            assert v.default == fields[v.name.lower()], v.name  # the default is the field's, not a copy
    engine = load_config({name: raw for name, (raw, _) in ENGINE_VALUES.items()}).engine
    assert {name: getattr(engine, name.lower()) for name in knobs} == {n: want for n, (_, want) in ENGINE_VALUES.items()}


def test_one_default_for_new_tokens():
    from model.types import SamplingParams
    from serve.config import ServerConfig
    from serve.protocol import Limits

    default = SamplingParams().max_new_tokens
    assert ServerConfig().default_max_new_tokens == Limits().default_max_new_tokens == default
    assert {r["name"]: r["default"] for r in describe()}["MAX_NEW_TOKENS"] == str(default)


def test_each_worker_has_its_own_disk_tier_folder():
    from serve.config import with_worker_dir

    cfg = load_config({"SNAPSHOT_DISK_DIR": "/data/snaps", "SNAPSHOT_DISK_BYTES": "1000"})
    assert with_worker_dir(cfg, 3).engine.snapshot_disk_dir == "/data/snaps/w3"
    assert with_worker_dir(cfg, 3).engine.snapshot_disk_bytes == 1000
    with pytest.raises(ConfigError, match="SNAPSHOT_DISK_BYTES"):
        load_config({"SNAPSHOT_DISK_BYTES": "-1"})
