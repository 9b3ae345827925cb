"""Reading the GPU engine's chunk trace (transports.cuda_trace_path, kvd/transports/cuda/trace.py): per direction, how
busy its copy stream was, how fast each chunk's DMA ran alone and while the other direction was copying too, how
long the gather/scatter kernels took, and what every gap in the DMA stream waited for.

A gap before a chunk's DMA is put down to the latest of the things it waited for (within TOLERANCE_NS):
- save (gather kernel -> D2H): `kernel` if its gather ended after the previous DMA and the gather stream was busy
  with the previous gather; `staging` if the gather waited for its staging buffer (freed by the DMA `depth` chunks
  back); `host` if neither (the engine had not queued the work yet, or the worker's ready event held it);
  `dma` if the gather was done before the previous DMA ended (the copy engine itself started late).
- load (H2D -> scatter kernel): `staging` if the DMA started as its buffer was freed by the scatter `depth` chunks
  back; `host` otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phases import dist_us, percentile

TOLERANCE_NS = 20_000


class TraceFile:
    """The trace a daemon appends to; `records(start, end)` reads what was added, keeps the operations received
    in [start, end]."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header: dict[str, Any] = {}
        self._offset = 0

    def records(self, start_ns: int, end_ns: int) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            text = f.read()
        complete = text[: text.rfind(b"\n") + 1]  # a line still being written is read next time
        self._offset += len(complete)
        out = []
        for line in complete.decode().splitlines():
            record = json.loads(line)
            if "trace" in record:
                self.header = record
            elif start_ns <= record.get("stages", {}).get("received_ns", start_ns) <= end_ns:
                out.append(record)
        return out


def union_ns(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlap_ns(interval: tuple[int, int], others: list[tuple[int, int]]) -> int:
    return sum(max(0, min(interval[1], e) - max(interval[0], s)) for s, e in others)


def _chunks(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    chunks = [c for r in records if r["kind"] == kind for c in r["chunks"]]
    return sorted(chunks, key=lambda c: c["dma"][0])


def _gap_cause(kind: str, chunks: list[dict[str, Any]], i: int, depth: int) -> str:
    chunk, previous = chunks[i], chunks[i - 1]
    freed_by = chunks[i - depth] if i >= depth else None
    if kind == "load":
        if freed_by is not None and abs(chunk["dma"][0] - freed_by["kernel"][1]) <= TOLERANCE_NS:
            return "staging"
        return "host"
    if chunk["kernel"][1] <= previous["dma"][1] + TOLERANCE_NS:
        return "dma"
    kernel_start = chunk["kernel"][0]
    if freed_by is not None and abs(kernel_start - freed_by["dma"][1]) <= TOLERANCE_NS:
        return "staging"
    if abs(kernel_start - previous["kernel"][1]) <= TOLERANCE_NS:
        return "kernel"
    return "host"


def direction(
    kind: str, records: list[dict[str, Any]], other: list[tuple[int, int]], block_bytes: int, depth: int
) -> dict[str, Any]:
    """One direction's DMA stream over a phase; `other`: the other direction's DMA busy intervals."""
    chunks = _chunks(records, kind)
    if not chunks:
        return {}
    dma = [(c["dma"][0], c["dma"][1]) for c in chunks]
    busy = union_ns(dma)
    busy_ns = sum(e - s for s, e in busy)
    span_ns = busy[-1][1] - busy[0][0]
    moved = sum(c["blocks"] for c in chunks) * block_bytes
    rates: dict[str, list[float]] = {"alone": [], "with_other": []}
    for c, interval in zip(chunks, dma, strict=True):
        took = max(1, interval[1] - interval[0])
        shared = overlap_ns(interval, other) > took // 2
        rates["with_other" if shared else "alone"].append(c["blocks"] * block_bytes / took)
    gaps: dict[str, float] = {}
    for i in range(1, len(chunks)):
        gap = chunks[i]["dma"][0] - chunks[i - 1]["dma"][1]
        if gap > TOLERANCE_NS // 4:
            cause = _gap_cause(kind, chunks, i, depth)
            gaps[cause] = gaps.get(cause, 0.0) + gap / 1e6
    kernels = [c["kernel"][1] - c["kernel"][0] for c in chunks]
    return {
        "chunks": len(chunks),
        "gbps_while_busy": round(moved / max(1, busy_ns), 2),
        "busy_ms": round(busy_ns / 1e6, 3),
        "span_ms": round(span_ns / 1e6, 3),
        "busy_fraction": round(busy_ns / max(1, span_ns), 3),
        "chunk_gbps_p50": {k: round(percentile(v, 0.5), 2) if v else None for k, v in rates.items()},
        "chunks_with_other": len(rates["with_other"]),
        "dma_chunk_us": dist_us([e - s for s, e in dma]),
        "kernel_us": dist_us(kernels),
        "kernel_to_dma": round(sum(kernels) / max(1, busy_ns), 3),
        "dma_runs_per_chunk": round(sum(c["runs"] for c in chunks) / len(chunks), 2),
        "dma_runs_max": max(c["runs"] for c in chunks),
        "gap_ms_by_cause": {k: round(v, 3) for k, v in sorted(gaps.items())},
    }


def summarize(records: list[dict[str, Any]], header: dict[str, Any], block_bytes: int) -> dict[str, Any]:
    """A phase's trace: each direction, their overlap, and each operation's engine time."""
    if not records:
        return {}
    depth = int(header.get("buffers_per_direction", 4))
    busy = {k: union_ns([(c["dma"][0], c["dma"][1]) for c in _chunks(records, k)]) for k in ("save", "load")}
    out: dict[str, Any] = {
        kind: direction(kind, records, busy["load" if kind == "save" else "save"], block_bytes, depth)
        for kind in ("save", "load")
    }
    both = sum(overlap_ns(interval, busy["load"]) for interval in busy["save"])
    out["both_busy_ms"] = round(both / 1e6, 3)
    out["ops"] = [_op(r) for r in sorted(records, key=lambda r: r.get("stages", {}).get("received_ns", 0))]
    return out


def _op(record: dict[str, Any]) -> dict[str, Any]:
    """One operation, µs: its enqueue on the engine thread, and from the end of that to its first DMA on the GPU
    and from its last DMA to the waiter seeing it done."""
    stages = record.get("stages", {})
    if not record["chunks"]:
        return {"kind": record["kind"], "chunks": 0}
    first_dma = min(c["dma"][0] for c in record["chunks"])
    last = max(max(c["dma"][1], c["kernel"][1]) for c in record["chunks"])
    start, end, done = (stages.get(k, 0) for k in ("enqueue_start_ns", "enqueue_end_ns", "copy_done_ns"))
    return {
        "kind": record["kind"],
        "chunks": len(record["chunks"]),
        "enqueue_us": round((end - start) / 1e3, 1) if start and end else None,
        "enqueue_to_first_dma_us": round((first_dma - end) / 1e3, 1) if end else None,
        "gpu_us": round((last - first_dma) / 1e3, 1),
        "gpu_end_to_waiter_us": round((done - last) / 1e3, 1) if done else None,
    }
