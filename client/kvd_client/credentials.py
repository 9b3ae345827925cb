"""The worker's half of the peer-credential handshake (see kvd.rpc.credentials) and the ptrace grant.

Both run once per registration, off the model thread.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

from kvd_client.fdpass import recv_exactly, send_fds

TOKEN_BYTES = 32
PR_SET_PTRACER = 0x59616D61  # Yama: let one named process ptrace (and process_vm_readv) us
_UCRED = struct.Struct("3i")


def credential_socket_path(socket_path: Path) -> Path:
    return socket_path.with_name(socket_path.name + ".cred")


def fetch_token(socket_path: Path, timeout_s: float, fds: Sequence[int] = ()) -> tuple[bytes, int]:
    """A single-use token bound by the daemon to this process's kernel-verified pid, and the daemon's pid as this
    process's pid namespace sees it (from SO_PEERCRED of the same connection). `fds` (driver-mapped KV memory) are
    passed on the same connection and bound to the token (kvd_client.fdpass)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(credential_socket_path(socket_path)))
        daemon_pid, _, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        token = recv_exactly(sock, TOKEN_BYTES, "a token")
        send_fds(sock, fds)
    return token, daemon_pid


def allow_ptrace(daemon_pid: int) -> None:
    """Let the daemon copy our KV tensors with process_vm_readv/writev. Without Yama (EINVAL) the kernel's default
    rule (same uid, or CAP_SYS_PTRACE) already decides, so that is not an error."""
    if daemon_pid <= 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(daemon_pid), 0, 0, 0)
