"""The GPU engine's save and load jobs, run on CPU against a recording stand-in for the CUDA runtime and driver:
what they enqueue on which stream, in what order (the ordering rules of docs/design.md), chunk by chunk. The real
thing runs in tests/kvd/test_cuda_ipc.py on a GPU."""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kvd_client.layout import DType, KvLayout, LayerLayout

from kvd.config import TransportsConfig
from kvd.memory.region import PinnedRegion
from kvd.process import PeerProcess
from kvd.transports.cuda import device as device_module
from kvd.transports.cuda.transport import CudaTransport
from kvd.types import CudaAllocation, CudaLayer, CudaMemory, DaemonStages, PassedFds, PeerIdentity, VmmChunk

MiB = 1 << 20
LAYERS = tuple(LayerLayout(f"l{i}", (2, 64, 16, 8, 128), DType.BFLOAT16, 1) for i in range(3))
LAYOUT = KvLayout(layers=LAYERS, block_size_tokens=16)  # 3 layers x K, V x 32 KiB: 192 KiB blocks
CHUNK_BLOCKS = MiB // LAYOUT.block_bytes  # 5 blocks per 1 MiB chunk
WORKER_EVENT = b"\x09" * 64
RUNTIME_CALLS = [
    *("getDeviceCount", "setDevice", "deviceSynchronize", "malloc", "free", "hostAlloc", "freeHost"),
    *("streamCreateWithFlags", "streamSynchronize", "streamDestroy", "hostRegister", "hostUnregister"),
    *("eventCreateWithFlags", "eventDestroy", "eventSynchronize", "ipcGetEventHandle", "ipcOpenEventHandle"),
    *("ipcOpenMemHandle", "ipcCloseMemHandle", "eventElapsedTime"),
]


class Recorder:
    """The CUDA runtime (cupy.cuda.runtime), the driver bindings and cupy.asarray, all writing one call log."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.pending: set[int] = set()  # events a query finds not reached yet (every other one is complete)
        self._handles = itertools.count(0x1000, 0x10)
        self._buffers: list[Any] = []

    def runtime_call(self, name: str, *args: Any) -> Any:
        self.calls.append((name, args))
        if name == "getDeviceCount":
            return 1
        if name == "hostAlloc":  # the index ring is written through this address: give it real memory
            buffer = ctypes.create_string_buffer(args[0])
            self._buffers.append(buffer)
            return ctypes.addressof(buffer)
        if name == "ipcGetEventHandle":
            return args[0].to_bytes(8, "little") * 8
        return next(self._handles)

    def named(self, *names: str) -> list[tuple[str, tuple[Any, ...]]]:
        return [call for call in self.calls if call[0] in names]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder()
    runtime = types.SimpleNamespace()
    for name in RUNTIME_CALLS:
        setattr(runtime, name, lambda *args, _name=name: rec.runtime_call(_name, *args))

    class Array:
        def __init__(self, values: list[int]) -> None:
            self.data = types.SimpleNamespace(ptr=next(rec._handles))

    class Module:
        def __init__(self, code: str, options: tuple[str, ...]) -> None:
            pass

        def get_function(self, name: str) -> Any:
            return types.SimpleNamespace(ptr={"kvd_gather": 0xA, "kvd_scatter": 0xB}[name])

    cuda = types.ModuleType("cupy.cuda")
    cuda.runtime = runtime  # type: ignore[attr-defined]
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda  # type: ignore[attr-defined]
    cupy.RawModule = Module  # type: ignore[attr-defined]
    cupy.uint64 = "uint64"  # type: ignore[attr-defined]
    cupy.asarray = lambda values, dtype=None: Array(values)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)

    class Enqueue:
        def __getattr__(self, name: str) -> Any:
            def call(*args: Any) -> int:
                rec.calls.append((f"gpu.{name}", tuple(getattr(a, "value", a) for a in args)))
                return 600 if name == "query" and args[0] in rec.pending else 0  # CUDA_ERROR_NOT_READY, or done

            return call

    class Driver:
        def address_range(self, pointer: int) -> tuple[int, int]:
            return pointer, 1 << 40

        def device_pointer(self, host: int) -> int:
            return host

        def event_synchronize(self, event: int) -> int:
            return 0

        def uuid(self, ordinal: int) -> str:
            return "ab" * 16

    monkeypatch.setattr(device_module, "Enqueue", Enqueue)
    monkeypatch.setattr(device_module, "Driver", Driver)
    yield rec


def memory() -> CudaMemory:
    size = LAYERS[0].nbytes
    allocations = (CudaAllocation(b"\x01" * 64, 2 * size), CudaAllocation(b"\x02" * 64, 2 * size))
    return CudaMemory("GPU-" + "ab" * 16, allocations, tuple(CudaLayer(i % 2, (i // 2) * size, size) for i in range(3)))


async def attached(recorder: Recorder, **config: Any) -> tuple[Any, Any]:
    from kvd.transports.cuda.transport import CudaTransport

    transport = CudaTransport(
        TransportsConfig(cuda_chunk_bytes=MiB, cuda_staging_bytes=8 * MiB, **config),
        PinnedRegion(0x7000_0000, 64 * MiB),
    )
    await transport.start()
    attachment = await transport.attach(memory(), LAYOUT, PeerIdentity(PeerProcess(1, 0, 0, None, None), "uid:0"))
    return transport, attachment


def slots(positions: list[int]) -> list[int]:
    """The addresses of these slots of the pinned pool."""
    return [0x7000_0000 + p * LAYOUT.block_bytes for p in positions]


def enqueued(recorder: Recorder, start: int) -> list[tuple[str, tuple[Any, ...]]]:
    """The copy jobs' calls since `start` (the completion waiters' event queries and each job's setDevice left out)."""
    return [call for call in recorder.calls[start:] if call[0] not in ("gpu.query", "setDevice")]


async def test_a_save_waits_for_the_worker_then_gathers_and_copies_chunk_by_chunk(recorder: Recorder) -> None:
    transport, attachment = await attached(recorder, cuda_queue_on_loop=True)
    engine = next(iter(transport._engines.values()))
    start = len(recorder.calls)
    # 12 blocks: chunks of 5, 5, 2. Host slots: 0-4 consecutive, then 9 | 11 12 | 20 | 30, then 31 32.
    await attachment.save(list(range(12)), slots([0, 1, 2, 3, 4, 9, 11, 12, 20, 30, 31, 32]), WORKER_EVENT)
    # The job runs in this (the caller's) thread, which sets the device before its first CUDA call.
    assert next(name for name, _ in recorder.calls[start:] if name != "gpu.query") == "setDevice"
    calls = enqueued(recorder, start)
    assert calls[0] == ("ipcOpenEventHandle", (WORKER_EVENT,))
    assert calls[1][0] == "gpu.wait" and calls[1][1][0] == engine.save_stream  # before anything reads the blocks
    launches = [args for name, args in calls if name == "gpu.launch"]
    assert [(args[0], args[1], args[3]) for args in launches] == [
        (0xA, (6, 5), engine.save_stream),  # gather: 6 segments (3 layers x K, V) x 5 blocks
        (0xA, (6, 5), engine.save_stream),
        (0xA, (6, 2), engine.save_stream),
    ]
    assert [args[-2:] for args in launches] == [(6, 5), (6, 5), (6, 2)]  # the kernel's own bounds: nseg, nblocks
    copies = [args for name, args in calls if name == "gpu.d2h"]
    block = LAYOUT.block_bytes
    assert [args[2] // block for args in copies] == [5, 1, 2, 1, 1, 2]  # one DMA per run of consecutive slots
    assert {args[3] for args in copies} == {engine.d2h_stream}
    assert calls[-1][0] == "gpu.record" and calls[-1][1][1] == engine.d2h_stream  # the completion event
    await attachment.close()
    await transport.stop()


async def test_the_engine_thread_queues_the_same_work_when_told_to(recorder: Recorder) -> None:
    """transports.cuda_queue_on_loop: the event loop queues exactly what the engine thread would have, call for
    call, after setting its device; without it the loop's thread makes no CUDA call for them."""
    sequences = []
    for on_loop in (True, False):
        transport, attachment = await attached(recorder, cuda_queue_on_loop=on_loop)
        start = len(recorder.calls)
        await attachment.save(list(range(12)), slots([0, 1, 2, 3, 4, 9, 11, 12, 20, 30, 31, 32]), WORKER_EVENT)
        await attachment.load([7, 3, 5, 1, 0, 2, 4], slots(list(range(7))), WORKER_EVENT)
        sequences.append([name for name, _ in enqueued(recorder, start)])
        assert ("setDevice" in [name for name, _ in recorder.calls[start:]]) is on_loop
        await attachment.close()
        await transport.stop()
    assert sequences[0] == sequences[1] and "gpu.launch" in sequences[0]


async def test_a_load_copies_in_then_waits_for_the_worker_once_before_scattering(recorder: Recorder) -> None:
    transport, attachment = await attached(recorder)
    engine = next(iter(transport._engines.values()))
    start = len(recorder.calls)
    handle = await attachment.load([7, 3, 5, 1, 0, 2, 4], slots(list(range(7))), WORKER_EVENT)
    calls = enqueued(recorder, start)
    worker = next(v for n, v in recorder.calls if n == "ipcOpenEventHandle")
    assert worker == (WORKER_EVENT,)
    waits_on_load = [args for name, args in calls if name == "gpu.wait" and args[0] == engine.load_stream]
    scatters = [i for i, (name, args) in enumerate(calls) if name == "gpu.launch"]
    assert len(scatters) == 2 and all(calls[i][1][0] == 0xB and calls[i][1][3] == engine.load_stream for i in scatters)
    # Per chunk the load stream waits for the chunk's H2D; before the first scatter, once, for the worker too.
    assert len(waits_on_load) == 3
    first_scatter = scatters[0]
    worker_waits = [
        i
        for i, (name, args) in enumerate(calls[:first_scatter])
        if name == "gpu.wait" and args[0] == engine.load_stream
    ]
    assert len(worker_waits) == 2
    h2d = [args for name, args in calls if name == "gpu.h2d"]
    assert {args[3] for args in h2d} == {engine.h2d_stream} and sum(a[2] for a in h2d) == 7 * LAYOUT.block_bytes
    assert len(handle) == 64 and calls[-1][0] == "gpu.record" and calls[-1][1][1] == engine.load_stream
    await attachment.close()
    await transport.stop()


def staging_in_flight(recorder: Recorder, transport: Any) -> None:
    """Every staging buffer's `free` event not reached: each chunk queued now runs beside another one's DMA."""
    engine = next(iter(transport._engines.values()))
    recorder.pending.update(buffer.free for ring in (engine._save_ring, engine._load_ring) for buffer in ring.buffers)


async def test_a_cap_on_ctas_shrinks_each_launch_grid_not_its_bounds(recorder: Recorder) -> None:
    """transports.cuda_kernel_ctas = 4, with earlier chunks in flight in both directions: every gather and scatter
    launch has at most 4 CTAs (here 4 x 1) and strides over its chunk's 6 segments x 5 blocks (the bounds it is
    passed)."""
    transport, attachment = await attached(recorder, cuda_kernel_ctas=4)
    staging_in_flight(recorder, transport)
    start = len(recorder.calls)
    await attachment.save(list(range(12)), slots(list(range(12))), WORKER_EVENT)
    await attachment.load(list(range(5)), slots(list(range(5))), WORKER_EVENT)
    launches = [args for name, args in enqueued(recorder, start) if name == "gpu.launch"]
    assert [(args[0], args[1], args[-2:]) for args in launches] == [
        (0xA, (4, 1), (6, 5)),
        (0xA, (4, 1), (6, 5)),
        (0xA, (4, 1), (6, 2)),
        (0xB, (4, 1), (6, 5)),
    ]
    await attachment.close()
    await transport.stop()


async def test_the_cap_leaves_a_kernel_alone_with_no_dma_beside_it_every_sm(recorder: Recorder) -> None:
    """The cap is for kernels that share device memory with DMA of their direction. Nothing else in flight: a
    save's gathers each run before their chunk's D2H (the recorder's events are all reached, so no earlier chunk is
    in flight when the next is queued) and go uncapped; a load's scatters run beside the H2D of the job's next chunk,
    so all but its last one are capped. With earlier chunks in flight, the first ones are capped too."""
    transport, attachment = await attached(recorder, cuda_kernel_ctas=4)
    start = len(recorder.calls)
    await attachment.save(list(range(12)), slots(list(range(12))), WORKER_EVENT)
    await attachment.load(list(range(12)), slots(list(range(12))), WORKER_EVENT)
    staging_in_flight(recorder, transport)
    await attachment.save([0], slots([20]), WORKER_EVENT)
    await attachment.load([1], slots([20]), WORKER_EVENT)
    launches = [(args[0], args[1]) for name, args in enqueued(recorder, start) if name == "gpu.launch"]
    assert launches == [
        *((0xA, (6, 5)), (0xA, (6, 5)), (0xA, (6, 2))),  # the save alone: every chunk's gather uncapped
        *((0xB, (4, 1)), (0xB, (4, 1)), (0xB, (6, 2))),  # the load: capped but for the last chunk
        *((0xA, (4, 1)), (0xB, (4, 1))),  # behind chunks in flight
    ]
    await attachment.close()
    await transport.stop()


async def test_closing_the_attachment_drops_its_mappings_and_stopping_unpins_the_pool(recorder: Recorder) -> None:
    transport, attachment = await attached(recorder)
    assert [args[1:] for _, args in recorder.named("hostRegister")] == [(64 * MiB, 1)]
    await attachment.save([0], slots([0]), WORKER_EVENT)
    await attachment.close()
    assert len(recorder.named("ipcCloseMemHandle")) == 2 and len(recorder.named("ipcOpenMemHandle")) == 2
    await transport.stop()
    assert recorder.named("hostUnregister") == [("hostUnregister", (0x7000_0000,))]


async def test_each_stage_is_stamped_and_the_trace_has_a_line_per_operation(recorder: Recorder, tmp_path: Path) -> None:
    """The engine stamps an operation's enqueue and its waiter the copy's end; with transports.cuda_trace_path set,
    four timing events bracket each chunk's kernel and DMA and each operation becomes one JSON line."""
    from kvd.transports.cuda.transport import CudaTransport

    path = tmp_path / "trace.jsonl"
    config = TransportsConfig(cuda_chunk_bytes=MiB, cuda_staging_bytes=8 * MiB, cuda_trace_path=path)
    transport = CudaTransport(config, PinnedRegion(0x7000_0000, 64 * MiB))
    await transport.start()
    attachment = await transport.attach(memory(), LAYOUT, PeerIdentity(PeerProcess(1, 0, 0, None, None), "uid:0"))
    saved, loaded = DaemonStages(received_ns=1), DaemonStages(received_ns=2)
    await attachment.save(list(range(12)), slots([0, 1, 2, 3, 4, 9, 11, 12, 20, 30, 31, 32]), WORKER_EVENT, saved)
    await attachment.load([7, 3, 5, 1, 0, 2, 4], slots(list(range(7))), WORKER_EVENT, loaded)
    for stamps in (saved, loaded):
        assert 0 < stamps.enqueue_start_ns <= stamps.enqueue_end_ns <= stamps.copy_done_ns
    await attachment.close()
    await transport.stop()
    header, *records = (json.loads(line) for line in path.read_text().splitlines())
    assert header["trace"] == "kvd-cuda" and header["buffers_per_direction"] == 4
    # Each direction's waiter writes its operation's line after resolving it: the two lines come in either order.
    assert sorted(r["kind"] for r in records) == ["load", "save"]
    save, load = sorted(records, key=lambda r: r["kind"] == "load")
    assert save["kind"] == "save" and save["stages"]["received_ns"] == 1
    assert [(c["blocks"], c["runs"]) for c in save["chunks"]] == [(5, 1), (5, 4), (2, 1)]  # DMA runs per chunk
    assert load["kind"] == "load" and [c["blocks"] for c in load["chunks"]] == [5, 2]
    assert all(len(c["kernel"]) == len(c["dma"]) == 2 for c in save["chunks"] + load["chunks"])


class VmmRecorder:
    """The cuMem* calls of kvd.transports.cuda.vmm, into the recorder's log."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def granularity(self, ordinal: int) -> int:
        return 2 * MiB

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> int:
            self._recorder.calls.append((f"vmm.{name}", args))
            return {"reserve": 0x9_0000_0000, "import_fd": 0x500 + args[0]}.get(name, 0)

        return call


async def test_driver_mapped_memory_is_imported_mapped_and_unmapped_chunk_by_chunk(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three 4 MiB chunks, one per layer, each from its own passed descriptor: one reserved range, each chunk
    imported, mapped at its offset and its import handle dropped, read/write access for the whole range; the
    descriptors are closed once imported; closing unmaps each chunk as it was mapped and frees the range."""
    from kvd.transports.cuda import vmm

    monkeypatch.setattr(vmm, "VmmDriver", lambda: VmmRecorder(recorder))
    pipes = [os.pipe() for _ in range(3)]
    size = LAYERS[0].nbytes  # 4 MiB
    chunks = tuple(VmmChunk(i * size, size, fd_index=2 - i) for i in range(3))
    memory = CudaMemory(
        "GPU-" + "ab" * 16,
        (CudaAllocation(b"", 3 * size, chunks),),
        tuple(CudaLayer(0, i * size, size) for i in range(3)),
        PassedFds([r for r, _ in pipes]),
    )
    transport = CudaTransport(
        TransportsConfig(cuda_chunk_bytes=MiB, cuda_staging_bytes=8 * MiB), PinnedRegion(0x7000_0000, 64 * MiB)
    )
    await transport.start()
    attachment = await transport.attach(memory, LAYOUT, PeerIdentity(PeerProcess(1, 0, 0, None, None), "uid:0"))
    base, fds = 0x9_0000_0000, [r for r, _ in pipes]
    assert [c for c in recorder.calls if c[0].startswith("vmm.")] == [
        ("vmm.reserve", (3 * size,)),
        *[
            call
            for i in range(3)
            for call in (
                ("vmm.import_fd", (fds[2 - i],)),
                ("vmm.map", (base + i * size, size, 0x500 + fds[2 - i])),
                ("vmm.release", (0x500 + fds[2 - i],)),
            )
        ],
        ("vmm.allow", (base, 3 * size, 0)),
    ]
    for r, w in pipes:
        with pytest.raises(OSError):
            os.fstat(r)  # closed by the engine once imported
        os.close(w)
    start = len(recorder.calls)
    await attachment.close()
    assert [c for c in recorder.calls[start:] if c[0].startswith("vmm.")] == [
        *[("vmm.unmap", (base + i * size, size)) for i in range(3)],
        ("vmm.free", (base, 3 * size)),
    ]
    await transport.stop()
