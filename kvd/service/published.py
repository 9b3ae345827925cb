"""The service's side of the published index: which index a registration feeds, and what a session may map."""

from __future__ import annotations

from kvd_client.shared import GRANT_INDEX

from kvd.errors import PermissionDenied
from kvd.memory.index_registry import IndexRegistry
from kvd.service.sessions import Session
from kvd.tiers.store import BlockStore
from kvd.types import PeerIdentity, Registration, SharedGrant


def publish_namespace(indexes: IndexRegistry | None, store: BlockStore, registration: Registration) -> None:
    """Give a memory session's namespace group its published index, with what the tiers already hold of the
    namespace (a disk tier kept from before a restart, blocks saved by an earlier session)."""
    if indexes is None or registration.layout is None:
        return
    ns = registration.namespace
    index, first = indexes.attach(ns, registration.layout.block_bytes)
    if index is not None and first:
        for block_hash, source in store.resident(ns.key):
            indexes.stored((ns.key, block_hash), source)


def shared_grant(indexes: IndexRegistry | None, session: Session, peer: PeerIdentity) -> SharedGrant:
    """A read-only descriptor of the session's group index, if published, for the session's own process only."""
    owner = session.registration.peer
    if not owner.verified or (owner.pid, owner.uid) != (peer.pid, peer.uid):
        raise PermissionDenied("shared memory goes only to the process that registered the session")
    index = indexes.index_of(session.registration.namespace) if indexes is not None else None
    fds = (index.open_reader_fd(),) if index is not None else ()
    return SharedGrant(GRANT_INDEX if fds else 0, fds, session.ended)
