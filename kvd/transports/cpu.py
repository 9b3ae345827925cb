"""CPU transport: the daemon copies straight between a worker's address space and the host pool with
process_vm_readv / process_vm_writev, so the worker's model thread copies nothing.

The worker allows it with prctl(PR_SET_PTRACER, daemon_pid) (Yama) or by running as the daemon's user; the pid is
the kernel-verified one from the credential socket. Each system call carries up to IOV_MAX iovecs (many blocks and
layers), never one call per block, and several calls run at once on a thread pool (ctypes drops the GIL).
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import errno
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvd_client.layout import KvLayout

from kvd.errors import FailureReason, InvalidArgument, PermissionDenied, TransferError
from kvd.transports.base import Attachment, SlotRef, Transport, block_segments
from kvd.types import CpuMemory, PeerIdentity, Stamps, TransportKind, WorkerMemory

IOV_MAX = 1024
_libc = ctypes.CDLL(None, use_errno=True)
for _name in ("process_vm_readv", "process_vm_writev"):
    _fn = getattr(_libc, _name)
    _fn.restype = ctypes.c_ssize_t
    _fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]


def _vm_copy(
    write: bool, pid: int, local: array.array, remote: array.array, count: int, nbytes: int
) -> tuple[int, int]:
    """One process_vm_* call over `count` iovec pairs (each array holds base, len, base, len, ...); when it began
    and ended (time.monotonic_ns)."""
    fn = _libc.process_vm_writev if write else _libc.process_vm_readv
    local_ptr, _ = local.buffer_info()
    remote_ptr, _ = remote.buffer_info()
    began = time.monotonic_ns()
    done = fn(pid, local_ptr, count, remote_ptr, count, 0)
    ended = time.monotonic_ns()
    if done < 0:
        err = ctypes.get_errno()
        call = f"process_vm_{'writev' if write else 'readv'}"
        raise TransferError(f"{call}(pid {pid}): {os.strerror(err)}", FailureReason.PROCESS_VM)
    if done != nbytes:
        raise TransferError(
            f"partial copy with pid {pid}: {done} of {nbytes} bytes (its memory changed?)", FailureReason.PARTIAL_COPY
        )
    return began, ended


def _copy_layers(
    pid: int, per_layer: list[list[tuple[array.array[int], array.array[int]]]], on_layer: Callable[[int], None]
) -> None:
    for layer, batches in enumerate(per_layer):
        for local, remote in batches:
            _vm_copy(True, pid, local, remote, len(local) // 2, sum(local[1::2]))
        on_layer(layer)


class CpuAttachment(Attachment):
    kind = TransportKind.CPU

    def __init__(self, pid: int, memory: CpuMemory, layout: KvLayout, executor: ThreadPoolExecutor) -> None:
        self._pid = pid
        self._executor = executor
        # (worker address of block 0's segment, segment size, offset inside the stored block), per (layer, segment)
        segments = block_segments(layout)
        self._segments = [(memory.layers[li].address + offset, size, stored) for li, offset, size, stored in segments]
        self._layer_segments: list[list[tuple[int, int, int]]] = [[] for _ in layout.layers]
        for (li, _, _, _), segment in zip(segments, self._segments, strict=True):
            self._layer_segments[li].append(segment)

    def _batches(
        self, block_indices: Sequence[int], slots: Sequence[SlotRef], segments: Sequence[tuple[int, int, int]] = ()
    ) -> list[tuple[array.array[int], array.array[int]]]:
        local: list[int] = []
        remote: list[int] = []
        for index, slot in zip(block_indices, slots, strict=True):
            for worker_base, size, stored in segments or self._segments:
                remote += (worker_base + index * size, size)
                local += (slot.address + stored, size)
        batches = []
        step = 2 * IOV_MAX
        for start in range(0, len(local), step):
            batches.append(
                (array.array("Q", local[start : start + step]), array.array("Q", remote[start : start + step]))
            )
        return batches

    async def _copy(self, write: bool, block_indices: Sequence[int], slots: Sequence[SlotRef], stamps: Stamps) -> None:
        loop = asyncio.get_running_loop()
        jobs = []
        for local, remote in self._batches(block_indices, slots):
            count = len(local) // 2
            nbytes = sum(local[1::2])
            jobs.append(loop.run_in_executor(self._executor, _vm_copy, write, self._pid, local, remote, count, nbytes))
        spans: list[tuple[int, int]] = []
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result if isinstance(result, TransferError) else TransferError(str(result)) from result
            spans.append(result)
        if stamps is not None and spans:
            # Nothing is queued ahead of a CPU copy: it starts as it is enqueued, and is done when the last call ends.
            stamps.enqueue_start_ns = stamps.enqueue_end_ns = min(began for began, _ in spans)
            stamps.copy_done_ns = max(ended for _, ended in spans)

    async def save(
        self, block_indices: Sequence[int], slots: Sequence[SlotRef], ready_event: bytes, stamps: Stamps = None
    ) -> None:
        await self._copy(False, block_indices, slots, stamps)

    async def load(
        self, block_indices: Sequence[int], slots: Sequence[SlotRef], ready_event: bytes, stamps: Stamps = None
    ) -> bytes:
        await self._copy(True, block_indices, slots, stamps)
        return b""

    async def load_layers(
        self,
        block_indices: Sequence[int],
        slots: Sequence[SlotRef],
        ready_event: bytes,
        on_layer: Callable[[int], None],
        layers: int,
        stamps: Stamps = None,
    ) -> bytes:
        """Layer by layer, in one copy thread (no event-loop hop between layers), each layer's blocks in as few
        process_vm_writev calls as IOV_MAX allows; `on_layer` right after each layer's last call."""
        per_layer = [self._batches(block_indices, slots, segments) for segments in self._layer_segments]
        loop = asyncio.get_running_loop()
        began = time.monotonic_ns()
        await loop.run_in_executor(self._executor, _copy_layers, self._pid, per_layer, on_layer)
        if stamps is not None:
            stamps.enqueue_start_ns = stamps.enqueue_end_ns = began
            stamps.copy_done_ns = time.monotonic_ns()
        return b""

    async def close(self) -> None:
        """Nothing is mapped: the worker's memory is only ever named by address."""


class CpuTransport(Transport):
    kind = TransportKind.CPU

    def __init__(self, copy_threads: int) -> None:
        self._executor = ThreadPoolExecutor(copy_threads, thread_name_prefix="kvd-cpu-copy")

    async def attach(self, memory: WorkerMemory, layout: KvLayout, peer: PeerIdentity) -> Attachment:
        if not isinstance(memory, CpuMemory):
            raise InvalidArgument("the CPU transport takes CPU memory")
        if not peer.verified:
            raise PermissionDenied(
                "the CPU transport needs a kernel-verified peer: connect through the credential socket first"
            )
        if len(memory.layers) != len(layout.layers):
            raise InvalidArgument(f"{len(memory.layers)} memory regions for {len(layout.layers)} layers")
        for region, layer in zip(memory.layers, layout.layers, strict=True):
            if region.nbytes != layer.nbytes:
                raise InvalidArgument(
                    f"layer {layer.name!r}: region of {region.nbytes} bytes, layout says {layer.nbytes}"
                )
            if region.address == 0 or region.address + region.nbytes >= 1 << 64:
                raise InvalidArgument(f"layer {layer.name!r}: region address {region.address:#x} is not valid")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._probe, peer.pid, memory)
        return CpuAttachment(peer.pid, memory, layout, self._executor)

    @staticmethod
    def _probe(pid: int, memory: CpuMemory) -> None:
        """Read the first and last byte of every region now, so a bad address or a missing ptrace grant is a clear
        error at registration instead of a failed save later."""
        probe = ctypes.create_string_buffer(1)
        for region in memory.layers:
            for address in (region.address, region.address + region.nbytes - 1):
                local = array.array("Q", [ctypes.addressof(probe), 1])
                remote = array.array("Q", [address, 1])
                fn = _libc.process_vm_readv
                if fn(pid, local.buffer_info()[0], 1, remote.buffer_info()[0], 1, 0) == 1:
                    continue
                err = ctypes.get_errno()
                if err == errno.EPERM:
                    raise PermissionDenied(
                        f"no ptrace access to pid {pid}: the worker must call prctl(PR_SET_PTRACER, {os.getpid()})"
                        " or run as the daemon's user"
                    )
                if err == errno.ESRCH:
                    raise InvalidArgument(f"pid {pid} does not exist")
                raise InvalidArgument(f"worker memory at {address:#x} is not readable: {os.strerror(err)}")

    async def stop(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
