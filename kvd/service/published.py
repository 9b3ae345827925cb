"""The service's side of the published index: which index a registration feeds, and what a session may map."""

from __future__ import annotations

from kvd_client.fdpass import GRANT_INDEX, GRANT_PROGRESS, GRANT_QUEUE, GRANT_WAKE
from kvd_client.layout import KvLayout

from kvd.errors import FailedPrecondition
from kvd.memory.completions import CompletionWriter
from kvd.memory.index_registry import IndexRegistry
from kvd.memory.progress import LayerProgress, ProgressWriter
from kvd.service.sessions import Session
from kvd.tiers.store import BlockStore
from kvd.types import InStep, Registration, SharedGrant


def publish_namespace(
    indexes: IndexRegistry | None, store: BlockStore, registration: Registration, ns_key: str
) -> None:
    """Give a memory session's namespace group (in its tenant) its published index, with what the tiers already
    hold of the namespace `ns_key` (a disk tier kept from before a restart, blocks saved by an earlier session)."""
    if indexes is None or registration.layout is None:
        return
    tenant = registration.peer.tenant
    index, first = indexes.attach(tenant, registration.namespace, registration.layout.block_bytes)
    if index is not None and first:
        for block_hash, source in store.resident(ns_key):
            indexes.stored((ns_key, block_hash), source)


def shared_grant(indexes: IndexRegistry | None, session: Session) -> SharedGrant:
    """For the session's own process (checked by the caller, with its key): a read-only descriptor of its tenant's
    group index, if published, and for a session with KV memory its progress page and wake eventfd (in-step
    loads)."""
    reg = session.registration
    index = indexes.index_of(reg.peer.tenant, reg.namespace) if indexes is not None else None
    what, fds = 0, []
    if index is not None:
        what, fds = GRANT_INDEX, [index.open_reader_fd()]
    if session.attachment is not None:
        if session.progress is None:
            session.progress = ProgressWriter()
        what |= GRANT_PROGRESS | GRANT_WAKE
        fds += session.progress.client_fds()
    return SharedGrant(what, tuple(fds), session.ended)


def completion_grant(session: Session, slots: int) -> tuple[int, tuple[int, ...]]:
    """For the session's own process (checked by the caller, with its key): a new completion queue (a later grant
    replaces the earlier one) and its wake, as (GRANT_* bits, descriptors). Raises OSError where the kernel cannot
    make one (no sealed memfds)."""
    if session.attachment is None:
        raise FailedPrecondition("a lookup-only session neither saves nor loads: it has no completion queue")
    old, session.completions = session.completions, CompletionWriter(slots)
    if old is not None:
        old.close()
    return GRANT_QUEUE, session.completions.hand_over()


def in_step_progress(session: Session, layout: KvLayout, in_step: InStep | None) -> LayerProgress | None:
    """The progress entry an in-step load reports to (None for an ordinary load)."""
    if in_step is None:
        return None
    if session.progress is None:
        raise FailedPrecondition("an in-step load needs the session's progress page: ask for its shared memory first")
    session.progress.check_slot(in_step.slot)
    return LayerProgress(session.progress, in_step.slot, in_step.base, len(layout.layers))
