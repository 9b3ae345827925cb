"""The GPU engine's chunk trace, a diagnostic (transports.cuda_trace_path; off by default): timing events around every
chunk's kernel and DMA, written as one JSON line per operation once it completed, so that a benchmark can tell each
stream's busy time, the gaps between chunks and what they waited for (a staging buffer, the other stream, the
thread that queues them) apart. When on, each chunk costs four more event records.

GPU times are put on the host's CLOCK_MONOTONIC (time.monotonic_ns, the clock of the operations' stage stamps) by an
anchor: an event recorded on an idle stream of the tracer's own, between two host clock reads. A new anchor is taken
when the last is older than ANCHOR_PERIOD_S, so neither clock drift nor cuEventElapsedTime's float milliseconds
blur a chunk's times by more than a microsecond or so. (Elapsed times come from the runtime's cudaEventElapsedTime,
through CuPy, as every other call here that is not on the enqueue path.)

Threads: `begin` and the marks run in the copy jobs (DeviceEngine.call or submit); `finish` on a completion waiter
(two of them write the file, under a lock). Events taken by the copy jobs are given back by the waiters (deque
append/pop are atomic).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from kvd.transports.cuda.driver import STREAM_NON_BLOCKING, Enqueue
from kvd.types import DaemonStages

ANCHOR_PERIOD_S = 0.5
TIMING_EVENT = 0  # cudaEventDefault: timestamps on, no blocking sync


class ChunkTrace(Protocol):
    def mark(self, stream: int) -> None: ...

    def chunk(self, blocks: int, runs: int) -> None: ...


class _NoTrace:
    """Tracing off: every mark is a no-op."""

    def mark(self, stream: int) -> None:
        pass

    def chunk(self, blocks: int, runs: int) -> None:
        pass


NO_TRACE: ChunkTrace = _NoTrace()


def traced(trace: ChunkTrace) -> OpTrace | None:
    """What a job's Pending carries for its waiter to finish: the operation's trace, or None when tracing is off."""
    return trace if isinstance(trace, OpTrace) else None


class OpTrace:
    """One operation's marks, in the order its job queued them: per chunk, a save marks kernel start, kernel end,
    DMA start, DMA end; a load marks DMA start, DMA end, kernel start, kernel end."""

    __slots__ = ("_tracer", "anchor", "chunks", "events", "kind")

    def __init__(self, tracer: Tracer, kind: str, anchor: tuple[int, int]) -> None:
        self._tracer = tracer
        self.kind = kind
        self.anchor = anchor  # (event, its time on the host clock)
        self.events: list[int] = []
        self.chunks: list[tuple[int, int]] = []  # (blocks, host DMA runs) per chunk

    def mark(self, stream: int) -> None:
        event = self._tracer.take()
        self._tracer.gpu.record(event, stream)
        self.events.append(event)

    def chunk(self, blocks: int, runs: int) -> None:
        self.chunks.append((blocks, runs))


class Tracer:
    def __init__(self, path: Path, runtime: Any, gpu: Enqueue, header: dict[str, Any]) -> None:
        self._runtime = runtime
        self.gpu = gpu
        self._spare: deque[int] = deque()
        self._anchors: list[int] = []  # kept until close: operations in flight may still refer to any of them
        self._anchor: tuple[int, int] = (0, 0)
        self._anchored_at = 0.0
        self._stream = runtime.streamCreateWithFlags(STREAM_NON_BLOCKING)  # idle but for anchors
        self._lock = threading.Lock()
        self._file = path.open("a", buffering=1)  # line-buffered: a record is out as soon as it is written
        self._write({"trace": "kvd-cuda", **header})

    def take(self) -> int:
        try:
            return self._spare.pop()
        except IndexError:
            return int(self._runtime.eventCreateWithFlags(TIMING_EVENT))

    def begin(self, kind: str) -> OpTrace:
        """Engine thread, at the start of a job."""
        if time.monotonic() - self._anchored_at > ANCHOR_PERIOD_S:
            event = self.take()
            before = time.monotonic_ns()
            self.gpu.record(event, self._stream)
            self._runtime.eventSynchronize(event)
            after = time.monotonic_ns()
            self._anchors.append(event)
            self._anchor = (event, (before + after) // 2)
            self._anchored_at = time.monotonic()
        return OpTrace(self, kind, self._anchor)

    def finish(self, op: OpTrace, stamps: DaemonStages | None) -> None:
        """A completion waiter, once the operation's last event completed (so every mark has)."""
        anchor_event, anchor_ns = op.anchor
        elapsed = self._runtime.eventElapsedTime  # float ms
        marks = [anchor_ns + round(elapsed(anchor_event, event) * 1e6) for event in op.events]
        self._spare.extend(op.events)
        kernel, dma = ((0, 2), (2, 0))[op.kind == "load"]
        chunks = [
            {"kernel": marks[i + kernel : i + kernel + 2], "dma": marks[i + dma : i + dma + 2], "blocks": n, "runs": r}
            for i, (n, r) in zip(range(0, len(marks), 4), op.chunks, strict=True)
        ]
        record: dict[str, Any] = {"kind": op.kind, "chunks": chunks}
        if stamps is not None:
            record["stages"] = {
                "received_ns": stamps.received_ns,
                "enqueue_start_ns": stamps.enqueue_start_ns,
                "enqueue_end_ns": stamps.enqueue_end_ns,
                "copy_done_ns": stamps.copy_done_ns,
            }
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        """Engine thread, once every waiter has stopped."""
        for event in (*self._spare, *self._anchors):
            self._runtime.eventDestroy(event)
        self._spare.clear()
        self._anchors.clear()
        self._runtime.streamDestroy(self._stream)
        self._file.close()
