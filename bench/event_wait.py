"""How fast a thread learns that GPU work finished, by the ways kvd's completion waiters could wait.

    python bench/event_wait.py > result.json

Each rep queues a 32 MiB device-to-host copy (a 16-block request) and an event after it, then waits for the event:
`blocking` sleeps in cuEventSynchronize on a blocking-sync event (transports.cuda_completion_wait = "block"),
`spin` spins in it on a plain event ("spin"), `poll` calls cuEventQuery with 20 µs naps ("poll", kvd's default).
Reports the median time from queueing to waking, less the copy's own GPU time: the notice's latency. Needs a CUDA
GPU.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time

import torch

MiB = 1 << 20
BLOCKING_SYNC, DISABLE_TIMING = 0x1, 0x2


def main() -> int:
    torch.cuda.init()
    lib = ctypes.CDLL("libcuda.so.1")  # releases the GIL around each call, as the waiters do
    for fn, args in (
        (lib.cuEventCreate, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]),
        (lib.cuEventRecord, [ctypes.c_void_p, ctypes.c_void_p]),
        (lib.cuEventSynchronize, [ctypes.c_void_p]),
        (lib.cuEventQuery, [ctypes.c_void_p]),
    ):
        fn.argtypes = args
    dev = torch.empty(32 * MiB, dtype=torch.uint8, device="cuda")
    host = torch.empty(32 * MiB, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu_ms = []
    for _ in range(50):
        start.record()
        host.copy_(dev, non_blocking=True)
        end.record()
        end.synchronize()
        gpu_ms.append(start.elapsed_time(end))
    copy_us = statistics.median(gpu_ms) * 1e3

    def make(flags: int) -> ctypes.c_void_p:
        event = ctypes.c_void_p()
        if lib.cuEventCreate(ctypes.byref(event), flags) != 0:
            raise SystemExit("cuEventCreate failed")
        return event

    def sync_wait(event: ctypes.c_void_p) -> None:
        lib.cuEventSynchronize(event)

    def poll_wait(event: ctypes.c_void_p) -> None:
        while lib.cuEventQuery(event) != 0:
            time.sleep(0.00002)

    out: dict[str, float] = {"copy_us": round(copy_us, 1)}
    for name, flags, wait in (
        ("blocking", DISABLE_TIMING | BLOCKING_SYNC, sync_wait),
        ("spin", DISABLE_TIMING, sync_wait),
        ("poll", DISABLE_TIMING, poll_wait),
    ):
        event = make(flags)
        took = []
        for _ in range(100):
            torch.cuda.synchronize()
            t = time.perf_counter()
            host.copy_(dev, non_blocking=True)
            lib.cuEventRecord(event, ctypes.c_void_p(stream.cuda_stream))
            wait(event)
            took.append((time.perf_counter() - t) * 1e6)
        out[f"{name}_wake_us_p50"] = round(statistics.median(took) - copy_us, 1)
        out[f"{name}_wake_us_p90"] = round(sorted(took)[90] - copy_us, 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
