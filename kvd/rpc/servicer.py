"""The kvd.v1.Kvd servicer: protobuf in, frozen dataclasses down, protobuf out. The only module that sees both.

Errors: every handler runs under `_mapped`, which turns the KvdError family into gRPC status codes (one place, via
kvd_client.errors.status_of) and anything else into INTERNAL, logged; the daemon keeps serving either way.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from kvd_client.layout import DType, KvLayout, LayerLayout, Namespace
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

from kvd.errors import InvalidArgument, KvdError, PermissionDenied, Unavailable, status_of
from kvd.logs import Throttled
from kvd.rpc.credentials import CredentialIssuer
from kvd.rpc.guard import MAX_DIMS, MAX_FINGERPRINT_BYTES, MAX_LAYERS, MAX_MODEL_ID_BYTES, MAX_NAME_BYTES
from kvd.rpc.transfer import IPC_HANDLE_BYTES, start_transfer
from kvd.service.service import KvdService
from kvd.types import (
    BlockBatch,
    CpuMemory,
    CpuRegion,
    CudaAllocation,
    CudaLayer,
    CudaMemory,
    DaemonStages,
    InStep,
    Notice,
    OpKind,
    PassedFds,
    PeerIdentity,
    Registration,
    SessionRef,
    SessionSnapshot,
    TierSnapshot,
    VmmChunk,
    WorkerMemory,
)

log = logging.getLogger(__name__)
_throttled = Throttled(log)  # one traceback per kind of failure a minute: a bug that repeats must not flood the log

R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def _mapped(handler: Handler[R]) -> Handler[R]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await handler(self, request, context)
        except KvdError as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
        except Exception as exc:
            _throttled.exception(handler.__name__, "%s failed", handler.__name__)
            code, message = status_of(exc)
            await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


class KvdServicer(kvd_pb2_grpc.KvdServicer):
    def __init__(self, credentials: CredentialIssuer) -> None:
        self._credentials = credentials
        self.service: KvdService | None = None  # set once every layer below is ready; until then: UNAVAILABLE
        self.rings = False  # whether memory sessions may ask for a submission ring (kvd.rpc.ring)

    def _svc(self) -> KvdService:
        if self.service is None:
            raise Unavailable("kvd is starting (allocating its host pool); retry shortly")
        return self.service

    @_mapped
    async def RegisterSession(
        self, request: kvd_pb2.RegisterSessionRequest, context: grpc.aio.ServicerContext
    ) -> kvd_pb2.RegisterSessionResponse:
        service = self._svc()
        service.check_open()  # a draining daemon says "retry later" before anything else
        peer, fds = await self._peer(request, service)  # then the token: spent by any registration that names it
        try:
            registration = Registration(
                namespace=_namespace(request.namespace),
                layout=_layout(request.layout) if request.layout.layers else None,
                memory=_memory(request, fds),
                peer=peer,
                worker_name=request.worker_name[:MAX_NAME_BYTES],
            )
            session = await service.register(registration)
        except BaseException:
            peer.process.close()
            raise
        finally:
            fds.close()  # what the transport did not take (it takes them when it maps driver-mapped memory)
        layout = registration.layout
        return kvd_pb2.RegisterSessionResponse(
            session_id=session.id,
            lease_ms=service.config.lease_ms,
            boot_id=service.boot_id,
            block_bytes=layout.block_bytes if layout is not None else 0,
            max_batch_blocks=service.config.max_batch_blocks,
            columnar_blocks=True,
            session_key=session.key,
            submission_ring=self.rings and layout is not None,
            tenant=peer.tenant,
        )

    async def _peer(
        self, request: kvd_pb2.RegisterSessionRequest, service: KvdService
    ) -> tuple[PeerIdentity, PassedFds]:
        """The process that took the request's credential token, its tenant, and the descriptors it passed with the
        token. No token, no session: a pid or uid a request states is never believed."""
        if not request.credential_token:
            raise PermissionDenied(
                "no credential token: every session registers through the credential socket"
                f" ({self._credentials.path.name}, next to the gRPC socket)"
            )
        process, fds = await self._credentials.redeem(request.credential_token)
        return PeerIdentity(process=process, tenant=service.config.tenant_of(process.uid)), fds

    @_mapped
    async def Heartbeat(
        self, request: kvd_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> kvd_pb2.HeartbeatResponse:
        service = self._svc()
        service.heartbeat(_ref(request))
        return kvd_pb2.HeartbeatResponse(boot_id=service.boot_id)

    @_mapped
    async def Unregister(
        self, request: kvd_pb2.UnregisterRequest, context: grpc.aio.ServicerContext
    ) -> kvd_pb2.UnregisterResponse:
        await self._svc().unregister(_ref(request))
        return kvd_pb2.UnregisterResponse()

    @_mapped
    async def Lookup(self, request: kvd_pb2.LookupRequest, context: grpc.aio.ServicerContext) -> kvd_pb2.LookupResponse:
        result = await self._svc().lookup(_ref(request), request.block_hashes)
        return kvd_pb2.LookupResponse(
            hit_blocks=result.hit_blocks, tiers=[kvd_pb2.Tier.ValueType(t) for t in result.tiers]
        )

    @_mapped
    async def Save(
        self, request: kvd_pb2.TransferRequest, context: grpc.aio.ServicerContext
    ) -> kvd_pb2.TransferAccepted:
        return self._transfer(OpKind.SAVE, request)

    @_mapped
    async def Load(
        self, request: kvd_pb2.TransferRequest, context: grpc.aio.ServicerContext
    ) -> kvd_pb2.TransferAccepted:
        return self._transfer(OpKind.LOAD, request)

    def _transfer(self, kind: OpKind, request: kvd_pb2.TransferRequest) -> kvd_pb2.TransferAccepted:
        stamps = DaemonStages(received_ns=time.monotonic_ns())  # the handler's first act: the stage "received"
        service, ref = self._svc(), _ref(request)
        service.heartbeat(ref)  # the session and its key before any per-block work
        in_step = InStep(request.in_step.slot, request.in_step.base) if request.HasField("in_step") else None
        blocks = _blocks(request)
        op = start_transfer(service, kind, ref, blocks, request.ready_event, request.client_tag, stamps, in_step)
        return kvd_pb2.TransferAccepted(operation_id=op)

    async def Watch(
        self, request: kvd_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kvd_pb2.CompletionNotice]:
        try:
            notices = self._svc().watch(_ref(request))
        except KvdError as exc:
            await context.abort(*status_of(exc))
            return
        # Headers go out now, so the client knows the stream is live before the first notice.
        await context.send_initial_metadata(())
        async for notice in notices:
            yield _notice(notice)

    @_mapped
    async def Stats(self, request: kvd_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> kvd_pb2.StatsResponse:
        snap = self._svc().stats()
        c = snap.counters
        return kvd_pb2.StatsResponse(
            boot_id=snap.boot_id,
            version=snap.version,
            uptime_s=snap.uptime_s,
            sessions=[_session_stats(s) for s in snap.sessions],
            tiers=[_tier_stats(t) for t in snap.tiers],
            tier_counters=snap.tier_counters,
            lookups=c.lookups,
            lookup_blocks=c.lookup_blocks,
            lookup_hit_blocks=c.lookup_hit_blocks,
            saves_ok=c.saves_ok,
            saves_failed=c.saves_failed,
            loads_ok=c.loads_ok,
            loads_failed=c.loads_failed,
            bytes_saved=c.bytes_saved,
            bytes_loaded=c.bytes_loaded,
            load_hit_blocks=c.load_hit_blocks,
            load_miss_blocks=c.load_miss_blocks,
            ring_records=c.ring_records,
            ring_refused=c.ring_refused,
        )


# -- value types -> protobuf -------------------------------------------------------------------------------------


def _notice(notice: Notice) -> kvd_pb2.CompletionNotice:
    return kvd_pb2.CompletionNotice(
        operation_id=notice.operation_id,
        ok=notice.ok,
        failed_block_hashes=notice.failed_hashes,
        error=notice.error,
        client_tag=notice.client_tag,
        bytes_moved=notice.bytes_moved,
        duration_us=notice.duration_us,
        done_event=notice.done_event,
        stages=_stages(notice.stages),
        refused_status=notice.refused_status,
    )


def _session_stats(s: SessionSnapshot) -> kvd_pb2.SessionStats:
    return kvd_pb2.SessionStats(
        session_id=s.label,
        tenant=s.tenant,
        worker_name=s.worker_name,
        namespace=kvd_pb2.Namespace(
            model_id=s.namespace.model_id,
            layout_fingerprint=s.namespace.layout_fingerprint,
            tp_rank=s.namespace.tp_rank,
            tp_world_size=s.namespace.tp_world_size,
        ),
        pid=max(0, s.pid),
        transport=s.transport,
        ring=s.ring,
        saves=s.saves,
        loads=s.loads,
        in_flight=s.in_flight,
    )


def _tier_stats(t: TierSnapshot) -> kvd_pb2.TierStats:
    return kvd_pb2.TierStats(
        tier=kvd_pb2.Tier.ValueType(t.tier),
        name=t.name,
        capacity_bytes=t.capacity_bytes,
        used_bytes=t.used_bytes,
        blocks=t.blocks,
        hits=t.hits,
        misses=t.misses,
        evictions=t.evictions,
        corrupt=t.corrupt,
        healthy=t.healthy,
    )


# -- protobuf -> value types (every field checked here or in the dataclasses' own __post_init__) ----------------


def _ref(
    request: kvd_pb2.HeartbeatRequest
    | kvd_pb2.UnregisterRequest
    | kvd_pb2.LookupRequest
    | kvd_pb2.TransferRequest
    | kvd_pb2.WatchRequest,
) -> SessionRef:
    return SessionRef(request.session_id, request.session_key)


def _namespace(ns: kvd_pb2.Namespace) -> Namespace:
    if not ns.layout_fingerprint:
        raise InvalidArgument("namespace.layout_fingerprint is empty")
    if len(ns.model_id.encode()) > MAX_MODEL_ID_BYTES or len(ns.layout_fingerprint.encode()) > MAX_FINGERPRINT_BYTES:
        raise InvalidArgument(
            f"namespace.model_id is at most {MAX_MODEL_ID_BYTES} bytes and its layout_fingerprint"
            f" {MAX_FINGERPRINT_BYTES}"
        )
    return Namespace(
        model_id=ns.model_id,
        layout_fingerprint=ns.layout_fingerprint,
        tp_rank=ns.tp_rank,
        tp_world_size=ns.tp_world_size or 1,
    )


def _layout(layout: kvd_pb2.KvLayout) -> KvLayout:
    if len(layout.layers) > MAX_LAYERS:
        raise InvalidArgument(f"a KV layout has at most {MAX_LAYERS} layers, got {len(layout.layers)}")
    layers = []
    for layer in layout.layers:
        if len(layer.name.encode()) > MAX_NAME_BYTES or len(layer.shape) > MAX_DIMS:
            raise InvalidArgument(f"a layer's name is at most {MAX_NAME_BYTES} bytes and its shape {MAX_DIMS} dims")
        try:
            dtype = DType(layer.dtype)
        except ValueError:
            raise InvalidArgument(f"layer {layer.name!r}: unknown dtype {layer.dtype}") from None
        layers.append(LayerLayout(name=layer.name, shape=tuple(layer.shape), dtype=dtype, block_dim=layer.block_dim))
    return KvLayout(layers=tuple(layers), block_size_tokens=layout.block_size_tokens)


def _memory(request: kvd_pb2.RegisterSessionRequest, fds: PassedFds) -> WorkerMemory | None:
    which = request.WhichOneof("memory")
    if which == "cpu":
        return CpuMemory(layers=tuple(CpuRegion(address=r.address, nbytes=r.nbytes) for r in request.cpu.layers))
    if which == "cuda":
        cuda = request.cuda
        if not cuda.device_uuid:
            raise InvalidArgument("cuda.device_uuid is empty")
        allocations = [_allocation(i, a, fds.count) for i, a in enumerate(cuda.allocations)]
        layers = []
        for i, layer in enumerate(cuda.layers):
            if layer.allocation >= len(allocations):
                raise InvalidArgument(f"layer {i}: allocation {layer.allocation} does not exist")
            if layer.offset + layer.nbytes > allocations[layer.allocation].nbytes:
                raise InvalidArgument(f"layer {i}: bytes [{layer.offset}, +{layer.nbytes}) overrun its allocation")
            layers.append(CudaLayer(allocation=layer.allocation, offset=layer.offset, nbytes=layer.nbytes))
        return CudaMemory(cuda.device_uuid, tuple(allocations), tuple(layers), fds)
    return None


def _allocation(index: int, a: kvd_pb2.CudaAllocation, passed_fds: int) -> CudaAllocation:
    """An IPC-handle allocation, or a driver-mapped one whose chunks tile [0, nbytes) exactly."""
    if not a.vmm_chunks:
        if len(a.ipc_handle) != IPC_HANDLE_BYTES:
            raise InvalidArgument(f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(a.ipc_handle)}")
        return CudaAllocation(ipc_handle=a.ipc_handle, nbytes=a.nbytes)
    if a.ipc_handle:
        raise InvalidArgument(f"allocation {index}: an IPC handle and driver-mapped chunks at once")
    chunks, end = [], 0
    for c in a.vmm_chunks:
        if c.offset != end or c.nbytes == 0:
            raise InvalidArgument(f"allocation {index}: chunks must tile it from 0 without gaps or overlaps")
        if c.fd_index >= passed_fds:
            raise InvalidArgument(f"allocation {index}: descriptor {c.fd_index} was not passed ({passed_fds} were)")
        chunks.append(VmmChunk(offset=c.offset, nbytes=c.nbytes, fd_index=c.fd_index))
        end += c.nbytes
    if end != a.nbytes:
        raise InvalidArgument(f"allocation {index}: chunks cover {end} bytes, the allocation says {a.nbytes}")
    return CudaAllocation(ipc_handle=b"", nbytes=a.nbytes, vmm_chunks=tuple(chunks))



def _blocks(request: kvd_pb2.TransferRequest) -> BlockBatch:
    """The request's blocks as two columns, from either form on the wire."""
    if request.blocks:
        if request.block_indices or request.block_hashes:
            raise InvalidArgument("a request carries its blocks as `blocks` or as columns, not both")
        return BlockBatch([b.block_index for b in request.blocks], [b.block_hash for b in request.blocks])
    return BlockBatch(list(request.block_indices), list(request.block_hashes))


def _stages(stamps: DaemonStages | None) -> kvd_pb2.OperationStages | None:
    """The notice's stage times, stamped `sent` now: the Watch stream is about to write it."""
    if stamps is None:
        return None
    return kvd_pb2.OperationStages(**{**dataclasses.asdict(stamps), "sent_ns": time.monotonic_ns()})

