"""The client's value types."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import asdict, dataclass, field, fields
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


@dataclass(slots=True)
class DaemonStages:
    """When each stage of an operation happened inside the daemon, in time.monotonic_ns() (kvd.v1.OperationStages).
    The daemon stamps one of these as the operation goes (mutable on purpose: each stage is stamped by the one
    thread that reaches it, one after the other); a client gets its copy in the completion notice."""

    received_ns: int = 0  # the Save/Load handler began
    planned_ns: int = 0  # the block store planned it
    submitted_ns: int = 0  # handed to the transport
    enqueue_start_ns: int = 0  # its copy job began (CUDA: queueing GPU work; CPU: the first copy call)
    enqueue_end_ns: int = 0  # CUDA: all of it queued; CPU: the first copy call began
    copy_done_ns: int = 0  # the bytes were in place (CUDA: the completion waiter saw the last event)
    resumed_ns: int = 0  # the event loop took the operation back
    queued_ns: int = 0  # the notice was queued on the session's Watch stream
    sent_ns: int = 0  # the Watch stream took the notice to send it


DAEMON_STAGES = tuple(f.name.removesuffix("_ns") for f in fields(DaemonStages))  # in path order


@dataclass(frozen=True, slots=True)
class OperationStages:
    """When each stage of one save or load happened, in time.monotonic_ns() (CLOCK_MONOTONIC: system-wide on Linux,
    so the client's and the daemon's stamps share one clock). 0: not reached or not recorded. For diagnostics and
    benchmarks: `intervals()` says where an operation's time went.

    Client: call (save()/load() entered), loop (the client's thread picked it up), send (request built, sent),
    accepted (the daemon's TransferAccepted arrived; 0 if the notice came first), notice (the completion notice
    arrived). Daemon: `daemon` (DaemonStages)."""

    call_ns: int = 0
    loop_ns: int = 0
    send_ns: int = 0
    accepted_ns: int = 0
    notice_ns: int = 0
    daemon: DaemonStages = field(default_factory=DaemonStages)

    # Every operation's path, stage by stage.
    ORDER: ClassVar[tuple[str, ...]] = ("call", "loop", "send", *DAEMON_STAGES, "notice")

    def stamp(self, stage: str) -> int:
        """The time of a stage of ORDER (or "accepted")."""
        return int(getattr(self.daemon if stage in DAEMON_STAGES else self, f"{stage}_ns"))

    def intervals(self) -> dict[str, int]:
        """Nanoseconds from each recorded stage to the next recorded one along ORDER ("send->received": ...), plus
        "total" (call->notice) and "rpc" (send->accepted: the Save/Load round trip)."""
        out: dict[str, int] = {}
        last: tuple[str, int] | None = None
        for name in self.ORDER:
            stamp = self.stamp(name)
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
        """Every stamp by field name, the daemon's included."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "daemon"}
        return {**own, **asdict(self.daemon)}


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


def session_label(session_id: str) -> str:
    """The short name a session goes by in the daemon's Stats and log: a digest of its id, never the id itself."""
    return "s-" + hashlib.blake2b(session_id.encode(), digest_size=4).hexdigest()
