"""The daemon's end of the descriptor exchanges on the credential socket (protocol: kvd_client.fdpass).

After the token is written, a worker may pass descriptors of its driver-mapped KV memory (before registering), or ask
for descriptors of its session's shared resources (a grant request, after registering), or close the connection.
What follows the token is read with recv/recvmsg on a duplicate of the connection's socket in a worker thread
(asyncio's streams drop ancillary data), while the connection's transport is paused so that asyncio reads nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvd_client.fdpass import close_fds, read_grant_request, receive_fds, send_grant_reply

from kvd.errors import KvdError, Unimplemented, status_of
from kvd.process import PeerProcess

FD_WAIT_S = 5.0  # how long a worker may take to pass its descriptors (or send its request) after the token


@dataclass(frozen=True, slots=True)
class Granted:
    """Descriptors for a worker, one per GRANT_* bit of `what` in bit order; the channel closes them once sent. With
    `hold`, the connection then stays open as the worker's lease until that event is set (the session ended) or the
    worker hangs up."""

    what: int
    fds: tuple[int, ...]
    hold: asyncio.Event | None = None


# (session id, session key, GRANT_* bits wanted, the process on the connection) -> what it gets; raises KvdError
Grantor = Callable[[str, bytes, int, PeerProcess], Granted]


def pause(writer: asyncio.StreamWriter) -> None:
    """Before the token is written: keep asyncio from reading what the worker sends next."""
    transport: Any = writer.transport
    transport.pause_reading()


def _duplicate(writer: asyncio.StreamWriter) -> socket.socket:
    raw = writer.get_extra_info("socket")
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    sock.settimeout(FD_WAIT_S)
    return sock


async def what_follows(writer: asyncio.StreamWriter) -> bytes:
    """The first 4 bytes the worker sent after the token, left unread (kvd_client.fdpass.MAGIC or GRANT_MAGIC), or
    b"" when it closed the connection (or sent nothing in time)."""
    sock = _duplicate(writer)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, _peek, sock)
    finally:
        sock.close()


def _peek(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL)
    except TimeoutError:
        return b""


async def receive_after_token(writer: asyncio.StreamWriter) -> list[int]:
    """The descriptors the worker passes (the caller's to close), or [] when it closes the connection instead."""
    sock = _duplicate(writer)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, receive_fds, sock)
    finally:
        sock.close()


async def serve_grant(writer: asyncio.StreamWriter, peer: PeerProcess, grantor: Grantor | None) -> None:
    """Read a grant request, decide it on the event loop (`grantor`), and answer: the descriptors, or the status and
    message of the KvdError that refused it."""
    loop = asyncio.get_running_loop()
    sock = _duplicate(writer)
    try:
        session_id, key, want = await loop.run_in_executor(None, read_grant_request, sock)
        try:
            if grantor is None:
                raise Unimplemented("this daemon grants no shared resources")
            granted = grantor(session_id, key, want, peer)
        except KvdError as exc:
            code, message = status_of(exc)
            await loop.run_in_executor(None, send_grant_reply, sock, int(code.value[0]), 0, [], message)
            return
        try:
            await loop.run_in_executor(None, send_grant_reply, sock, 0, granted.what, list(granted.fds))
        finally:
            close_fds(granted.fds)  # the worker has its own copies now (or never will)
        if granted.hold is not None:
            await _hold(sock, granted.hold)
    finally:
        sock.close()


async def _hold(sock: socket.socket, ended: asyncio.Event) -> None:
    """Keep the connection (the worker's lease on us) until the session ends or the worker hangs up."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    hangup = asyncio.ensure_future(loop.sock_recv(sock, 1))
    end = asyncio.ensure_future(ended.wait())
    try:
        await asyncio.wait({hangup, end}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (hangup, end):
            task.cancel()
        await asyncio.gather(hangup, end, return_exceptions=True)
