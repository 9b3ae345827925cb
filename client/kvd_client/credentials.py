"""The worker's half of the peer-credential handshake (see kvd.rpc.credentials) and the ptrace grant.

Both run once per registration, off the model thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from kvd_client.errors import KvdError, error_of
from kvd_client.fdpass import GRANT_SHARED, Grant, receive_grant_reply, send_fds, send_grant_request

TOKEN_BYTES = 32
REFUSAL_PREFIX = b"KVDERR "  # instead of a token: "KVDERR <STATUS> <message>" (a token never starts so)
MAX_REFUSAL_BYTES = 4096
PR_SET_PTRACER = 0x59616D61  # Yama: let one named process ptrace (and process_vm_readv) us
_UCRED = struct.Struct("3i")


def credential_socket_path(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".cred")


def fetch_token(socket_path: Path, timeout_s: float, fds: Sequence[int] = ()) -> tuple[bytes, int]:
    """A single-use token bound by the daemon to this process (and its uid), and the daemon's pid as this process's
    pid namespace sees it (from SO_PEERCRED of the same connection). `fds` (driver-mapped KV memory) are passed on the
    same connection and bound to the token (kvd_client.fdpass). A refusal (a uid that may not register, too many
    tokens outstanding) raises its KvdError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(credential_socket_path(socket_path)))
        daemon_pid, _, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        token = _read_token(sock)
        send_fds(sock, fds)
    return token, daemon_pid


_T = TypeVar("_T")
log = logging.getLogger(__name__)


async def take_grant(
    socket_path: Path, session_id: str, session_key: bytes, want: int, timeout_s: float,
    make: Callable[[Grant], _T], what: str, instead: str,
) -> _T | None:  # fmt: skip
    """A grant of the session's shared memory, fetched off the loop, made into `make`'s object (which takes its
    descriptors); None when the daemon refuses or what came is unusable, logged once: the caller goes on without it
    (`instead` says how)."""
    loop = asyncio.get_running_loop()
    try:
        grant = await loop.run_in_executor(None, fetch_grant, socket_path, session_id, session_key, want, timeout_s)
    except (OSError, KvdError) as exc:  # GrantRefused is an OSError
        log.info("kvd: no %s (%s); %s", what, exc, instead)
        return None
    try:
        return make(grant)
    except (OSError, ValueError) as exc:
        log.info("kvd: unusable %s (%s); %s", what, exc, instead)
        return None
    finally:
        grant.close()


def fetch_grant(socket_path: Path, session_id: str, session_key: bytes, want: int, timeout_s: float) -> Grant:
    """Descriptors of the session's shared resources (GRANT_* bits `want`), from the daemon (kvd_client.fdpass);
    for GRANT_SHARED bits the connection comes with them as the grant's lease (non-blocking). Raises GrantRefused,
    OSError, or the KvdError of a credential-socket refusal."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(str(credential_socket_path(socket_path)))
        _read_token(sock)  # every connection gets one; this one's is spent on the grant
        send_grant_request(sock, session_id, session_key, want)
        grant = receive_grant_reply(sock)
    except BaseException:
        sock.close()
        raise
    if not grant.what & GRANT_SHARED:
        sock.close()
        return grant
    sock.setblocking(False)
    grant.lease = sock
    return grant


def _read_token(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < TOKEN_BYTES and (chunk := sock.recv(TOKEN_BYTES - len(data))):
        data += chunk
    if data.startswith(REFUSAL_PREFIX):  # the daemon's reason, to the end of the connection
        while len(data) < MAX_REFUSAL_BYTES and (chunk := sock.recv(4096)):
            data += chunk
        code, _, message = data[len(REFUSAL_PREFIX) :].decode(errors="replace").strip().partition(" ")
        raise error_of(getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN), f"credential socket: {message}")
    if len(data) != TOKEN_BYTES:
        raise ConnectionError("credential socket closed before sending a token")
    return data


def allow_ptrace(daemon_pid: int) -> None:
    """Let the daemon copy our KV tensors with process_vm_readv/writev. Without Yama (EINVAL) the kernel's default
    rule (same uid, or CAP_SYS_PTRACE) already decides, so that is not an error."""
    if daemon_pid <= 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(daemon_pid), 0, 0, 0)
