"""Opening a session: a channel to the daemon's Unix socket; then proving who we are on the credential socket (the
daemon reads SO_PEERCRED there and answers with a single-use token), letting the daemon read our memory if the CPU
transport will, and RegisterSession."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc

from kvd_client.credentials import allow_ptrace, fetch_token
from kvd_client.errors import from_rpc_error
from kvd_client.messages import SessionRef, scoped
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def open_channel(socket_path: Path) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)


async def register_session(
    channel: grpc.aio.Channel,
    socket_path: Path,
    timeout_s: float,
    build_request: Callable[[bytes], kvd_pb2.RegisterSessionRequest],
    grant_ptrace: bool,
    fds: Sequence[int] = (),
) -> tuple[kvd_pb2_grpc.KvdStub, kvd_pb2.RegisterSessionResponse]:
    """The stub and the daemon's answer; a refusal raises its KvdError (logged once here).

    Args:
        build_request: the request, given the credential token.
        grant_ptrace: let the daemon's pid read and write our memory (the CPU transport needs it).
        fds: file descriptors of driver-mapped KV memory, passed with the token (they stay open here).
    """
    await asyncio.wait_for(channel.channel_ready(), timeout=timeout_s)
    stub = kvd_pb2_grpc.KvdStub(channel)
    loop = asyncio.get_running_loop()
    token, daemon_pid = await loop.run_in_executor(None, fetch_token, socket_path, timeout_s, list(fds))
    if grant_ptrace:
        allow_ptrace(daemon_pid)
    try:
        response = await stub.RegisterSession(build_request(token), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        error = from_rpc_error(exc)
        log.warning("kvd registration refused: %s: %s", type(error).__name__, error.message)
        raise error from None
    return stub, response


async def heartbeat(
    stub: kvd_pb2_grpc.KvdStub,
    session: SessionRef,
    boot_id: str,
    every_s: float,
    timeout_s: float,
    after_beat: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Beat every `every_s` until the daemon answers with another boot id (it restarted: the session and everything
    in flight are gone); a failed call raises. `after_beat` runs after each beat the daemon answered."""
    while True:
        await asyncio.sleep(every_s)
        response = await stub.Heartbeat(scoped(kvd_pb2.HeartbeatRequest, session), timeout=timeout_s)
        if response.boot_id != boot_id:
            return
        if after_beat is not None:
            await after_beat()
