"""The client's side of the wire: its value types and requests to protobuf, notices and responses back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from kvd_client.completions import Record
from kvd_client.errors import InvalidArgument, KvdError, error_of
from kvd_client.layout import KvLayout
from kvd_client.types import DAEMON_STAGES, Completion, DaemonStages, LookupResult, OperationStages, OpKind, Tier
from kvd_client.wire.kvd.v1 import kvd_pb2


@dataclass(frozen=True, slots=True)
class SessionRef:
    """The client's session: its id and the key that makes it ours (sent with every call on it, never logged)."""

    id: str = ""
    key: bytes = b""

    def __repr__(self) -> str:
        return f"SessionRef({self.id[:12]!r})"


M = TypeVar("M", kvd_pb2.HeartbeatRequest, kvd_pb2.UnregisterRequest, kvd_pb2.WatchRequest, kvd_pb2.LookupRequest)


def scoped(message: type[M], session: SessionRef, **fields: Any) -> M:
    """A session-scoped request: the session's id and key, and `fields`."""
    return message(session_id=session.id, session_key=session.key, **fields)


def layout_message(layout: KvLayout) -> kvd_pb2.KvLayout:
    return kvd_pb2.KvLayout(
        layers=[
            kvd_pb2.LayerLayout(
                name=layer.name,
                shape=layer.shape,
                dtype=kvd_pb2.DType.ValueType(layer.dtype),
                block_dim=layer.block_dim,
            )
            for layer in layout.layers
        ],
        block_size_tokens=layout.block_size_tokens,
    )


def worker_memory(tensors: list[Any]) -> tuple[kvd_pb2.CpuMemory | Any, bool, list[int]]:
    """The KV tensors' memory as the daemon will reach it, whether it is CUDA memory, and the file descriptors to
    pass with the registration (driver-mapped CUDA memory; the caller's to close). CPU tensors use the CPU transport
    (the daemon reads this process's memory); CUDA tensors go by CUDA IPC handle or by descriptor."""
    devices = {str(t.device) for t in tensors}
    if len(devices) != 1:
        raise InvalidArgument(f"KV tensors span several devices: {sorted(devices)}")
    if devices.pop().startswith("cuda"):
        from kvd_client.cuda import describe_cuda_memory, prepare_ready_events  # torch + CUDA only on a GPU

        memory, fds = describe_cuda_memory(tensors)
        prepare_ready_events()
        return memory, True, fds
    regions = [kvd_pb2.CpuRegion(address=t.data_ptr(), nbytes=t.numel() * t.element_size()) for t in tensors]
    return kvd_pb2.CpuMemory(layers=regions), False, []


def registration_request(
    namespace: kvd_pb2.Namespace,
    token: bytes,
    worker_name: str,
    pid: int,
    layout: KvLayout | None,
    memory: kvd_pb2.CpuMemory | Any | None,
) -> kvd_pb2.RegisterSessionRequest:
    """`memory`: a CpuMemory or CudaMemory message, or None for a lookup-only session."""
    request = kvd_pb2.RegisterSessionRequest(
        namespace=namespace, pid=pid, credential_token=token, worker_name=worker_name
    )
    if layout is not None:
        request.layout.CopyFrom(layout_message(layout))
    if isinstance(memory, kvd_pb2.CpuMemory):
        request.cpu.CopyFrom(memory)
    elif memory is not None:
        request.cuda.CopyFrom(memory)
    return request


@dataclass(slots=True)
class PendingOp:
    """A save or load from the caller's call to its notice. The stamps are time.monotonic_ns() of the client's stages
    (OperationStages): the caller's thread stamps `call_ns`, the client's loop thread the others, one after another."""

    op_id: int
    kind: OpKind
    blocks: tuple[tuple[int, bytes], ...]
    ready_event: bytes
    call_ns: int = 0
    in_step: tuple[int, int] | None = None  # (progress entry, its base) of an in-step load
    loop_ns: int = 0
    send_ns: int = 0
    accepted_ns: int = 0


def transfer_request(session: SessionRef, op: PendingOp, columnar: bool) -> kvd_pb2.TransferRequest:
    """`columnar`: the daemon takes the blocks as two columns (no message per block: microseconds, not a
    millisecond, for hundreds of blocks); else the per-block form every daemon takes."""
    request = kvd_pb2.TransferRequest(
        session_id=session.id, session_key=session.key, ready_event=op.ready_event, client_tag=op.op_id
    )
    if columnar:
        request.block_indices.extend([i for i, _ in op.blocks])
        request.block_hashes.extend([h for _, h in op.blocks])
    else:
        request.blocks.extend(kvd_pb2.BlockTransfer(block_index=i, block_hash=h) for i, h in op.blocks)
    if op.in_step is not None:
        request.in_step.slot, request.in_step.base = op.in_step
    return request


def _stages(op: PendingOp, notice_ns: int, daemon: DaemonStages) -> OperationStages:
    """The client's own stamps of `op` around the daemon's."""
    return OperationStages(
        call_ns=op.call_ns,
        loop_ns=op.loop_ns,
        send_ns=op.send_ns,
        accepted_ns=op.accepted_ns,
        notice_ns=notice_ns,
        daemon=daemon,
    )


def completion(op: PendingOp, notice: kvd_pb2.CompletionNotice, notice_ns: int) -> Completion:
    daemon = notice.stages  # all zero from a daemon that records no stages
    stages = _stages(op, notice_ns, DaemonStages(*(getattr(daemon, f"{name}_ns") for name in DAEMON_STAGES)))
    failed, error = frozenset(notice.failed_block_hashes), notice.error
    if notice.refused_status:  # a ring record refused as the RPC would have been: every block failed, and why
        failed, error = frozenset(h for _, h in op.blocks), refusal(notice.refused_status, notice.error)
    return Completion(
        op_id=op.op_id,
        kind=op.kind,
        ok=notice.ok and not notice.refused_status,
        failed_hashes=failed,
        error=error,
        nbytes=notice.bytes_moved,
        duration_s=notice.duration_us / 1e6,
        done_event=notice.done_event,
        stages=stages,
    )


def completion_of_record(op: PendingOp, record: Record, notice_ns: int) -> Completion:
    """A successful operation's completion, from its completion-queue record (kvd_client.completions)."""
    stages = _stages(op, notice_ns, DaemonStages(*record.stamps))
    return Completion(
        op_id=op.op_id,
        kind=op.kind,
        ok=True,
        failed_hashes=frozenset(),
        nbytes=record.nbytes,
        duration_s=record.duration_us / 1e6,
        done_event=record.done_event,
        stages=stages,
    )


def refusal(status: int, message: str) -> str:
    """A refused request's error, as the RPC's would read ("InvalidArgument: block index 9 out of range")."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status), grpc.StatusCode.UNKNOWN)
    return f"{type(error_of(code, message)).__name__}: {message}"


def lookup_result(response: kvd_pb2.LookupResponse) -> LookupResult:
    return LookupResult(hit_blocks=response.hit_blocks, tiers=tuple(Tier(t) for t in response.tiers))


def describe(exc: BaseException) -> str:
    """One line for the log about why the daemon was not reachable."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, KvdError):
        return f"{type(exc).__name__}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"
