"""The daemon raises kvd's one error family, shared with the client (kvd_client.errors); a failed copy raises
TransferError, whose typed reason labels the failure in metrics."""

import enum

from kvd_client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KvdError,
    PermissionDenied,
    ResourceExhausted,
    SessionNotFound,
    Unavailable,
    Unimplemented,
    status_of,
)


class FailureReason(enum.StrEnum):
    """Why an operation (or some of its blocks) failed. The value is the `reason` label of kvd_failures_total: a
    short fixed code, never free text (the full text goes to the notice and the log)."""

    NOT_STORED = "not_stored"  # a load asked for blocks no tier has
    NO_ROOM = "host_pool_full"  # a save found no slot it could take or evict
    PROCESS_VM = "process_vm"  # CPU transport: process_vm_readv/writev failed (worker gone, no ptrace grant)
    PARTIAL_COPY = "partial_copy"  # CPU transport: fewer bytes than asked (the worker's memory changed)
    PEER_CHANGED = "peer_changed"  # the worker exec'd, exited or changed credentials: its session may not copy
    CUDA = "cuda"  # a CUDA call or a GPU copy failed
    CANCELLED = "cancelled"  # the daemon's drain ran out of time and cancelled the operation
    CONCURRENT_SAVE = "concurrent_save_failed"  # another save of the same block, which this one waited for, failed
    INTERNAL = "internal_error"  # a bug: logged with its traceback; the operation fails, the daemon serves on
    OTHER = "other"  # a copy failed in a way no transport names


class TransferError(Exception):
    """A copy between a worker's memory and a tier failed (the worker's memory vanished, an IPC error...).

    Not a KvdError: it never travels as an RPC status, only as a failed completion notice.
    """

    def __init__(self, message: str, reason: FailureReason = FailureReason.OTHER) -> None:
        super().__init__(message)
        self.reason = reason


class StartupError(Exception):
    """The daemon cannot start, for a reason its operator can fix (memory, a port, a path): one line that says what is
    wrong and what to do. `kvd serve` logs it without a traceback and exits with its documented failure code."""


__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FailureReason",
    "Internal",
    "InvalidArgument",
    "KvdError",
    "PermissionDenied",
    "ResourceExhausted",
    "SessionNotFound",
    "StartupError",
    "TransferError",
    "Unavailable",
    "Unimplemented",
    "status_of",
]
