"""Which grantor answers a grant request on the credential socket (kvd.rpc.fd_channel): a session's shared memory
(GRANT_SHARED bits: its tenant's published index, its progress page and wake eventfd, kvd.service.published; the
connection then stays open as the worker's lease until the session ends), its completion queue (GRANT_QUEUE bits,
kvd.memory.completions), or its submission ring (kvd.rpc.ring). Each goes only to the session's own process holding
the session's key."""

from __future__ import annotations

from kvd_client.fdpass import GRANT_QUEUE, GRANT_SHARED

from kvd.errors import InvalidArgument, Unimplemented
from kvd.process import PeerProcess
from kvd.rpc.fd_channel import Granted, Grantor
from kvd.service.published import completion_grant, shared_grant
from kvd.service.service import KvdService
from kvd.types import SessionRef


def grantor(service: KvdService, ring: Grantor | None) -> Grantor:
    """The credential socket's grantor: shared memory here, a ring by `ring` (None: this daemon grants none)."""

    def grant(session_id: str, key: bytes, want: int, peer: PeerProcess) -> Granted:
        if want & GRANT_QUEUE:
            return queue(service, SessionRef(session_id, key), want, peer)
        if not want & GRANT_SHARED:
            if ring is None:
                raise Unimplemented("this daemon grants no submission ring")
            return ring(session_id, key, want, peer)
        if want & ~GRANT_SHARED:
            raise InvalidArgument(f"grant request for {want:#x}: ask for shared memory and a ring separately")
        session = service.session_of_process(SessionRef(session_id, key), peer)  # NOT_FOUND, PERMISSION_DENIED
        shared = shared_grant(service.indexes, session)
        return Granted(shared.what, shared.fds, shared.ended)

    return grant


def queue(service: KvdService, ref: SessionRef, want: int, peer: PeerProcess) -> Granted:
    """The session's completion queue (kvd.memory.completions), for its own process only."""
    if want != GRANT_QUEUE:
        raise InvalidArgument(f"grant request for {want:#x}: ask for a completion queue on its own")
    slots = service.config.completion_slots
    if not slots:
        raise Unimplemented("this daemon grants no completion queue")
    session = service.session_of_process(ref, peer)  # NOT_FOUND, PERMISSION_DENIED
    try:
        what, fds = completion_grant(session, slots)
    except OSError as exc:
        raise Unimplemented(f"no completion queue: {exc.strerror or exc}") from None
    return Granted(what, fds)
