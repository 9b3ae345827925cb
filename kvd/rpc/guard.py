"""What every call passes before a handler sees it: a receive limit sized from the configuration, and requests that
do not decode answered INVALID_ARGUMENT at the cost of one rate-limited log line.

grpc would parse whatever fits its receive limit (64 MiB here before: millions of hashes, seconds and hundreds of MB
for a request refused afterwards) and answer an undecodable request UNKNOWN with a traceback in the log per call. The
limit is now the largest request a valid client can send under this configuration; anything larger is refused by
grpc itself (RESOURCE_EXHAUSTED) before a byte of it is parsed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from kvd.config import KvdConfig
from kvd.logs import Throttled

log = logging.getLogger(__name__)
_throttled = Throttled(log, interval_s=60.0)

MAX_HASH_BYTES = 64  # a block hash is 1..64 bytes (kvd.proto)
MAX_LAYERS = 4096  # layers of one KV layout
MAX_NAME_BYTES = 256  # a layer's or a worker's name
MAX_DIMS = 8  # dimensions of one layer's shape
MAX_MODEL_ID_BYTES = 4096  # a namespace's model id (a model path, with its salt)
MAX_FINGERPRINT_BYTES = 256  # a namespace's layout fingerprint
_SESSION_FIELDS = 2 * (2 + 64)  # session_id and session_key, with their tags and lengths
_PER_HASH = 1 + 1 + MAX_HASH_BYTES  # tag, length, hash
_PER_BLOCK = 2 + (1 + 5) + (1 + 1 + MAX_HASH_BYTES)  # BlockTransfer: tag+length, index, hash
_PER_LAYER = (  # LayerLayout + CpuRegion or CudaLayer + CudaAllocation, each with tags and lengths
    (3 + (2 + MAX_NAME_BYTES) + (2 + 11 * MAX_DIMS) + 6 + 6) + (2 + 22) + (2 + 6 + 11 + 11) + (2 + 66 + 11)
)
_SLACK = 4096  # the remaining scalar fields of any request, and room for fields added later


def max_request_bytes(config: KvdConfig) -> int:
    """The largest request a valid client sends under `config`: a full lookup, a full transfer (plus its IPC
    event handle), or a registration of MAX_LAYERS layers."""
    lookup = config.max_lookup_blocks * _PER_HASH
    transfer = config.max_batch_blocks * _PER_BLOCK + 66
    namespace = (3 + MAX_MODEL_ID_BYTES) + (3 + MAX_FINGERPRINT_BYTES) + 12
    register = MAX_LAYERS * _PER_LAYER + namespace + 3 * (3 + MAX_NAME_BYTES)
    return max(lookup, transfer, register) + _SESSION_FIELDS + _SLACK


class _Undecodable:
    """What the guarded deserializer hands over instead of a request that did not decode: the parser's complaint as
    text only (the exception would keep the request's bytes alive through its traceback)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, and anything a parser may raise on hostile bytes
            error = f"{type(exc).__name__}: {exc}"
        return _Undecodable(error)

    return parse


async def _refuse(context: grpc.aio.ServicerContext, method: str, bad: _Undecodable) -> None:
    _throttled.warning("undecodable", "undecodable %s request: %s", method, bad.error)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not decode as {method}'s message")


def _unary_request(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request)
            async for response in behavior(request, context):
                yield response

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _refuse(context, method, request)
        result = behavior(request, context)
        return await result if isinstance(result, Awaitable) else result

    return unary


def _stream_request(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def each() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    await _refuse(context, method, request)
                yield request

        return each()

    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behavior(checked(requests, context), context):
                yield response

        return stream

    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        result = behavior(checked(requests, context), context)
        return await result if isinstance(result, Awaitable) else result

    return unary


def guarded(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that never raises and a behavior that answers INVALID_ARGUMENT for what it
    could not decode."""
    wrap = _stream_request if handler.request_streaming else _unary_request
    replaced: dict[str, Any] = {"request_deserializer": _safe(handler.request_deserializer)}
    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, name)
        if behavior is not None:
            replaced[name] = wrap(behavior, method)
    return handler._replace(**replaced)


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Every method of every service on the server (kvd.v1.Kvd, health, reflection) behind `guarded`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # no such method: grpc answers UNIMPLEMENTED
        return guarded(handler, handler_call_details.method.rsplit("/", 1)[-1])
