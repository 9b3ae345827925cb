"""The daemon's end of the descriptor exchange on the credential socket (protocol: kvd_client.fdpass).

After the token is written, a worker with driver-mapped KV memory passes its descriptors on the same connection;
they are read with recvmsg on a duplicate of the connection's socket in a worker thread (asyncio's streams drop
ancillary data), while the connection's transport is paused so that asyncio reads nothing from it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from kvd_client.fdpass import receive_fds

FD_WAIT_S = 5.0  # how long a worker may take to pass its descriptors after the token


def pause(writer: asyncio.StreamWriter) -> None:
    """Before the token is written: keep asyncio from reading what the worker sends next."""
    transport: Any = writer.transport
    transport.pause_reading()


async def receive_after_token(writer: asyncio.StreamWriter) -> list[int]:
    """The descriptors the worker passes (the caller's to close), or [] when it closes the connection instead."""
    raw = writer.get_extra_info("socket")
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    try:
        sock.settimeout(FD_WAIT_S)
        return await asyncio.get_running_loop().run_in_executor(None, receive_fds, sock)
    finally:
        sock.close()
