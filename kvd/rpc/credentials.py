"""Peer credentials for registration: who is on the other end, from the kernel, bound to the process itself.

grpc does not expose the connecting socket, so SO_PEERCRED cannot be read on the gRPC socket itself. Workers
therefore first connect to a small credential socket next to it. For each connection the daemon takes the peer's
process (a pidfd from the same connection) and the uid and gid the kernel recorded (kvd.process.PeerProcess), checks
that the uid may register at all, and answers with a random single-use token bound to that process. RegisterSession
presents the token; the session belongs to that process and uid, never to a pid or uid the request claims.

A refusal is one line instead of a token, `KVDERR <STATUS> <message>`, then the connection closes (a token never
starts that way). Tokens are bounded: per uid and in total (RESOURCE_EXHAUSTED), and each lives TOKEN_TTL_S seconds.
After a token, a worker with driver-mapped KV memory passes its descriptors on the same connection
(kvd_client.fdpass); they are bound to the token and handed over with it. A registered worker may instead ask for
its session's shared resources (a grant request naming the session and its key); that connection's token is spent
on the request, and `grantor` decides it for the process on the connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvd_client.credentials import REFUSAL_PREFIX, TOKEN_BYTES
from kvd_client.fdpass import GRANT_MAGIC

from kvd.errors import KvdError, PermissionDenied, ResourceExhausted
from kvd.logs import Throttled
from kvd.process import PeerProcess
from kvd.rpc import fd_channel
from kvd.types import PassedFds

log = logging.getLogger(__name__)
_refusals = Throttled(log, interval_s=60.0)  # a peer that connects in a loop costs one line a minute

TOKEN_TTL_S = 60.0


@dataclass(frozen=True, slots=True)
class TokenLimits:
    per_uid: int  # outstanding (issued, not yet redeemed or expired) tokens of one uid
    total: int  # outstanding tokens of every uid together


@dataclass(slots=True)
class _Issued:
    peer: PeerProcess
    at: float
    fds: PassedFds = field(default_factory=PassedFds)  # descriptors passed with the token (driver-mapped memory)
    exchanged: asyncio.Event = field(default_factory=asyncio.Event)  # set once the descriptor exchange is over

    def close(self) -> None:
        self.peer.close()
        self.fds.close()


class CredentialIssuer:
    def __init__(self, path: Path, mode: int, may_register: Callable[[int], bool], limits: TokenLimits) -> None:
        self.path = path
        self._mode = mode
        self._may_register = may_register
        self._limits = limits
        self._tokens: dict[bytes, _Issued] = {}
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._server: asyncio.Server | None = None
        self._warn = Throttled(log)
        self.grantor: fd_channel.Grantor | None = None  # what a session's process may map (set once serving)

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
        for token in list(self._tokens):
            self._drop(token)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                token = self._issue(writer.get_extra_info("socket"))
            except KvdError as exc:
                _refusals.warning("refused", "credential socket: refused: %s", exc.message)
                writer.write(REFUSAL_PREFIX + f"{exc.code.name} {exc.message}\n".encode())
                await writer.drain()
                return
            try:
                fd_channel.pause(writer)
                writer.write(token)
                await writer.drain()
                await self._after_token(token, writer)
            finally:
                self._exchanged(token)
        except OSError as exc:  # FdPassError included: nothing of the exchange is kept
            self._warn.warning("peer", "credential socket: %s", exc)
        finally:
            writer.close()

    async def _after_token(self, token: bytes, writer: asyncio.StreamWriter) -> None:
        """Descriptors of KV memory bound to the token, or a grant request (the token is spent on it), or nothing."""
        follows = await fd_channel.what_follows(writer)
        if follows == GRANT_MAGIC:
            issued = self._tokens.get(token)
            if issued is None:
                return  # expired meanwhile
            self._drop(token, close=False)
            try:
                await fd_channel.serve_grant(writer, issued.peer, self.grantor)
            finally:
                issued.close()
        elif follows:
            self._keep_fds(token, await fd_channel.receive_after_token(writer))

    def _exchanged(self, token: bytes) -> None:
        issued = self._tokens.get(token)
        if issued is not None:
            issued.exchanged.set()

    def _keep_fds(self, token: bytes, fds: list[int]) -> None:
        issued = self._tokens.get(token)
        if issued is None:  # redeemed or expired meanwhile: nobody will take them
            PassedFds(fds).close()
        elif fds:
            issued.fds = PassedFds(fds)
            log.info("credential socket: %d descriptors of driver-mapped memory bound to the token", len(fds))

    def _issue(self, sock: socket.socket) -> bytes:
        self._expire()
        peer = PeerProcess.of_connection(sock)
        try:
            if not self._may_register(peer.uid):
                raise PermissionDenied(
                    f"uid {peer.uid} may not register (allowed: root, the daemon's user, allowed_uids)"
                )
            if self._per_uid[peer.uid] >= self._limits.per_uid:
                raise ResourceExhausted(
                    f"uid {peer.uid} holds {self._per_uid[peer.uid]} unredeemed credential tokens"
                    f" (max_tokens_per_uid); each expires {TOKEN_TTL_S:.0f} s after it was issued"
                )
            if len(self._tokens) >= self._limits.total:
                raise ResourceExhausted(
                    f"{len(self._tokens)} unredeemed credential tokens on this daemon (max_tokens); retry shortly"
                )
        except BaseException:
            peer.close()
            raise
        token = secrets.token_bytes(TOKEN_BYTES)
        while token.startswith(REFUSAL_PREFIX):
            token = secrets.token_bytes(TOKEN_BYTES)
        self._tokens[token] = _Issued(peer, time.monotonic())
        self._per_uid[peer.uid] += 1
        log.debug("credential socket: peer pid %d uid %d gid %d", peer.pid, peer.uid, peer.gid)
        return token

    async def redeem(self, token: bytes) -> tuple[PeerProcess, PassedFds]:
        """The process a token was issued to, and the descriptors it passed with it; the caller owns both from now
        on. Each token works once and for TOKEN_TTL_S seconds. The worker may register as soon as the daemon has
        acknowledged its descriptors, a moment before they are bound to the token: wait for the exchange to end."""
        self._expire()
        issued = self._tokens.get(token)
        if issued is not None and not issued.exchanged.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(issued.exchanged.wait(), fd_channel.FD_WAIT_S + 1.0)
        issued = self._tokens.pop(token, None)  # again: a twin registration may have taken it meanwhile
        if issued is None:
            raise PermissionDenied("unknown, used or expired credential token: connect to the credential socket again")
        self._uncount(issued.peer.uid)
        return issued.peer, issued.fds

    @property
    def outstanding(self) -> int:
        return len(self._tokens)

    def _expire(self) -> None:
        cutoff = time.monotonic() - TOKEN_TTL_S
        for token in [t for t, issued in self._tokens.items() if issued.at < cutoff]:
            self._drop(token)

    def _drop(self, token: bytes, close: bool = True) -> None:
        issued = self._tokens.pop(token)
        self._uncount(issued.peer.uid)
        if close:
            issued.close()

    def _uncount(self, uid: int) -> None:
        self._per_uid[uid] -= 1
        if self._per_uid[uid] <= 0:
            del self._per_uid[uid]

