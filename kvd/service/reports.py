"""What the service reports about itself: the Stats snapshot and the session gauges of the metrics endpoint."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import kvd
from kvd.service.sessions import Session
from kvd.tiers.store import BlockStore
from kvd.types import ServiceCounters, SessionSnapshot, StatsSnapshot

if TYPE_CHECKING:
    from kvd.metrics import Metrics


def stats_snapshot(
    boot_id: str, started: float, sessions: Iterable[Session], store: BlockStore, counters: ServiceCounters
) -> StatsSnapshot:
    return StatsSnapshot(
        boot_id=boot_id,
        version=kvd.__version__,
        uptime_s=int(time.monotonic() - started),
        sessions=tuple(
            SessionSnapshot(
                label=s.label,
                tenant=s.registration.peer.tenant,
                worker_name=s.registration.worker_name,
                namespace=s.registration.namespace,
                pid=s.registration.peer.pid,
                transport=s.transport,
                saves=s.saves,
                loads=s.loads,
                in_flight=s.in_flight,
                ring=s.ring,
            )
            for s in sessions
        ),
        tiers=store.snapshots(),
        counters=dataclasses.replace(counters),
        tier_counters={k: float(v) for k, v in store.counters().items()},
    )


def update_session_gauges(metrics: Metrics | None, sessions: Iterable[Session]) -> None:
    if metrics is None:
        return
    live = list(sessions)
    metrics.set_sessions(len(live))
    by_transport: dict[str, int] = {}
    for s in live:
        by_transport[s.transport] = by_transport.get(s.transport, 0) + 1
    for transport in ("cpu", "cuda_ipc", "none"):
        metrics.set_transport_sessions(transport, by_transport.get(transport, 0))
