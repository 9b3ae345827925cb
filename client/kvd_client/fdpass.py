"""File descriptors over the credential socket (SCM_RIGHTS): how a worker hands kvd its driver-mapped KV memory.

Both halves of the exchange live here so they cannot drift apart. After the daemon has sent the credential token,
a worker with descriptors to pass sends them in messages of at most `FDS_PER_MESSAGE`, each a 12-byte header
`b"KVFD"`, count in this message, total (little-endian uint32s) with the descriptors as ancillary data; the daemon
answers `b"KVFD"` and the total once it holds them all, and binds them to the token it just issued. A worker with
nothing to pass closes the connection after reading the token, as before, so older clients are unaffected.

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

MAGIC = b"KVFD"
FDS_PER_MESSAGE = 250  # under the kernel's SCM_MAX_FD (253)
MAX_FDS = 65536  # per registration: a 2 MiB granularity maps 128 GiB with this many
_HEADER = struct.Struct("<4sII")
_ACK = struct.Struct("<4sI")


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
