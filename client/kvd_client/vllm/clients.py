"""The kvd client the connector talks through, and the registry that lets both roles of one process share it.

With a single-process executor (CPU, TP=1) the scheduler and the worker live in one process. The daemon allows a
process one session per namespace, so the scheduler reuses the worker's client for its lookups. The worker's client
is published first: vLLM initialises the KV caches before it builds the scheduler.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvd_client import Completion, LookupResult


class ClientLike(Protocol):
    """The slice of `kvd_client.KvdClient` the connector uses (a Protocol, so unit tests can hand in a fake)."""

    @property
    def ready(self) -> bool: ...

    def register_kv_caches(
        self, kv_caches: Mapping[str, Any], *, block_dim: int, block_size_tokens: int
    ) -> None: ...

    def release_memory(self) -> None: ...

    def start(self) -> None: ...

    def lookup(self, block_hashes: Sequence[bytes]) -> Future[LookupResult]: ...

    def save(self, blocks: Sequence[tuple[int, bytes]], *, ready_event: bytes = b"") -> int: ...

    def load(self, blocks: Sequence[tuple[int, bytes]], *, in_step: Any = None) -> int: ...

    def wait(self, op_ids: Iterable[int], timeout_s: float) -> list[Completion]: ...

    def poll_finished(self) -> list[Completion]: ...

    def wait_loaded(self, completion: Completion) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """Everything a KvdClient is built from; equal specs in one process share one client."""

    socket: str
    model_id: str
    layout_fingerprint: str
    tp_rank: int
    tp_world_size: int
    worker_name: str
    timeout_s: float

    @property
    def share_key(self) -> tuple[str, str, str, int, int]:
        return (self.socket, self.model_id, self.layout_fingerprint, self.tp_rank, self.tp_world_size)


def _default_client_factory(spec: ClientSpec) -> ClientLike:
    from kvd_client import KvdClient

    return KvdClient(
        spec.socket,
        model_id=spec.model_id,
        layout_fingerprint=spec.layout_fingerprint,
        tp_rank=spec.tp_rank,
        tp_world_size=spec.tp_world_size,
        worker_name=spec.worker_name,
        timeout_s=spec.timeout_s,
    )


# Tests replace this to run the connector against a fake client.
client_factory: Callable[[ClientSpec], ClientLike] = _default_client_factory

_shared_lock = threading.Lock()
_shared: dict[tuple[str, str, str, int, int], tuple[ClientLike, int]] = {}


def acquire(spec: ClientSpec) -> ClientLike | None:
    """The client another role of this process published for `spec`, now with one more user; None if none."""
    with _shared_lock:
        entry = _shared.get(spec.share_key)
        if entry is None:
            return None
        _shared[spec.share_key] = (entry[0], entry[1] + 1)
        return entry[0]


def publish(spec: ClientSpec, client: ClientLike) -> None:
    with _shared_lock:
        _shared.setdefault(spec.share_key, (client, 1))


def release(spec: ClientSpec, client: ClientLike) -> None:
    """Close `client` once its last user lets go of it."""
    with _shared_lock:
        entry = _shared.get(spec.share_key)
        if entry is not None and entry[0] is client:
            if entry[1] > 1:
                _shared[spec.share_key] = (client, entry[1] - 1)
                return
            del _shared[spec.share_key]
    client.close()


def lookup_client(spec: ClientSpec) -> ClientLike:
    """The scheduler's client: the worker's one when this process has it, else a lookup-only one of its own."""
    client = acquire(spec)
    if client is None:
        client = client_factory(spec)
        client.start()
        publish(spec, client)
    return client
