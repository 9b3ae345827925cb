"""Raw-stub helpers: build RegisterSession requests by hand and collect a session's Watch notices.

The client library does all of this for a worker; tests of the wire contract need to do it themselves so they can
send what a correct client never would (a wrong layout, a reused token, an address of 0...). A session-scoped request
names its session by the RegisterSessionResponse (id and key) or, to name one that does not exist, by an id alone.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from kvd_client.credentials import allow_ptrace, fetch_token
from kvd_client.layout import DType, KvLayout, LayerLayout
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

from tests.helpers.kvdata import BLOCK_DIM, CacheSpec

DTYPE_BF16 = kvd_pb2.DTYPE_BFLOAT16
Session = kvd_pb2.RegisterSessionResponse | str  # a registered session, or just an id (no key)
M = TypeVar("M", kvd_pb2.HeartbeatRequest, kvd_pb2.UnregisterRequest, kvd_pb2.WatchRequest, kvd_pb2.LookupRequest)


def scoped(message: type[M], session: Session, **fields: Any) -> M:
    """A session-scoped request for `session`: its id and, for a registered one, its key."""
    if isinstance(session, str):
        return message(session_id=session, **fields)
    return message(session_id=session.session_id, session_key=session.session_key, **fields)


def kv_layout(spec: CacheSpec) -> KvLayout:
    """The layout KvdClient.register_kv_caches derives from `make_caches(spec)` with block_size_tokens=block_size."""
    return KvLayout(
        layers=tuple(LayerLayout(name, spec.layer_shape, DType.BFLOAT16, BLOCK_DIM) for name in spec.layer_names),
        block_size_tokens=spec.block_size,
    )


def fingerprint(spec: CacheSpec) -> str:
    return kv_layout(spec).fingerprint()


def layout_pb(spec: CacheSpec) -> kvd_pb2.KvLayout:
    return kvd_pb2.KvLayout(
        layers=[
            kvd_pb2.LayerLayout(name=name, shape=spec.layer_shape, dtype=DTYPE_BF16, block_dim=BLOCK_DIM)
            for name in spec.layer_names
        ],
        block_size_tokens=spec.block_size,
    )


def namespace_pb(model_id: str, layout_fingerprint: str, tp_rank: int = 0, tp_world_size: int = 1) -> kvd_pb2.Namespace:
    return kvd_pb2.Namespace(
        model_id=model_id, layout_fingerprint=layout_fingerprint, tp_rank=tp_rank, tp_world_size=tp_world_size
    )


def cpu_memory_pb(caches: dict[str, torch.Tensor]) -> kvd_pb2.CpuMemory:
    return kvd_pb2.CpuMemory(
        layers=[kvd_pb2.CpuRegion(address=t.data_ptr(), nbytes=t.numel() * t.element_size()) for t in caches.values()]
    )


def token(socket: Path) -> bytes:
    """A fresh single-use credential token for this process, and the ptrace grant the CPU transport needs."""
    value, daemon_pid = fetch_token(socket, timeout_s=5.0)
    allow_ptrace(daemon_pid)
    return value


def cpu_register_request(
    socket: Path,
    spec: CacheSpec,
    caches: dict[str, torch.Tensor],
    model_id: str,
    *,
    with_token: bool = True,
    worker_name: str = "raw-test",
) -> kvd_pb2.RegisterSessionRequest:
    """What KvdClient sends for CPU caches: namespace, layout, memory regions and a credential token."""
    return kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb(model_id, fingerprint(spec)),
        layout=layout_pb(spec),
        pid=os.getpid(),
        credential_token=token(socket) if with_token else b"",
        cpu=cpu_memory_pb(caches),
        worker_name=worker_name,
    )


def lookup_only_request(
    socket: Path | None, model_id: str, layout_fingerprint: str
) -> kvd_pb2.RegisterSessionRequest:
    """A lookup-only session of this process (a credential token from `socket`; None: no token, refused)."""
    return kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb(model_id, layout_fingerprint),
        pid=os.getpid(),
        credential_token=token(socket) if socket is not None else b"",
        worker_name="raw-lookup",
    )


def transfer(session: Session, pairs: Iterable[tuple[int, bytes]], tag: int = 0) -> kvd_pb2.TransferRequest:
    request = kvd_pb2.TransferRequest(
        blocks=[kvd_pb2.BlockTransfer(block_index=i, block_hash=h) for i, h in pairs], client_tag=tag
    )
    if isinstance(session, str):
        request.session_id = session
    else:
        request.session_id, request.session_key = session.session_id, session.session_key
    return request


def lookup_hits(
    stub: kvd_pb2_grpc.KvdStub, socket: Path, model_id: str, layout_fingerprint: str, hashes: Sequence[bytes]
) -> int:
    """Register a throwaway lookup-only session, look `hashes` up, unregister: the stored prefix length."""
    reg = stub.RegisterSession(lookup_only_request(socket, model_id, layout_fingerprint), timeout=5)
    try:
        return int(stub.Lookup(scoped(kvd_pb2.LookupRequest, reg, block_hashes=hashes), timeout=5).hit_blocks)
    finally:
        stub.Unregister(scoped(kvd_pb2.UnregisterRequest, reg), timeout=5)


class Watcher:
    """A session's Watch stream, read on a thread; `wait(operation_id)` returns that operation's notice."""

    def __init__(self, stub: kvd_pb2_grpc.KvdStub, session: Session) -> None:
        self._call = stub.Watch(scoped(kvd_pb2.WatchRequest, session))
        self._call.initial_metadata()  # the daemon sends headers once the stream is live: no notice is missed
        self._notices: dict[int, kvd_pb2.CompletionNotice] = {}
        self._by_tag: dict[int, kvd_pb2.CompletionNotice] = {}  # every notice by its client tag (last one wins)
        self._cond = threading.Condition()
        self.ended: queue.Queue[grpc.RpcError | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True, name="kvd-test-watch")
        self._thread.start()

    def _read(self) -> None:
        try:
            for notice in self._call:
                with self._cond:
                    if notice.operation_id:  # 0: a ring record refused before it became an operation
                        self._notices[notice.operation_id] = notice
                    self._by_tag[notice.client_tag] = notice
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            self.ended.put(exc)
            return
        self.ended.put(None)

    def wait(self, operation_id: int, timeout: float = 10.0) -> kvd_pb2.CompletionNotice:
        return self._wait(self._notices, operation_id, timeout, f"operation {operation_id}")

    def wait_tag(self, tag: int, timeout: float = 10.0) -> kvd_pb2.CompletionNotice:
        """The notice with client tag `tag` (a submission ring's record carries its tag, never an operation id)."""
        return self._wait(self._by_tag, tag, timeout, f"tag {tag}")

    def _wait(
        self, table: dict[int, kvd_pb2.CompletionNotice], key: int, timeout: float, what: str
    ) -> kvd_pb2.CompletionNotice:
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in table:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no completion notice for {what} within {timeout:.1f}s")
                self._cond.wait(left)
            return table.pop(key)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=5)


class RawSession:
    """A CPU session registered by hand from this process, with its Watch stream; unregistered on close."""

    def __init__(self, stub: kvd_pb2_grpc.KvdStub, response: kvd_pb2.RegisterSessionResponse) -> None:
        self.stub = stub
        self.response = response
        self.id = response.session_id
        self.watcher = Watcher(stub, response)

    def save(self, pairs: Iterable[tuple[int, bytes]], timeout: float = 10.0) -> kvd_pb2.CompletionNotice:
        accepted = self.stub.Save(transfer(self.response, pairs), timeout=5)
        return self.watcher.wait(accepted.operation_id, timeout)

    def load(self, pairs: Iterable[tuple[int, bytes]], timeout: float = 10.0) -> kvd_pb2.CompletionNotice:
        accepted = self.stub.Load(transfer(self.response, pairs), timeout=5)
        return self.watcher.wait(accepted.operation_id, timeout)

    def lookup(self, hashes: Sequence[bytes]) -> int:
        request = scoped(kvd_pb2.LookupRequest, self.response, block_hashes=hashes)
        return int(self.stub.Lookup(request, timeout=5).hit_blocks)

    def close(self) -> None:
        try:
            self.stub.Unregister(scoped(kvd_pb2.UnregisterRequest, self.response), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # already gone (lease, reaper): nothing to undo
                raise
        finally:
            self.watcher.close()

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
