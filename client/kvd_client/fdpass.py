"""File descriptors over the credential socket (SCM_RIGHTS): how a worker hands kvd its driver-mapped KV memory.

Both halves of the exchange live here so they cannot drift apart. After the daemon has sent the credential token,
a worker with descriptors to pass sends them in messages of at most `FDS_PER_MESSAGE`, each a 12-byte header
`b"KVFD"`, count in this message, total (little-endian uint32s) with the descriptors as ancillary data; the daemon
answers `b"KVFD"` and the total once it holds them all, and binds them to the token it just issued. A worker with
nothing to pass closes the connection after reading the token, as before, so older clients are unaffected.

The other direction uses the same connection: after registering, a worker that wants descriptors *from* the daemon
(its tenant's published index, kvd_client.lookups; its progress page for in-step loads, kvd_client.progress; its
submission ring, kvd_client.ring; its completion queue, kvd_client.completions) reads the token as always, then
sends a grant request instead,

    request   b"KVGR", uint32 want (GRANT_* bits), uint16 id length, uint16 key length, session id, session key
    reply     b"KVGR", uint32 status (0: granted, else a gRPC status code), uint32 what (GRANT_* bits granted),
              uint32 length, then `length` bytes: a refusal's message; the descriptors ride on the reply as
              ancillary data, one per bit of `what`, in bit order

and the daemon hands them only to the session's own process holding the session's key. The token of that connection
is spent on it: it never registers anything. A grant of the index or the progress page keeps the connection open
for the session's life, as the worker's lease: its end hanging up means the daemon is gone or dropped the session
(how a worker waiting on an in-step load learns of a daemon's death at once, whatever its pid namespace).

Pure stdlib, blocking sockets with timeouts: the worker calls it off the model thread, the daemon in a worker
thread per connection.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

MAGIC = b"KVFD"
FDS_PER_MESSAGE = 250  # under the kernel's SCM_MAX_FD (253)
MAX_FDS = 65536  # per registration: a 2 MiB granularity maps 128 GiB with this many
_HEADER = struct.Struct("<4sII")
_ACK = struct.Struct("<4sI")

GRANT_MAGIC = b"KVGR"
GRANT_INDEX = 1 << 0  # the tenant's namespace group's published index: a read-only sealed memfd (kvd_client.index)
GRANT_PROGRESS = 1 << 1  # the session's progress page for in-step loads (kvd_client.progress): a memfd
GRANT_WAKE = 1 << 2  # the eventfd the daemon writes after each layer of an in-step load
GRANT_SHARED = GRANT_INDEX | GRANT_PROGRESS | GRANT_WAKE  # granted together, with the lease
GRANT_RING = 1 << 3  # the session's submission ring: a sealed memfd (kvd_client.ring)
GRANT_DOORBELL = 1 << 4  # the ring's doorbell: the write end of a pipe
GRANT_COMPLETIONS = 1 << 5  # the session's completion queue: a read-only sealed memfd (kvd_client.completions)
GRANT_COMPLETION_WAKE = 1 << 6  # the read end of the pipe the daemon writes after each completion record
GRANT_QUEUE = GRANT_COMPLETIONS | GRANT_COMPLETION_WAKE  # granted together
MAX_GRANT_FDS = 8
MAX_SESSION_ID = 256
MAX_SESSION_KEY = 64
MAX_GRANT_MESSAGE = 4096
_GRANT_REQUEST = struct.Struct("<4sIHH")
_GRANT_REPLY = struct.Struct("<4sIII")


class FdPassError(ConnectionError):
    """The descriptor exchange broke off or was malformed; no descriptor of it was kept."""


def send_fds(sock: socket.socket, fds: Sequence[int]) -> None:
    """Pass `fds` (they stay open here) and wait for the daemon's acknowledgement."""
    if not fds:
        return
    if len(fds) > MAX_FDS:
        raise FdPassError(f"{len(fds)} descriptors, more than the {MAX_FDS} a registration may pass")
    for start in range(0, len(fds), FDS_PER_MESSAGE):
        batch = list(fds[start : start + FDS_PER_MESSAGE])
        header = _HEADER.pack(MAGIC, len(batch), len(fds))
        sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch).tobytes())])
    ack = recv_exactly(sock, _ACK.size, "the acknowledgement of the descriptors")
    magic, total = _ACK.unpack(ack)
    if magic != MAGIC or total != len(fds):
        raise FdPassError(f"the daemon acknowledged {total} descriptors of {len(fds)}")


def receive_fds(sock: socket.socket) -> list[int]:
    """The descriptors a worker passes after its token, or [] when it closes the connection instead. On any error
    every descriptor received so far is closed and FdPassError raised. The caller owns what is returned."""
    received: list[int] = []
    try:
        total = _receive_all(sock, received)
        if received:
            sock.sendall(_ACK.pack(MAGIC, total))
        return received
    except BaseException:
        close_fds(received)
        raise


def _receive_all(sock: socket.socket, received: list[int]) -> int:
    total = 0
    space = socket.CMSG_SPACE(FDS_PER_MESSAGE * array.array("i").itemsize)
    while True:
        data, ancillary, flags, _ = sock.recvmsg(_HEADER.size, space)
        got = _fds_of(ancillary)
        received.extend(got)  # first: they must be closed even if the header is bad
        if not data:
            if received:
                raise FdPassError("the worker closed the connection in the middle of the descriptor exchange")
            return 0  # the worker had nothing to pass
        total = _announced(data, flags, len(got), total)
        if len(received) == total:
            return total
        if len(received) > total:
            raise FdPassError("more descriptors than announced")


def _announced(data: bytes, flags: int, got: int, total: int) -> int:
    """The total a header announces, after checking it against the message it came with."""
    if len(data) != _HEADER.size or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        raise FdPassError("truncated descriptor message")
    magic, count, announced = _HEADER.unpack(data)
    if magic != MAGIC or not 0 < announced <= MAX_FDS or not 0 < count <= FDS_PER_MESSAGE:
        raise FdPassError("malformed descriptor message")
    if count != got or (total and announced != total):
        raise FdPassError("descriptor count does not match the header")
    return int(announced)


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def recv_exactly(sock: socket.socket, n: int, what: str) -> bytes:
    """`n` bytes from the daemon; ConnectionError if it closes the connection before sending `what`."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"the credential socket closed before sending {what}")
        data += chunk
    return data


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- descriptors from the daemon: grants ---------------------------------------------------------------------------


@dataclass
class Grant:
    """What the daemon handed over; the caller owns the descriptors (`take` them, `close` the rest) and the lease
    (the connection, held open by the daemon for a GRANT_SHARED grant)."""

    what: int
    fds: list[int] = field(default_factory=list)
    lease: socket.socket | None = None

    def take(self, bit: int) -> int:
        """The descriptor for GRANT_* `bit` (now the caller's), or -1."""
        if not self.what & bit:
            return -1
        position = bin(self.what & (bit - 1)).count("1")
        fd, self.fds[position] = self.fds[position], -1
        return fd

    def close(self) -> None:
        """Close every descriptor not taken, and the lease."""
        close_fds([fd for fd in self.fds if fd >= 0])
        self.fds = []
        if self.lease is not None:
            self.lease.close()
            self.lease = None


class GrantRefused(ConnectionError):
    """The daemon refused a grant request (`status`: its gRPC status code), or the exchange broke off (status 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def send_grant_request(sock: socket.socket, session_id: str, session_key: bytes, want: int) -> None:
    ident = session_id.encode()
    if len(ident) > MAX_SESSION_ID or len(session_key) > MAX_SESSION_KEY:
        raise GrantRefused("session id or key too long for a grant request")
    sock.sendall(_GRANT_REQUEST.pack(GRANT_MAGIC, want, len(ident), len(session_key)) + ident + session_key)


def read_grant_request(sock: socket.socket) -> tuple[str, bytes, int]:
    """(session id, session key, GRANT_* bits wanted), every length bounded before it is read."""
    magic, want, id_len, key_len = _GRANT_REQUEST.unpack(recv_exactly(sock, _GRANT_REQUEST.size, "a grant request"))
    if magic != GRANT_MAGIC or id_len > MAX_SESSION_ID or key_len > MAX_SESSION_KEY:
        raise FdPassError("malformed grant request")
    body = recv_exactly(sock, id_len + key_len, "a grant request") if id_len + key_len else b""
    try:
        session_id = body[:id_len].decode("ascii")
    except UnicodeDecodeError:
        raise FdPassError("a session id is ASCII") from None
    return session_id, body[id_len:], want


def send_grant_reply(sock: socket.socket, status: int, what: int, fds: Sequence[int], message: str = "") -> None:
    """The daemon's answer (the descriptors stay open here: the caller closes its copies)."""
    body = message.encode()[:MAX_GRANT_MESSAGE]
    header = _GRANT_REPLY.pack(GRANT_MAGIC, status, what, len(body))
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([header], ancillary)
    if body:
        sock.sendall(body)


def receive_grant_reply(sock: socket.socket) -> Grant:
    """The descriptors granted; GrantRefused (every descriptor received closed) for a refusal or a broken reply."""
    data, ancillary, flags, _ = sock.recvmsg(_GRANT_REPLY.size, socket.CMSG_SPACE(MAX_GRANT_FDS * 4))
    grant = Grant(0, _fds_of(ancillary))
    try:
        if len(data) != _GRANT_REPLY.size or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise GrantRefused("truncated grant reply")
        magic, status, what, length = _GRANT_REPLY.unpack(data)
        if magic != GRANT_MAGIC or length > MAX_GRANT_MESSAGE:
            raise GrantRefused("malformed grant reply")
        message = recv_exactly(sock, length, "a refusal").decode(errors="replace") if length else ""
        if status:
            raise GrantRefused(message or f"refused with status {status}", status)
        if bin(what).count("1") != len(grant.fds):
            raise GrantRefused("the daemon's descriptors do not match its grant")
        grant.what = what
    except BaseException:
        grant.close()
        raise
    return grant
