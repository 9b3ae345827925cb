"""Which grantor answers a grant request on the credential socket (kvd.rpc.fd_channel): a session's shared memory
(GRANT_SHARED bits: its tenant's published index, its progress page and wake eventfd, kvd.service.published; the
connection then stays open as the worker's lease until the session ends), or its submission ring (kvd.rpc.ring).
Either goes only to the session's own process holding the session's key."""

from __future__ import annotations

from kvd_client.fdpass import GRANT_SHARED

from kvd.errors import InvalidArgument, Unimplemented
from kvd.process import PeerProcess
from kvd.rpc.fd_channel import Granted, Grantor
from kvd.service.published import shared_grant
from kvd.service.service import KvdService
from kvd.types import SessionRef


def grantor(service: KvdService, ring: Grantor | None) -> Grantor:
    """The credential socket's grantor: shared memory here, a ring by `ring` (None: this daemon grants none)."""

    def grant(session_id: str, key: bytes, want: int, peer: PeerProcess) -> Granted:
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
