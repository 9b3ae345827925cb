"""The worker's GPU side of in-step loads: the current stream waits on the progress page's counters.

`cuStreamWaitValue32` queues, on the caller's current stream, a wait until a 32-bit word in memory reaches a value
(default condition: cyclic greater-or-equal, `(int32)(*addr - value) >= 0`, the same compare as
kvd_client.progress.reached). The daemon's load stream stores each layer's counter with `cuStreamWriteValue32` right
after that layer's scatter (by default the store waits for the writes before it to be visible), so work queued after
the wait, the layer's attention, runs after the layer's bytes are in place. No host wait, no stream switch, nothing
created or set: the current stream only gets one more wait in its queue.

The page is host memory both processes map; each registers it with its own context (`cuMemHostRegister`) and uses
the device address `cuMemHostGetDevicePointer` gives. If the daemon dies, the worker stores the final counters from
the CPU (ProgressPage.release), which satisfies every queued wait: the stream never hangs on a dead daemon.

Synchronization through memory is invisible to CUDA's own dependency tracking, which is safe here because the two
streams belong to different processes (different contexts): neither can be serialized behind the other's queue.
"""

from __future__ import annotations

import ctypes
from typing import Any

from kvd_client.progress import ProgressPage, StepLoad, counter_word, page_bytes

HOST_REGISTER_PORTABLE = 0x1
HOST_REGISTER_DEVICEMAP = 0x2
STREAM_WAIT_VALUE_GEQ = 0x0


class StreamProgress:
    """The progress page registered with this process's CUDA context (call with the worker's device current)."""

    def __init__(self, page: ProgressPage, current_stream: Any) -> None:
        """`current_stream()` returns the caller's current raw stream (read, never changed)."""
        lib = ctypes.PyDLL("libcuda.so.1")  # keep the GIL: the model thread calls wait() once per layer
        self._register = getattr(lib, "cuMemHostRegister_v2", None) or lib.cuMemHostRegister
        self._register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self._unregister = lib.cuMemHostUnregister
        self._unregister.argtypes = [ctypes.c_void_p]
        device_pointer = getattr(lib, "cuMemHostGetDevicePointer_v2", None) or lib.cuMemHostGetDevicePointer
        device_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        self._wait = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
        self._wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self._current = current_stream
        self._pin = page.pin()  # the address stays the page's until close(), even past page.close()
        self._host = page.address
        self._size = page_bytes(page.slots)
        _check(self._register(self._host, self._size, HOST_REGISTER_PORTABLE | HOST_REGISTER_DEVICEMAP), "register")
        pointer = ctypes.c_uint64()
        status = device_pointer(ctypes.byref(pointer), ctypes.c_void_p(self._host), 0)
        if status != 0:
            self._unregister(self._host)
            _check(status, "cuMemHostGetDevicePointer")
        self._device = pointer.value

    def wait(self, load: StepLoad, layer: int) -> None:
        """Queue, on the current stream, a wait for layer `layer` of `load`."""
        address = self._device + 4 * counter_word(load.slot)
        _check(self._wait(self._current(), address, load.target(layer), STREAM_WAIT_VALUE_GEQ), "cuStreamWaitValue32")

    def close(self) -> None:
        if self._host:
            self._unregister(self._host)
            self._host = 0
            self._pin = None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed: CUresult {status}")
