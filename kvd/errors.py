"""The daemon raises kvd's one error family, shared with the client (kvd_client.errors)."""

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


class TransferError(Exception):
    """A copy between a worker's memory and a tier failed (the worker's memory vanished, an IPC error...).

    Not a KvdError: it never travels as an RPC status, only as a failed completion notice.
    """


__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "KvdError",
    "PermissionDenied",
    "ResourceExhausted",
    "SessionNotFound",
    "TransferError",
    "Unavailable",
    "Unimplemented",
    "status_of",
]
