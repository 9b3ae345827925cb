"""What a client sends on the credential socket after its token: nothing (it closes), the descriptors of its KV
memory (kvd_client.fdpass, before registering), or a request for its session's shared memory (kvd_client.shared,
after registering). For the last, the service decides what the session's process may map, the descriptors go over
SCM_RIGHTS, and the connection then stays open as the session's lease until the session ends or the client hangs up.

asyncio's streams drop ancillary data, so this reads and writes a duplicate of the connection's socket (the
connection's transport is paused: asyncio reads nothing from it), blocking calls in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from kvd_client import shared

from kvd.errors import KvdError, status_of
from kvd.process import PeerProcess
from kvd.types import SessionRef, SharedGrant

log = logging.getLogger(__name__)

WAIT_S = 5.0  # how long a client may take to send what follows its token
GrantShared = Callable[[SessionRef, PeerProcess], SharedGrant]


async def after_token(writer: asyncio.StreamWriter, peer: PeerProcess, grant_shared: GrantShared | None) -> bytes:
    """Serve a shared-memory request if that is what follows the token; else the 4 bytes that do (b"" for nothing),
    unread, for the caller (the descriptor exchange)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
    try:
        sock.settimeout(WAIT_S)
        try:
            magic = await loop.run_in_executor(None, sock.recv, 4, socket.MSG_PEEK | socket.MSG_WAITALL)
        except TimeoutError:
            return b""
        if magic != shared.MAGIC or grant_shared is None:
            return magic
        session_id, key = await loop.run_in_executor(None, _read_request, sock)
        try:
            grant = grant_shared(SessionRef(session_id, key), peer)
        except KvdError as exc:
            code, message = status_of(exc)
            shared.send_reply(sock, 0, [], status=int(code.value[0]), message=message)
            return b""
        try:
            shared.send_reply(sock, grant.what, list(grant.fds))
        finally:
            for fd in grant.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        await _hold(sock, grant.ended)
        return b""
    finally:
        sock.close()


def _read_request(sock: socket.socket) -> tuple[str, bytes]:
    data = b""
    while (parsed := shared.read_request(data)) is None:
        chunk = sock.recv(shared.request_bytes(data) - len(data))
        if not chunk:
            raise ConnectionError("the client hung up in the middle of its request")
        data += chunk
    return parsed


async def _hold(sock: socket.socket, ended: asyncio.Event) -> None:
    """Keep the connection (the client's lease on us) until the session ends or the client hangs up."""
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
