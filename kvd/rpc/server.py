"""The daemon's lifecycle: startup -> serve -> shutdown, in that order, with all state in one object.

    startup:  listen (health NOT_SERVING) -> host pool + transports (pinned pool; slow for GiBs) -> SERVING, READY=1
    serve:    until SIGTERM / SIGINT (a second one skips the drain)
    shutdown: NOT_SERVING -> refuse new operations, drain in-flight ones -> close sessions -> stop listening

`KvdServer(config)` builds a real server that tests run on a temporary socket; `run_server(config)` is `kvd serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kvd_client._wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

from kvd.config import KvdConfig
from kvd.engine.engine import Engine
from kvd.metrics import Metrics
from kvd.rpc.credentials import CredentialIssuer, _remove_stale_socket
from kvd.rpc.servicer import KvdServicer
from kvd.service.service import KvdService
from kvd.tiers.build import build_store
from kvd.tiers.host import HostPool

log = logging.getLogger(__name__)

SERVICE_NAME = kvd_pb2.DESCRIPTOR.services_by_name["Kvd"].full_name
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


class KvdServer:
    def __init__(self, config: KvdConfig) -> None:
        self.config = config
        self.health = health.aio.HealthServicer()
        self.credentials = CredentialIssuer(config.credential_socket, config.socket_mode)
        self.servicer = KvdServicer(self.credentials)
        self.server: grpc.aio.Server | None = None
        self.pool: HostPool | None = None
        self.engine: Engine | None = None
        self.service: KvdService | None = None
        self.metrics: Metrics | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._monitor: asyncio.Task[None] | None = None
        self._bound = False  # only a daemon that bound the socket may remove it (never a live one's)

    # -- startup -------------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        config = self.config
        self.server = grpc.aio.server(options=CHANNEL_OPTIONS)
        kvd_pb2_grpc.add_KvdServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        socket_path = config.socket
        socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        _remove_stale_socket(socket_path)
        old = os.umask(0o777 & ~config.socket_mode)  # born with its final mode: never briefly world-connectable
        try:
            self.server.add_insecure_port(f"unix:{socket_path}")
            self._bound = True
        finally:
            os.umask(old)
        if config.tcp:
            self.server.add_insecure_port(config.tcp)
            log.warning("also listening on TCP %s (no peer credentials there: CUDA IPC sessions only)", config.tcp)
        await self.server.start()
        os.chmod(socket_path, config.socket_mode)
        await self.credentials.start()
        log.info("listening on %s (mode %o); allocating the host pool", socket_path, config.socket_mode)

        self.metrics = _start_metrics(config)
        self.pool = HostPool(config.host_pool)
        self.engine = Engine(config, self.pool)
        await self.engine.start()
        store = build_store(config, self.pool)
        self.service = KvdService(config, self.engine, store, self.metrics)
        await self.service.start()
        self.servicer.service = self.service
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._monitor = asyncio.create_task(self._watch_tiers(), name="kvd-tier-monitor")
        _sd_notify("READY=1\nSTATUS=serving")
        log.info("kvd ready: boot id %s, host pool %.2f GiB", self.service.boot_id, self.pool.capacity_bytes / 2**30)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_tiers(self) -> None:
        """Publish each tier's health as its own health service, `kvd.v1.Kvd/tier/<name>`: a degraded tier (Redis
        down) is visible to probes while the daemon itself stays SERVING from the other tiers."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        while self.service is not None:
            for tier in self.service.store.snapshots():
                await self.health.set(f"{SERVICE_NAME}/tier/{tier.name}", serving if tier.healthy else not_serving)
                if self.metrics is not None:
                    self.metrics.set_tier_health(tier.name, tier.healthy)
            if self.metrics is not None and self.pool is not None:
                self.metrics.set_pinned_bytes(self.pool.used_bytes, self.pool.capacity_bytes)
            await asyncio.sleep(1.0)

    # -- serve ---------------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if self._stopping:
            log.warning("second stop signal: exiting without draining")
            os._exit(1)
        self._stopping = True
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.startup()
            await self._stop.wait()
        finally:
            await self.shutdown()

    # -- shutdown ------------------------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        _sd_notify("STOPPING=1")
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.health.enter_graceful_shutdown()
        log.info("shutting down: draining")
        if self.service is not None:
            await self.service.drain(self.config.drain_timeout_s)
        if self.server is not None:
            await self.server.stop(grace=min(5.0, self.config.drain_timeout_s))
        await self.credentials.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self.pool is not None:
            with contextlib.suppress(BufferError):
                self.pool.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self._bound:
            Path(self.config.socket).unlink(missing_ok=True)
        log.info("stopped")


def _start_metrics(config: KvdConfig) -> Metrics | None:
    metrics = Metrics()
    metrics.start(config.metrics)
    return metrics


def _sd_notify(state: str) -> None:
    """systemd's readiness protocol (Type=notify): one datagram to $NOTIFY_SOCKET; a no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(state.encode(), address)


def run_server(config: KvdConfig) -> int:
    """`kvd serve`: run until stopped; exit code 0 on a clean stop."""
    import uvloop

    sys.setswitchinterval(config.engine.gil_switch_interval_us / 1e6)
    server = KvdServer(config)
    try:
        uvloop.run(server.serve())
    except RuntimeError as exc:
        log.error("kvd: %s", exc)
        return 1
    return 0
