"""Peer credentials for registration.

grpc does not expose the connecting socket, so SO_PEERCRED cannot be read on the gRPC socket itself. Workers
therefore first connect to a small credential socket next to it: the daemon reads the kernel's (pid, uid, gid) for
that connection, logs them, and answers with a random single-use token. RegisterSession presents the token, and the
session is bound to the kernel's pid, never to the pid the request claims. The CPU transport, which reads the
worker's memory by pid, requires this.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import struct
import time
from pathlib import Path

from kvd_client import fdpass

from kvd.errors import PermissionDenied
from kvd.rpc import fd_channel
from kvd.rpc.shared import GrantShared, after_token
from kvd.types import PassedFds, PeerIdentity

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
TOKEN_TTL_S = 60.0
_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket, as the kernel recorded it."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class CredentialIssuer:
    def __init__(self, path: Path, mode: int) -> None:
        self.path = path
        self._mode = mode
        self._tokens: dict[bytes, tuple[PeerIdentity, float]] = {}
        self._fds: dict[bytes, PassedFds] = {}  # descriptors passed with a token, until it is redeemed or expires
        self._server: asyncio.Server | None = None
        self.grant_shared: GrantShared | None = None  # set once the service runs

    async def start(self) -> None:
        """Listen on `path`, which the caller has cleared (kvd.rpc.socket_path)."""
        old = os.umask(0o777 & ~self._mode)  # the socket is born with its final mode: no window where it is open
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, self._mode)

    async def stop(self) -> None:
        if self._server is None:
            return  # never listened: the socket file, if any, is another daemon's
        self._server.close()
        await self._server.wait_closed()
        self.path.unlink(missing_ok=True)
        for passed in self._fds.values():
            passed.close()
        self._fds.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            pid, uid, gid = peer_credentials(sock)
            identity = PeerIdentity(pid=pid, uid=uid, gid=gid, verified=True)
            token = secrets.token_bytes(TOKEN_BYTES)
            self._expire()
            self._tokens[token] = (identity, time.monotonic())
            log.info("credential socket: peer pid %d uid %d gid %d", pid, uid, gid)
            fd_channel.pause(writer)
            writer.write(token)
            await writer.drain()
            kind = await after_token(writer, identity, self.grant_shared)
            if kind == fdpass.MAGIC:
                self._keep_fds(token, await fd_channel.receive_after_token(writer))
        except (OSError, ValueError) as exc:  # FdPassError included: nothing of the exchange is kept
            log.warning("credential socket: %s", exc)
        finally:
            writer.close()

    def _keep_fds(self, token: bytes, fds: list[int]) -> None:
        passed = PassedFds(fds)
        if token not in self._tokens:  # expired meanwhile
            passed.close()
        elif fds:
            self._fds[token] = passed
            log.info("credential socket: %d descriptors of driver-mapped memory bound to the token", len(fds))

    def take_fds(self, token: bytes) -> PassedFds:
        """The descriptors passed with `token` (redeem it first); empty when none were."""
        return self._fds.pop(token, None) or PassedFds()

    def redeem(self, token: bytes) -> PeerIdentity:
        """The identity a token was issued to. Each token works once and for TOKEN_TTL_S seconds."""
        self._expire()
        entry = self._tokens.pop(token, None)
        if entry is None:
            raise PermissionDenied("unknown, used or expired credential token: connect to the credential socket again")
        return entry[0]

    def _expire(self) -> None:
        cutoff = time.monotonic() - TOKEN_TTL_S
        for token in [t for t, (_, at) in self._tokens.items() if at < cutoff]:
            del self._tokens[token]
        for token in [t for t in self._fds if t not in self._tokens]:
            self._fds.pop(token).close()
