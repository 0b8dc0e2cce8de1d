"""A fake CUDA runtime under CPU torch that replaces what needs hardware and never torch's own checks.

torch's Python layer runs as published: set_device, device, current_device, Stream, Event, stream, graph,
CUDAGraph, current_stream, synchronize, memory_reserved, mem_get_info, and the `_get_device_index`
validation they share (which rejects a bare "cuda" where an index is required). Only what a CPU build lacks
is routed here: is_available / device_count / _lazy_init, the torch._C device, stream and memory calls,
cudart(), and the C++ bases of Stream, Event and CUDAGraph (dummy classes in a CPU build). The fake keeps
the CUDA semantics our code relies on: the current device is per thread (a new thread starts on 0), a new
stream belongs to the device current when it is made, making a stream current makes its device current
(THCPModule_setStream_wrap), an event records on one device only (CUDAEvent::record), a graph is captured
on a non-default stream and ends on the stream it began on (CUDAGraph::capture_begin / capture_end).
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

CUDA_TYPE = 1  # c10::DeviceType::CUDA


class FakeCuda:
    def __init__(self, devices: int) -> None:
        self.devices = devices
        self._tls = threading.local()
        self._ids = itertools.count(1)  # stream ids; 0 is each device's default stream
        self.calls: list[tuple[str, int]] = []  # device-taking runtime calls: (what, device index)
        self.captures: list[tuple[int, int]] = []  # (device, stream id) of each capture
        self.replays: list[tuple[int, int]] = []

    # ---- per-thread state, as CUDA keeps it ----------------------------------------------
    def current(self) -> int:
        return getattr(self._tls, "device", 0)

    def current_stream_id(self, device: int) -> int:
        return getattr(self._tls, "streams", {}).get(device, 0)

    def _valid(self, index) -> int:
        if type(index) is not int or not 0 <= index < self.devices:
            raise RuntimeError(f"CUDA error: invalid device ordinal ({index!r}; {self.devices} devices)")
        return index

    # ---- torch._C / torch.cuda hardware calls ----------------------------------------------
    def set_device(self, index) -> None:
        self._tls.device = self._valid(index)

    def exchange_device(self, index: int) -> int:
        if index < 0:
            return -1
        prev = self.current()
        self.set_device(index)
        return prev

    def get_current_stream(self, index) -> tuple[int, int, int]:
        return self.current_stream_id(self._valid(index)), index, CUDA_TYPE

    def set_stream(self, stream_id=0, device_index=0, device_type=0) -> None:
        if self.current() != device_index:
            self.set_device(device_index)
        if not hasattr(self._tls, "streams"):
            self._tls.streams = {}
        self._tls.streams[device_index] = stream_id

    def synchronize(self) -> None:
        self.calls.append(("synchronize", self.current()))

    def memory_stats(self, index) -> dict:
        self.calls.append(("memory_stats", self._valid(index)))
        return {"reserved_bytes": {"all": {"current": 1000 * (index + 1)}}}

    def mem_get_info(self, index) -> tuple[int, int]:
        self.calls.append(("mem_get_info", self._valid(index)))
        return 20 << 30, 24 << 30

    # ---- the C++ classes ---------------------------------------------------------------------
    def stream_base(self) -> type:
        fake = self

        class StreamBase:  # THCPStream: a new stream comes from the current device's pool
            def __new__(cls, priority=0, stream_id=0, device_index=None, device_type=0, stream_ptr=0):
                s = object.__new__(cls)
                if device_index is None:
                    device_index, stream_id = fake.current(), next(fake._ids)
                s.stream_id, s.device_index, s.device_type = stream_id, fake._valid(device_index), CUDA_TYPE
                return s

            def __init__(self, *args, **kwargs) -> None:
                pass

            @property
            def device(self) -> torch.device:
                return torch.device("cuda", self.device_index)

            @property
            def cuda_stream(self) -> int:
                return self.device_index << 32 | self.stream_id

            def __eq__(self, other) -> bool:
                return (self.device_index, self.stream_id) == (other.device_index, other.stream_id)

        return StreamBase

    def event_base(self) -> type:
        class EventBase:  # CUDAEvent: created on the first recording stream's device, then bound to it
            def __new__(cls, **kwargs):
                e = object.__new__(cls)
                e.device_index = None
                return e

            def __init__(self, *args, **kwargs) -> None:
                pass

            def record(self, stream) -> None:
                if self.device_index is None:
                    self.device_index = stream.device_index
                if stream.device_index != self.device_index:
                    raise RuntimeError(f"Event device {self.device_index} does not match recording stream's device "
                                       f"{stream.device_index}.")

            def wait(self, stream) -> None:
                pass

            def synchronize(self) -> None:
                pass

        return EventBase

    def graph_base(self) -> type:
        fake = self

        class GraphBase:  # CUDAGraph: captures on the current stream of the current device
            def __new__(cls, keep_graph=False):
                g = object.__new__(cls)
                g.stream = None
                return g

            def __init__(self, *args, **kwargs) -> None:
                pass

            def _here(self) -> tuple[int, int]:
                return fake.current(), fake.current_stream_id(fake.current())

            def capture_begin(self, pool=None, capture_error_mode="global") -> None:
                if self._here()[1] == 0:
                    raise RuntimeError("CUDA graphs must be captured on a non-default stream.")
                self.stream = self._here()
                fake.captures.append(self.stream)

            def capture_end(self) -> None:
                if self._here() != self.stream:
                    raise RuntimeError("Capture must end on the same stream it began on.")

            def replay(self) -> None:
                fake.replays.append(self.stream)

        return GraphBase


def install(monkeypatch, devices: int = 2) -> FakeCuda:
    """Route torch.cuda's hardware calls to a FakeCuda of `devices` GPUs for this test (monkeypatch undoes it)."""
    if torch.backends.cuda.is_built():  # real C++ classes, immutable: tests/gpu runs the real thing there
        pytest.skip("fake CUDA runtime: CPU builds of torch only")
    fake = FakeCuda(devices)
    cuda = torch.cuda
    for mod, name, value in [
        (cuda, "is_available", lambda: True),
        (cuda, "device_count", lambda: fake.devices),
        (cuda, "_lazy_init", lambda: None),
        (cuda, "is_initialized", lambda: True),
        (cuda.memory, "is_initialized", lambda: True),  # imported by name there
        (torch.backends.cuda, "is_built", lambda: True),
        (cuda, "_exchange_device", fake.exchange_device),
        (cuda, "_maybe_exchange_device", fake.exchange_device),
        (cuda, "cudart", lambda: type("cudart", (), {"cudaMemGetInfo": staticmethod(fake.mem_get_info)})),
        (torch._C, "_cuda_getDevice", fake.current),
        (torch._C, "_cuda_setDevice", fake.set_device),
        (torch._C, "_cuda_getCurrentStream", fake.get_current_stream),
        (torch._C, "_cuda_setStream", fake.set_stream),
        (torch._C, "_cuda_synchronize", fake.synchronize),
        (torch._C, "_cuda_memoryStats", fake.memory_stats),
        (torch._C, "_cuda_emptyCache", lambda: None),
        (torch._C, "_host_emptyCache", lambda: None),
        (cuda.graphs, "_graph_pool_handle", lambda: (0, next(fake._ids))),
        (cuda.graph, "default_capture_stream", None),  # a class-level cache: leave no fake stream in it
    ]:
        monkeypatch.setattr(mod, name, value, raising=False)
    # A CPU build's C++ bases are dummy Python classes that raise when instantiated: give them the fake's
    # members (torch's own subclasses, whose Python methods run unchanged, stay as they are).
    for cls, base in ((cuda.Stream, fake.stream_base()), (cuda.Event, fake.event_base()),
                      (cuda.CUDAGraph, fake.graph_base())):
        (dummy,) = cls.__bases__
        for name, member in vars(base).items():
            if name not in ("__dict__", "__weakref__", "__module__", "__qualname__", "__doc__"):
                monkeypatch.setattr(dummy, name, member, raising=False)
    return fake
