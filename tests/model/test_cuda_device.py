"""The CUDA set-up paths against torch's real argument checks (tests/fake_cuda.py fakes only the hardware):
the device the runner resolves, bind_thread in the engine's loop thread, the decode graphs' stream and
capture, the memory queries. A fake that replaced torch.cuda.set_device itself hid a certain crash:
set_device rejects the bare "cuda" that resolve_device("auto" | "cuda") used to return."""

from __future__ import annotations

import threading

import pytest
import torch

from model.network.granite import GraniteArch
from model.runtime.decode_static import CudaGraphs
from model.runtime.runner import ModelRunner, resolve_device
from model.runtime.state import auto_kv_tokens
from tests import fake_cuda


@pytest.fixture
def cuda(monkeypatch):
    return fake_cuda.install(monkeypatch, devices=2)


def _in_thread(fn):
    """Run fn in a new thread (current CUDA device 0, as the engine's loop thread starts); re-raise its error."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_resolve_device_names_the_index(cuda):
    torch.cuda.set_device(1)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)  # the current one
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device='cuda:2' requested but this process sees 2 CUDA device"):
        resolve_device("cuda:2")


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize("name,index", [("auto", 0), ("cuda", 0), ("cuda:1", 1)])
def test_bind_thread_makes_the_runner_device_current(cuda, name, index):
    """The constructor and the engine's loop thread call bind_thread with the resolved device."""
    runner = object.__new__(ModelRunner)  # bind_thread needs only the device; the rest needs real GPUs
    runner._dev = resolve_device(name)
    runner.bind_thread()
    assert torch.cuda.current_device() == index
    torch.cuda.set_device(1 - index)
    assert _in_thread(lambda: (runner.bind_thread(), torch.cuda.current_device())[1]) == index
    runner._dev = torch.device("cpu")
    assert _in_thread(lambda: (runner.bind_thread(), torch.cuda.current_device())[1]) == 0  # CPU: left alone


@pytest.mark.parametrize("name,index", [("auto", 0), ("cuda:1", 1)])
def test_graph_capture_runs_on_the_runner_device(cuda, name, index):
    """Warm-up runs and the capture go to a side stream on the runner's device, whatever device is current
    in the capturing thread; replay and the memory report use that device too."""
    graphs = CudaGraphs(resolve_device(name))
    torch.cuda.set_device(1 - index)
    seen = []
    step = lambda: seen.append((torch.cuda.current_device(), torch.cuda.current_stream().stream_id))  # noqa: E731
    replay = graphs.capture(step)
    replay2 = graphs.capture(step)
    side = seen[0][1]
    assert side != 0 and seen == [(index, side)] * 6  # 2 warm-ups + the capture, twice: one side stream
    assert cuda.captures == [(index, side)] * 2
    replay(), replay2()
    assert cuda.replays == [(index, side)] * 2
    assert torch.cuda.current_device() == 1 - index  # the thread's device is left as it was
    assert graphs.reserved_bytes() == 1000 * (index + 1)
    assert cuda.calls[-2:] == [("synchronize", index), ("memory_stats", index)]


def test_memory_queries_name_the_device(cuda, tiny_ckpt):
    torch.cuda.set_device(1)
    dev = resolve_device("cuda")
    torch.cuda.set_device(0)  # e.g. another thread's current device: the query still names device 1
    auto_kv_tokens(GraniteArch.from_dir(tiny_ckpt), 2, 64, 64, dev, torch.bfloat16, torch.bfloat16)
    assert cuda.calls == [("mem_get_info", 1)]
