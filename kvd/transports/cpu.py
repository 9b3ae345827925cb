"""CPU transport: the daemon copies straight between a worker's address space and the host pool, so the worker's
model thread copies nothing.

Whose memory: the session's peer process only (kvd.process.PeerProcess), and only while the peer could still copy
it itself: `check()` (alive, credentials unchanged since it connected, dumpable, the address space it registered)
runs as every save or load is accepted, and again after every save's copy.

- Loads by a daemon with privilege over the worker (root, CAP_SYS_PTRACE, another uid) write through
  /proc/<pid>/mem, opened at registration with the peer's own filesystem credentials (the kernel's ptrace check for
  that uid; the worker grants it with prctl(PR_SET_PTRACER, daemon_pid) under Yama). That descriptor belongs to the
  address space registered: once the process execs (a setuid program, anything), writes through it fail, so a load
  can never reach another image, whatever the timing. It costs throughput (the kernel bounces every page).
- A daemon with no privilege over the worker (its own uid and gid, no capabilities) writes with process_vm_writev:
  the kernel checks each call against the daemon's credentials, which are then the peer's, so a process that
  became something the peer could not touch is refused by the call itself.
- Saves read with process_vm_readv (about twice the throughput of /proc/<pid>/mem, which bounces every page through
  a kernel buffer) and are kept only if, afterwards, the process is unchanged and the registered address space is
  still its live one (a one-byte read through the same descriptor). A save that may have read another image fails
  and its slots are discarded: those bytes never reach a reader.

Each system call carries up to IOV_MAX iovecs (many blocks and layers), never one call per block, and several calls
run at once on a thread pool (ctypes drops the GIL).
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import errno
import functools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from kvd_client.layout import KvLayout

from kvd.errors import FailureReason, InvalidArgument, PermissionDenied, TransferError
from kvd.memory.progress import LayerProgress
from kvd.process import PeerProcess, no_more_privileged_than
from kvd.transports.base import Attachment, Transport, block_segments, call_guarded
from kvd.types import CpuMemory, PeerIdentity, Stamps, TransportKind, WorkerMemory

IOV_MAX = 1024
_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong
]
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = _libc.process_vm_readv.argtypes
_libc.pwritev.restype = ctypes.c_ssize_t
_libc.pwritev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]


class PeerChanged(TransferError):
    """The worker process is no longer what registered (it exited, exec'd, or its credentials changed): the
    session may not copy any more."""

    def __init__(self, message: str) -> None:
        super().__init__(message, FailureReason.PEER_CHANGED)


Span = tuple[int, int]  # when a copy call began and ended (time.monotonic_ns)
Segments = Sequence[tuple[int, int, int]]  # (worker address of block 0's segment, size, offset in the stored block)


def _vm_copy(write: bool, pid: int, local: array.array[int], remote: array.array[int], count: int, nbytes: int) -> Span:
    """One process_vm_readv/writev over `count` iovec pairs (each array holds base, len, base, len, ...)."""
    fn = _libc.process_vm_writev if write else _libc.process_vm_readv
    began = time.monotonic_ns()
    done = fn(pid, local.buffer_info()[0], count, remote.buffer_info()[0], count, 0)
    ended = time.monotonic_ns()
    if done < 0:
        call = f"process_vm_{'writev' if write else 'readv'}"
        raise TransferError(f"{call}(pid {pid}): {os.strerror(ctypes.get_errno())}", FailureReason.PROCESS_VM)
    if done != nbytes:
        raise TransferError(
            f"partial copy from pid {pid}: {done} of {nbytes} bytes (its memory changed?)", FailureReason.PARTIAL_COPY
        )
    return began, ended


def _mem_write(fd: int, runs: list[tuple[int, array.array[int], int, int]]) -> Span:
    """pwritev through /proc/<pid>/mem: per run, slots (iovecs) into one contiguous range of the worker."""
    began = time.monotonic_ns()
    for offset, local, count, nbytes in runs:
        done = _libc.pwritev(fd, local.buffer_info()[0], count, offset)
        if done < 0:
            err = os.strerror(ctypes.get_errno())
            raise TransferError(f"writing the worker's memory at {offset:#x}: {err}", FailureReason.PROCESS_VM)
        if done == 0:
            raise PeerChanged("the worker's registered address space is gone (it exec'd or exited)")
        if done != nbytes:
            raise TransferError(f"partial copy into the worker: {done} of {nbytes} bytes", FailureReason.PARTIAL_COPY)
    return began, time.monotonic_ns()


def _run_layers(per_layer: list[list[Callable[[], Span]]], on_layer: Callable[[int], None]) -> None:
    for layer, calls in enumerate(per_layer):
        for call in calls:
            call()
        on_layer(layer)


class CpuAttachment(Attachment):
    kind = TransportKind.CPU

    def __init__(
        self, peer: PeerProcess, mem_fd: int, memory: CpuMemory, layout: KvLayout, executor: ThreadPoolExecutor
    ) -> None:
        self._peer = peer
        self._mem = mem_fd
        self._direct_writes = no_more_privileged_than(peer.uid, peer.gid)
        self._witness = memory.layers[0].address
        self._executor = executor
        self._revoked = ""
        # (worker address of block 0's segment, segment size, offset inside the stored block), per (layer, segment)
        segments = block_segments(layout)
        self._segments = [(memory.layers[li].address + offset, size, stored) for li, offset, size, stored in segments]
        self._layer_segments: list[list[tuple[int, int, int]]] = [[] for _ in layout.layers]  # in-step loads
        for (li, _, _, _), segment in zip(segments, self._segments, strict=True):
            self._layer_segments[li].append(segment)

    def check(self) -> None:
        """PermissionDenied unless the peer could still copy its memory itself (its answer is remembered: a
        process that changed never becomes eligible again)."""
        if not self._revoked:
            try:
                self._peer.check("copy")
                self._same_address_space()
            except PermissionDenied as exc:
                self._revoked = exc.message
        if self._revoked:
            raise PermissionDenied(self._revoked)

    def _same_address_space(self) -> None:
        """The registered address space is still the process's (a read through the descriptor bound to it)."""
        try:
            same = len(os.pread(self._mem, 1, self._witness)) == 1
        except OSError:
            same = False
        if not same:
            raise PermissionDenied(f"copy: pid {self._peer.pid} exec'd or exited since it registered")

    def _checked(self) -> None:
        try:
            self.check()
        except PermissionDenied as exc:
            raise PeerChanged(f"permission denied: {exc.message}") from None

    def _vm_batches(
        self, block_indices: Sequence[int], addresses: Sequence[int], segments: Segments = ()
    ) -> list[tuple[array.array[int], array.array[int]]]:
        local: list[int] = []
        remote: list[int] = []
        for index, slot in zip(block_indices, addresses, strict=True):
            for worker_base, size, stored in segments or self._segments:
                remote += (worker_base + index * size, size)
                local += (slot + stored, size)
        step = 2 * IOV_MAX
        return [
            (array.array("Q", local[start : start + step]), array.array("Q", remote[start : start + step]))
            for start in range(0, len(local), step)
        ]

    def _write_jobs(
        self, block_indices: Sequence[int], addresses: Sequence[int], segments: Segments = ()
    ) -> list[list[tuple[int, array.array[int], int, int]]]:
        """Runs of consecutive block indices per (layer, segment): one pwritev each (the worker's side of a run is
        contiguous), grouped into jobs of about IOV_MAX iovecs."""
        ordered = sorted(zip(block_indices, addresses, strict=True), key=lambda pair: pair[0])
        jobs: list[list[tuple[int, array.array[int], int, int]]] = [[]]
        in_job = 0
        for worker_base, size, stored in segments or self._segments:
            start = 0
            while start < len(ordered):
                end = start + 1
                while end < len(ordered) and end - start < IOV_MAX and ordered[end][0] == ordered[end - 1][0] + 1:
                    end += 1
                iov = array.array("Q")
                for _, slot in ordered[start:end]:
                    iov.extend((slot + stored, size))
                if in_job >= IOV_MAX:
                    jobs.append([])
                    in_job = 0
                jobs[-1].append((worker_base + ordered[start][0] * size, iov, end - start, (end - start) * size))
                in_job += end - start
                start = end
        return [job for job in jobs if job]

    def _vm_jobs(
        self, write: bool, block_indices: Sequence[int], addresses: Sequence[int]
    ) -> list[asyncio.Future[Span]]:
        """process_vm_readv/writev calls on the copy threads, IOV_MAX iovecs each."""
        loop = asyncio.get_running_loop()
        jobs = []
        for local, remote in self._vm_batches(block_indices, addresses):
            count, nbytes = len(local) // 2, sum(local[1::2])
            pid = self._peer.pid
            jobs.append(loop.run_in_executor(self._executor, _vm_copy, write, pid, local, remote, count, nbytes))
        return jobs

    async def _gather(self, jobs: list[asyncio.Future[Span]], stamps: Stamps) -> None:
        spans: list[Span] = []
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, TransferError):
                raise result
            if isinstance(result, BaseException):
                raise TransferError(str(result)) from result
            spans.append(result)
        if stamps is not None and spans:
            # Nothing is queued ahead of a CPU copy: it starts as it is enqueued, and is done when the last call ends.
            stamps.enqueue_start_ns = stamps.enqueue_end_ns = min(began for began, _ in spans)
            stamps.copy_done_ns = max(ended for _, ended in spans)

    async def save(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes, stamps: Stamps = None,
        while_copying: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        # Checked as the save was accepted (Attachment.check); checked again after the copy, which decides.
        try:
            jobs = self._vm_jobs(False, block_indices, addresses)
            if while_copying is not None:
                call_guarded(while_copying, "while-copying")  # here, on the loop, while the copy threads run
            await self._gather(jobs, stamps)
        finally:
            self._checked()  # after the copy: bytes read from anything but the registered peer are never kept

    async def load(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes, stamps: Stamps = None
    ) -> bytes:
        # Checked as the load was accepted (Attachment.check); the write itself cannot reach another process image.
        if self._direct_writes:
            jobs = self._vm_jobs(True, block_indices, addresses)
        else:
            loop = asyncio.get_running_loop()
            runs = self._write_jobs(block_indices, addresses)
            jobs = [loop.run_in_executor(self._executor, _mem_write, self._mem, job) for job in runs]
        try:
            await self._gather(jobs, stamps)
        except PeerChanged:
            self._revoked = self._revoked or f"pid {self._peer.pid} exec'd or exited since it registered"
            raise
        return b""

    async def load_layers(
        self, block_indices: Sequence[int], addresses: Sequence[int], ready_event: bytes,
        progress: LayerProgress, stamps: Stamps = None,
    ) -> bytes:  # fmt: skip
        """Layer by layer, in one copy thread (no event-loop hop between layers), each layer's blocks in as few calls
        as IOV_MAX allows, written as `load` writes; `progress.layer_done` right after each layer's last call."""
        on_layer = progress.layer_done
        per_layer = [self._layer_calls(block_indices, addresses, segments) for segments in self._layer_segments]
        began = time.monotonic_ns()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, _run_layers, per_layer, on_layer)
        except PeerChanged:
            self._revoked = self._revoked or f"pid {self._peer.pid} exec'd or exited since it registered"
            raise
        if stamps is not None:
            stamps.enqueue_start_ns = stamps.enqueue_end_ns = began
            stamps.copy_done_ns = time.monotonic_ns()
        return b""

    def _layer_calls(
        self, block_indices: Sequence[int], addresses: Sequence[int], segments: Segments
    ) -> list[Callable[[], Span]]:
        if self._direct_writes:
            pid = self._peer.pid
            return [
                functools.partial(_vm_copy, True, pid, local, remote, len(local) // 2, sum(local[1::2]))
                for local, remote in self._vm_batches(block_indices, addresses, segments)
            ]
        jobs = self._write_jobs(block_indices, addresses, segments)
        return [functools.partial(_mem_write, self._mem, job) for job in jobs]

    async def close(self) -> None:
        """The address-space descriptor goes; the peer process handle belongs to the session."""
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1


class CpuTransport(Transport):
    kind = TransportKind.CPU

    def __init__(self, copy_threads: int) -> None:
        self._executor = ThreadPoolExecutor(copy_threads, thread_name_prefix="kvd-cpu-copy")

    async def attach(self, memory: WorkerMemory, layout: KvLayout, peer: PeerIdentity) -> Attachment:
        if not isinstance(memory, CpuMemory):
            raise InvalidArgument("the CPU transport takes CPU memory")
        if len(memory.layers) != len(layout.layers):
            raise InvalidArgument(f"{len(memory.layers)} memory regions for {len(layout.layers)} layers")
        for region, layer in zip(memory.layers, layout.layers, strict=True):
            if region.nbytes != layer.nbytes:
                raise InvalidArgument(
                    f"layer {layer.name!r}: region of {region.nbytes} bytes, layout says {layer.nbytes}"
                )
            if region.address == 0 or region.address + region.nbytes >= 1 << 63:
                raise InvalidArgument(f"layer {layer.name!r}: region address {region.address:#x} is not valid")
        loop = asyncio.get_running_loop()
        mem_fd = await loop.run_in_executor(self._executor, peer.process.open_memory)
        try:
            await loop.run_in_executor(self._executor, _probe, peer.process, mem_fd, memory)
        except BaseException:
            os.close(mem_fd)
            raise
        return CpuAttachment(peer.process, mem_fd, memory, layout, self._executor)

    async def stop(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _probe(peer: PeerProcess, mem_fd: int, memory: CpuMemory) -> None:
    """Read the first and last byte of every region both ways a copy will (process_vm_readv for saves, the
    registered address space for loads), so a bad address or a missing ptrace grant is a clear error at
    registration instead of a failed copy later."""
    probe = ctypes.create_string_buffer(1)
    for region in memory.layers:
        for address in (region.address, region.address + region.nbytes - 1):
            local = array.array("Q", [ctypes.addressof(probe), 1])
            remote = array.array("Q", [address, 1])
            if _libc.process_vm_readv(peer.pid, local.buffer_info()[0], 1, remote.buffer_info()[0], 1, 0) != 1:
                err = ctypes.get_errno()
                if err == errno.EPERM:
                    raise PermissionDenied(
                        f"no ptrace access to pid {peer.pid}: the worker must call prctl(PR_SET_PTRACER,"
                        f" {os.getpid()}) or run as the daemon's user"
                    )
                if err == errno.ESRCH:
                    raise PermissionDenied(f"pid {peer.pid} has exited")
                raise InvalidArgument(f"worker memory at {address:#x} is not readable: {os.strerror(err)}")
            try:
                readable = len(os.pread(mem_fd, 1, address)) == 1
            except OSError:
                readable = False
            if not readable:
                raise InvalidArgument(f"worker memory at {address:#x} is not readable through its address space")
