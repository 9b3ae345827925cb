"""kvd's one error family.

The daemon raises these below its rpc layer; the rpc layer turns them into gRPC status codes with `status_of`, and
the client turns a status code back into the same class with `from_rpc_error`. This module is the only place that
knows the mapping, so the two sides cannot drift apart.
"""

from __future__ import annotations

import grpc


class KvdError(Exception):
    """Base of every kvd error. `code` is the gRPC status code it travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KvdError):
    """The request itself is wrong: a block index out of range, a malformed handle, a layout mismatch."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class SessionNotFound(KvdError):
    """No such session: never registered, unregistered, or its lease expired. Register again."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(KvdError):
    """This worker already holds a live session for the same namespace."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(KvdError):
    """The caller may not do this: its peer credentials do not match, or the transport needs a local peer."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(KvdError):
    """Too many operations in flight, a batch over the limit, or no room left in the tier."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(KvdError):
    """The system is not in a state for this call, e.g. the worker's memory is gone."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(KvdError):
    """The daemon is not reachable, not ready yet, or draining. Retry later; meanwhile recompute."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(KvdError):
    """The call did not complete in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(KvdError):
    """This daemon does not support the requested feature (e.g. a transport it was built without)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(KvdError):
    """A bug in kvd. The daemon keeps serving; the operation failed."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[KvdError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        SessionNotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Unimplemented,
        Internal,
    )
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status an exception travels as. Anything outside the family is an internal error."""
    if isinstance(error, KvdError):
        return error.code, error.message
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def from_rpc_error(error: grpc.RpcError) -> KvdError:
    """The kvd exception for a failed RPC (use as `raise from_rpc_error(e) from None`)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_of(code, details or code.name)


def error_of(code: grpc.StatusCode, message: str) -> KvdError:
    """The kvd exception for a status code (from an RPC, or named in a credential-socket refusal)."""
    cls = _BY_CODE.get(code, KvdError)
    if code == grpc.StatusCode.CANCELLED:
        cls = Unavailable
    exc = cls(message)
    exc.code = code
    return exc
