"""The session's shared memory, handed over on the credential socket after registration (SCM_RIGHTS).

After RegisterSession a client connects to the credential socket again, reads the token the daemon sends every
connection (unused here), and asks for its session's shared memory:

    request   b"KVSH", uint16 id length, uint16 key length, the session id (ASCII), the session key
    reply     b"KVSH", uint32 status (0: granted), uint32 what (GRANT_* bits), uint32 length, then `length` bytes:
              a refusal's message, or nothing; the descriptors ride on the reply as ancillary data, in GRANT_* order

The daemon checks the session key (the session's capability) and that the connecting process (SO_PEERCRED, held by a
pidfd) is the session's own, and passes read-only descriptors of its tenant's namespace group's index only. It then
keeps the connection open for the session's life: the client's end hanging
up means the daemon is gone (or dropped the session), which is how a worker waiting on an in-step load, or holding a
mapped index, learns of a daemon's death at once, whatever its pid namespace.

Both halves live here so they cannot drift apart. Pure stdlib, blocking sockets with timeouts, off the model thread.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from kvd_client.credentials import TOKEN_BYTES, credential_socket_path

MAGIC = b"KVSH"
REQUEST = struct.Struct("<4sHH")
REPLY = struct.Struct("<4sIII")
MAX_SESSION_ID = 256
MAX_SESSION_KEY = 256
MAX_MESSAGE = 4096
GRANT_INDEX = 1  # the namespace group's published index (read-only memfd)
GRANT_PROGRESS = 2  # the session's progress page for in-step loads (kvd_client.progress; read-write memfd)
GRANT_WAKE = 4  # the eventfd the daemon writes after each layer of an in-step load
MAX_FDS = 4


class SharedRefused(ConnectionError):
    """The daemon refused the request (no such session, not the session's process), or the exchange broke."""


@dataclass
class Grant:
    """What the daemon handed over; the caller owns the descriptors and the lease socket."""

    what: int
    fds: list[int] = field(default_factory=list)
    lease: socket.socket | None = None

    def take(self, bit: int) -> int:
        """The descriptor for GRANT_* `bit` (ownership passes to the caller), or -1."""
        if not self.what & bit:
            return -1
        position = bin(self.what & (bit - 1)).count("1")
        fd, self.fds[position] = self.fds[position], -1
        return fd

    def close(self) -> None:
        """Close every descriptor not taken, and the lease."""
        for fd in self.fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds = []
        if self.lease is not None:
            self.lease.close()
            self.lease = None


def fetch_shared(socket_path: Path, session_id: str, session_key: bytes, timeout_s: float) -> Grant:
    """Ask the daemon for this session's shared memory (blocking; off the model thread)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(str(credential_socket_path(socket_path)))
        _recv_exactly(sock, TOKEN_BYTES)
        ident = session_id.encode()
        sock.sendall(REQUEST.pack(MAGIC, len(ident), len(session_key)) + ident + session_key)
        grant = _receive_grant(sock)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    sock.setblocking(False)
    grant.lease = sock
    return grant


def _receive_grant(sock: socket.socket) -> Grant:
    space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    data, ancillary, flags, _ = sock.recvmsg(REPLY.size, space)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    grant = Grant(0, list(fds))
    try:
        if len(data) != REPLY.size or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise SharedRefused("truncated reply from the daemon")
        magic, status, what, length = REPLY.unpack(data)
        if magic != MAGIC or length > MAX_MESSAGE:
            raise SharedRefused("malformed reply from the daemon")
        message = _recv_exactly(sock, length).decode(errors="replace") if length else ""
        if status != 0:
            raise SharedRefused(message or f"refused (status {status})")
        if bin(what).count("1") != len(grant.fds):
            raise SharedRefused("the daemon's descriptors do not match its reply")
        grant.what = what
    except BaseException:
        grant.close()
        raise
    return grant


def read_request(data: bytes) -> tuple[str, bytes] | None:
    """(session id, session key) once `data` holds a whole request; None while it is incomplete. Raises ValueError
    for anything that is not a request."""
    if len(data) < REQUEST.size:
        return None
    magic, id_length, key_length = REQUEST.unpack_from(data)
    if magic != MAGIC or not 0 < id_length <= MAX_SESSION_ID or key_length > MAX_SESSION_KEY:
        raise ValueError("not a shared-memory request")
    end = REQUEST.size + id_length + key_length
    if len(data) < end:
        return None
    ident = data[REQUEST.size : REQUEST.size + id_length].decode("ascii")
    return ident, data[REQUEST.size + id_length : end]


def request_bytes(data: bytes) -> int:
    """How many bytes the request whose header `data` starts with takes in all (at least the header's)."""
    if len(data) < REQUEST.size:
        return REQUEST.size
    _, id_length, key_length = REQUEST.unpack_from(data)
    return REQUEST.size + id_length + key_length


def send_reply(sock: socket.socket, what: int, fds: list[int], status: int = 0, message: str = "") -> None:
    """The daemon's reply (descriptors stay open here; the caller closes its copies)."""
    body = message.encode()[:MAX_MESSAGE]
    header = REPLY.pack(MAGIC, status, what, len(body))
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([header], ancillary)
    if body:
        sock.sendall(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise SharedRefused("the daemon closed the connection")
        data += chunk
    return data
