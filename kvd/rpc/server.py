"""The gRPC listener: the kvd.v1.Kvd servicer, health and reflection on one grpc.aio server, bound to the Unix
socket (mode `socket_mode` from birth), and the credential socket next to it. There is no TCP listener: a peer there
has no kernel-verified identity (docs/security.md).

The daemon (kvd.daemon) starts it first, with health NOT_SERVING, hands it the service once everything below is
ready, and stops it last.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

from kvd.config import KvdConfig
from kvd.errors import StartupError
from kvd.rpc import shared
from kvd.rpc.credentials import CredentialIssuer, TokenLimits
from kvd.rpc.guard import DecodeGuard, max_request_bytes
from kvd.rpc.health import HealthServicer
from kvd.rpc.ring import RingGrantor, rings_supported
from kvd.rpc.servicer import KvdServicer
from kvd.rpc.socket_path import check_bindable, clear_stale_socket, prepare_socket_dir
from kvd.service.service import KvdService

log = logging.getLogger(__name__)

SERVICE_NAME = kvd_pb2.DESCRIPTOR.services_by_name["Kvd"].full_name
MAX_RESPONSE_BYTES = 64 << 20  # Stats of many sessions; every other answer is small
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RpcEndpoint:
    def __init__(self, config: KvdConfig) -> None:
        self.config = config
        self.health = HealthServicer()
        limits = TokenLimits(per_uid=config.max_tokens_per_uid, total=config.max_tokens)
        self.credentials = CredentialIssuer(config.credential_socket, config.socket_mode, config.may_register, limits)
        self.servicer = KvdServicer(self.credentials)
        self.server: grpc.aio.Server | None = None
        self._bound = False  # only a daemon that bound the socket may remove it (never a live one's)

    async def start(self) -> None:
        """Listen, NOT_SERVING: calls get UNAVAILABLE until `serve` hands over the service."""
        config = self.config
        options = [
            ("grpc.max_receive_message_length", max_request_bytes(config)),
            ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(options=options, interceptors=[DecodeGuard()])
        kvd_pb2_grpc.add_KvdServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        await self.set_serving(False)
        socket_path = config.socket
        prepare_socket_dir(socket_path)  # the credential socket goes in the same directory
        for path in (socket_path, config.credential_socket):  # both checked before either is bound
            clear_stale_socket(path)
            check_bindable(path)
        old = os.umask(0o777 & ~config.socket_mode)  # born with its final mode: never briefly world-connectable
        try:
            _bind(self.server, f"unix:{socket_path}", "--socket")
            self._bound = True
        finally:
            os.umask(old)
        await self.server.start()
        os.chmod(socket_path, config.socket_mode)
        try:
            await self.credentials.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.credential_socket}: {exc.strerror or exc}") from exc
        log.info("listening on %s (mode %o); allocating the host pool", socket_path, config.socket_mode)

    async def serve(self, service: KvdService) -> None:
        """Hand calls to `service` from now on; health turns SERVING."""
        self.servicer.service = service
        config = self.config
        ring = None
        if config.ring_slots and rings_supported():
            ring = RingGrantor(service, config.ring_slots, config.ring_slot_bytes).grant
            self.servicer.rings = True
        elif config.ring_slots:
            log.warning("no submission rings: this kernel cannot seal a memfd (saves and loads go by RPC)")
        self.credentials.grantor = shared.grantor(service, ring)
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, SERVING if serving else NOT_SERVING)

    async def set_tier_health(self, tier_name: str, healthy: bool) -> None:
        """Each tier's health is its own health service, `kvd.v1.Kvd/tier/<name>`: a degraded tier (Redis down) is
        visible to probes while the daemon itself stays SERVING from the other tiers."""
        await self.health.set(f"{SERVICE_NAME}/tier/{tier_name}", SERVING if healthy else NOT_SERVING)

    async def enter_graceful_shutdown(self) -> None:
        """Health NOT_SERVING for good (probes see the daemon leave before it stops answering)."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        if self.server is not None:
            await self.server.stop(grace=grace_s)
        await self.credentials.stop()

    def remove_socket(self) -> None:
        """Remove the socket this endpoint bound (never one it found a live daemon on)."""
        if self._bound:
            Path(self.config.socket).unlink(missing_ok=True)


def _bind(server: grpc.aio.Server, address: str, flag: str) -> None:
    """grpc reports a failed bind as a bare RuntimeError ("Failed to bind..."), its reason only in its own log."""
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        reason = "in use or not an address of this machine"
        raise StartupError(f"cannot listen on {address}: {reason}; change {flag}") from exc

