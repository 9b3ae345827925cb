"""Where the caller's saves and loads go: the session's submission ring (kvd_client.ring) when it has one and the
request fits a slot, straight from the caller's thread; otherwise the client's loop thread sends a Save/Load RPC.

The ring is asked for once per session, right after RegisterSession, on the loop thread; it goes when the session
ends (before its operations are failed) and a new session gets a new one. A daemon that offers none, a refusal, or a
machine the ring does not support: every request goes by RPC, as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from kvd_client import ring as ring_format
from kvd_client.credentials import take_grant
from kvd_client.fdpass import GRANT_DOORBELL, GRANT_RING
from kvd_client.messages import PendingOp, SessionRef
from kvd_client.ring import RingWriter
from kvd_client.types import OpKind

log = logging.getLogger(__name__)


class Submissions:
    def __init__(self, by_rpc: Callable[[PendingOp], None], enabled: bool = True) -> None:
        """`by_rpc`: hands an operation to the loop thread for a Save/Load RPC (from the caller's thread)."""
        self._by_rpc = by_rpc
        self._ring: RingWriter | None = None
        self.enabled = enabled  # False: every request by RPC (benchmarks compare both paths on one session)
        self.ring_count = 0  # requests submitted through a ring, ever
        self.rpc_count = 0  # ... by RPC
        self.rings = 0  # rings this client was granted (one per session that got one)

    @property
    def has_ring(self) -> bool:
        return self._ring is not None

    def submit(self, op: PendingOp) -> None:
        """From the caller's thread: publish on the ring (GIL held throughout, no hop), else hand to the loop."""
        ring = self._ring
        if ring is not None and self.enabled and op.blocks and op.in_step is None:  # a record has no in-step entry
            indices, hashes = zip(*op.blocks, strict=True)
            kind = ring_format.SAVE if op.kind is OpKind.SAVE else ring_format.LOAD
            op.send_ns = time.monotonic_ns()
            if ring.publish(kind, op.op_id, op.ready_event, indices, hashes):
                self.ring_count += 1
                return
            op.send_ns = 0
        self.rpc_count += 1
        self._by_rpc(op)

    async def open_ring(self, socket_path: Path, session: SessionRef, timeout_s: float) -> None:
        """Ask the daemon for this session's ring (on the loop thread, right after registering). Any failure leaves
        the client on RPCs, logged once."""
        if not ring_format.supported():
            return
        writer = await take_grant(
            socket_path, session.id, session.key, GRANT_RING | GRANT_DOORBELL, timeout_s,
            lambda grant: RingWriter(grant.take(GRANT_RING), grant.take(GRANT_DOORBELL)),
            "submission ring", "saves and loads go by RPC",
        )  # fmt: skip
        if writer is None:
            return
        self.detach()
        self._ring = writer
        self.rings += 1

    def detach(self) -> None:
        """Drop the ring (the session ended): waits for a publish under way, then unmaps it."""
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()
