"""notebooks/granite-4.0-h-micro-sagemaker.ipynb: committed without outputs, and executes top to bottom in
LOCAL mode (demo model, real server and batch CLI) with nbclient, producing every result it promises."""

import base64
import re
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.sdk_helpers import ROOT

NOTEBOOK = ROOT / "notebooks" / "granite-4.0-h-micro-sagemaker.ipynb"


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_committed_notebook_has_no_outputs_and_a_local_switch():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells(nb))
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert 'LOCAL = os.environ.get("LOCAL", "1") == "1"' in code_cells(nb)[0].source


def test_every_branch_only_uses_defined_names():
    """The AWS branches do not run here: pyflakes rules (ruff F) over all code cells catch undefined or
    misspelled names in them."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = "\n\n".join(c.source for c in code_cells(nb))
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F", "--stdin-filename",
                        "notebook.py", "-"], input=source, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notebook")
    mp = pytest.MonkeyPatch()
    mp.setenv("LOCAL", "1")
    mp.setenv("TMPDIR", str(tmp))  # the notebook's work dir (tarball, batch files) lands here
    mp.setenv("MODEL_CACHE_DIR", str(tmp / "cache"))
    for var in ("MODEL_DIR", "HF_MODEL_ID", "MODEL_ID"):
        mp.delenv(var, raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        mp.undo()
    return nb


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def cell_with(nb, needle: str):
    (cell,) = [c for c in code_cells(nb) if needle in c.source]
    return cell


def test_runs_on_this_venv_python_without_errors(executed):
    assert not [o for c in code_cells(executed) for o in c.outputs if o.output_type == "error"]
    assert f"python {sys.executable}" in text_of(code_cells(executed)[0])


def test_generate_and_chat_went_through_inference_py(executed):
    gen = text_of(cell_with(executed, "print(\"generated_text:\""))
    assert "generated_text: '" in gen
    tokens = int(re.search(r"generated_tokens: (\d+)", gen).group(1))
    assert 1 <= tokens <= 16
    assert "postprocessed by code/inference.py: True" in gen
    chat = text_of(cell_with(executed, "invoke.chat(target"))
    assert "assistant: '" in chat and "postprocessed: True" in chat
    usage = re.search(r"usage: (\{.*\})", chat).group(1)
    assert "'completion_tokens':" in usage


def test_tokens_were_streamed_as_they_came(executed):
    cell = cell_with(executed, "invoke.print_stream(target")
    m = re.search(r"streamed: (\d+) characters \(TGI events\), (\d+) chat chunks", text_of(cell))
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 1
    # printed piecewise (flushed per token), not as one block at the end
    assert sum(o.output_type == "stream" for o in cell.outputs) > 3


def test_structured_output_cell_answers_valid_json_a_tool_call_and_a_regex_match(executed):
    text = text_of(cell_with(executed, "response_format"))
    trip = re.search(r"json_schema: (\{.*\}) \| finish_reason: stop", text)
    assert trip, text
    city, days = re.fullmatch(r"\{'city': '(\w+)', 'days': (\d+)\}", trip.group(1)).groups()
    assert city in ("Paris", "Lima", "Tokyo") and 1 <= int(days) <= 14
    call = re.search(r"tool call: get_weather \{'city': '(\w+)', 'unit': '(\w+)'\} \| finish_reason: tool_calls",
                     text)
    assert call and call.group(1) in ("Paris", "Lima", "Tokyo") and call.group(2) in ("celsius", "fahrenheit"), text
    assert re.search(r"regex: '(yes|no), [0-9]{1,2}%'", text), text


def test_adapter_cell_registers_a_lora_invokes_it_three_ways_and_deletes_it(executed):
    """The peft adapter (random non-zero A and B) changes the answer; adapter_id, the SageMaker header and the
    OpenAI `model` field select the same adapter; DELETE makes it unknown (404)."""
    text = text_of(cell_with(executed, "POST /adapters"))
    assert "packaged demo-fr.tar.gz" in text and "adapter_model.safetensors" in text, text
    assert "POST /adapters: 200 Adapter demo-fr registered" in text, text
    assert "registered: ['demo-fr']" in text, text
    assert "adapter answers differ from the base: True | the three ways agree: True" in text, text
    assert "DELETE: 200 | then: 404" in text, text


def test_jsonlines_and_batch_line_counts(executed):
    assert "jsonlines: 5 records -> 5 lines, 1 error line(s)" in text_of(cell_with(executed, "invoke_jsonlines"))
    batch = text_of(cell_with(executed, "run_local_batch"))
    assert "python -m serve batch: 2 files, 6 .out lines for 6 records" in batch
    assert "/invocations (MultiRecord): 2 files, 6 .out lines for 6 records" in batch


def test_throughput_plot_and_server_stopped(executed):
    cell = cell_with(executed, "throughput_sweep")
    rows = re.findall(r"'concurrency': (\d+), 'requests': \d+, 'tokens': (\d+)", text_of(cell))
    assert [int(c) for c, _ in rows] == [1, 2, 4, 8] and all(int(t) > 0 for _, t in rows)
    (png,) = [o.data["image/png"] for o in cell.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "server stopped, exit code 0" in text_of(cell_with(executed, "server.stop()"))


def test_session_turns_keep_time_to_first_token_flat(executed):
    cell = cell_with(executed, "chat_session.open()")
    text = text_of(cell)
    assert re.search(r"session w\d+-[0-9a-f]{32}", text), text
    turns = [(int(a), int(b)) for a, b in re.findall(r"turn \d+: TTFT (\d+) ms in the session, (\d+) ms re-sent", text)]
    assert len(turns) == 5, text
    assert turns[-1][0] < turns[-1][1], turns  # the last turn re-read the whole conversation without reuse
    assert "baseline server stopped, exit code 0" in text
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in cell.outputs)
