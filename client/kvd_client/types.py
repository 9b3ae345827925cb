"""The client's value types."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import ClassVar


class OpKind(enum.StrEnum):
    SAVE = "save"
    LOAD = "load"


class Tier(enum.IntEnum):
    """Numbered as kvd.v1.Tier."""

    UNSPECIFIED = 0
    HOST_MEMORY = 1
    DISK = 2
    REMOTE = 3


@dataclass(frozen=True, slots=True)
class LookupResult:
    hit_blocks: int
    tiers: tuple[Tier, ...]


# The daemon's stages, in order, as kvd.v1.OperationStages names them (without "_ns").
DAEMON_STAGES = (
    "received",
    "planned",
    "submitted",
    "enqueue_start",
    "enqueue_end",
    "copy_done",
    "resumed",
    "queued",
    "sent",
)


@dataclass(frozen=True, slots=True)
class OperationStages:
    """When each stage of one save or load happened, in time.monotonic_ns() (CLOCK_MONOTONIC: system-wide on Linux,
    so the client's and the daemon's stamps share one clock). 0: not reached or not recorded. For diagnostics and
    benchmarks: `intervals()` says where an operation's time went.

    Client: call (save()/load() entered), loop (the client's thread picked it up), send (request built, sent),
    accepted (the daemon's TransferAccepted arrived), notice (the completion notice arrived). Daemon: DAEMON_STAGES."""

    call_ns: int = 0
    loop_ns: int = 0
    send_ns: int = 0
    accepted_ns: int = 0
    received_ns: int = 0
    planned_ns: int = 0
    submitted_ns: int = 0
    enqueue_start_ns: int = 0
    enqueue_end_ns: int = 0
    copy_done_ns: int = 0
    resumed_ns: int = 0
    queued_ns: int = 0
    sent_ns: int = 0
    notice_ns: int = 0

    # Every operation's path, stage by stage.
    ORDER: ClassVar[tuple[str, ...]] = ("call", "loop", "send", *DAEMON_STAGES, "notice")

    def intervals(self) -> dict[str, int]:
        """Nanoseconds from each recorded stage to the next recorded one along ORDER ("send->received": ...), plus
        "total" (call->notice) and "rpc" (send->accepted: the Save/Load round trip)."""
        out: dict[str, int] = {}
        last: tuple[str, int] | None = None
        for name in self.ORDER:
            stamp = getattr(self, f"{name}_ns")
            if not stamp:
                continue
            if last is not None:
                out[f"{last[0]}->{name}"] = stamp - last[1]
            last = (name, stamp)
        if self.call_ns and self.notice_ns:
            out["total"] = self.notice_ns - self.call_ns
        if self.send_ns and self.accepted_ns:
            out["rpc"] = self.accepted_ns - self.send_ns
        return out

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished save or load. `failed_hashes` lists the blocks that did not make it (all of them when the daemon
    was unreachable); for a load those blocks must be recomputed."""

    op_id: int
    kind: OpKind
    ok: bool
    failed_hashes: frozenset[bytes]
    error: str = ""
    nbytes: int = 0
    duration_s: float = 0.0
    done_event: bytes = b""  # CUDA loads: wait on this before reading the blocks (KvdClient.wait_loaded does)
    stages: OperationStages | None = None  # when each stage happened (None: the daemon never saw the operation)
