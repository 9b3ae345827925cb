"""The composition root: builds every layer, owns their start and close, in order, with all state in one object.

    start:    rpc listening (health NOT_SERVING) -> metrics -> host pool (first touch, slow for GiBs) -> transports
              (the CUDA one page-locks the pool) -> block store (its backends) -> service -> SERVING, READY=1
    serve:    until SIGTERM / SIGINT (a second one skips the drain)
    shutdown: NOT_SERVING -> refuse new operations, drain in-flight ones -> close sessions -> block store (flush
              write-downs) -> stop listening -> transports -> pool -> metrics

`KvdDaemon(config)` builds a real daemon that tests can run on a temporary socket; `run_daemon(config)` is
`kvd serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from kvd.cli.exit_codes import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK
from kvd.config import KvdConfig, human_bytes
from kvd.errors import StartupError
from kvd.memory.host_pool import HostPool
from kvd.memory.index_registry import IndexRegistry
from kvd.metrics import Metrics
from kvd.rpc.server import RpcEndpoint
from kvd.service.service import KvdService
from kvd.tiers.build import build_store
from kvd.tiers.store import BlockStore
from kvd.transports.router import TransportRouter
from kvd.types import TransportKind

log = logging.getLogger(__name__)

TIER_HEALTH_PERIOD_S = 1.0


class KvdDaemon:
    def __init__(self, config: KvdConfig) -> None:
        self.config = config
        self.rpc = RpcEndpoint(config)
        self.pool: HostPool | None = None
        self.transports: TransportRouter | None = None
        self.store: BlockStore | None = None
        self.service: KvdService | None = None
        self.metrics: Metrics | None = None
        self.indexes: IndexRegistry | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._served = False  # only a daemon that reached SERVING says it drains and stops
        self._monitor: asyncio.Task[None] | None = None

    # -- start ---------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        await self.rpc.start()
        self.metrics = metrics = Metrics()
        metrics.start(config.metrics)
        self.pool = pool = HostPool(config.host_pool)
        await asyncio.get_running_loop().run_in_executor(None, pool.populate)  # parallel first touch
        self.transports = transports = TransportRouter(config.transports, pool.region if config.host_pool.pin else None)
        await transports.start()
        self.store = store = build_store(config, pool)
        await store.start()
        self.service = KvdService(config, transports, store, metrics)
        self.indexes = IndexRegistry(
            config.index,
            boot_id=self.service.boot_id,
            local_bytes=pool.capacity_bytes + (config.disk.capacity_bytes if config.disk.path is not None else 0),
            remote_tier=bool(config.redis.url),
            max_lookup_blocks=config.max_lookup_blocks,
        )
        store.publish_to(self.indexes)
        self.service.indexes = self.indexes
        await self.service.start()
        await self.rpc.serve(self.service)
        self._monitor = asyncio.create_task(self._watch_tiers(), name="kvd-tier-monitor")
        self._served = True
        _sd_notify("READY=1\nSTATUS=serving")
        log.info("kvd ready (boot id %s): %s", self.service.boot_id, inventory(config, pool, transports, metrics))

    async def _watch_tiers(self) -> None:
        """Publish each tier's health (a health service per tier, a gauge) and the pool's fill, every second."""
        while self.service is not None:
            for name, healthy in self.service.tier_health():
                await self.rpc.set_tier_health(name, healthy)
                if self.metrics is not None:
                    self.metrics.set_tier_health(name, healthy)
            if self.metrics is not None and self.pool is not None:
                self.metrics.set_pinned_bytes(self.pool.used_bytes, self.pool.capacity_bytes)
                if self.store is not None:
                    self.metrics.set_tier_counters(self.store.counters())
            await asyncio.sleep(TIER_HEALTH_PERIOD_S)

    # -- serve ---------------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if self._stopping:
            log.warning("second stop signal: exiting without draining")
            os._exit(EXIT_INTERRUPTED)
        self._stopping = True
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
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
        await self.rpc.enter_graceful_shutdown()
        if self._served:
            log.info("shutting down: draining")
        if self.service is not None:
            await self.service.drain(self.config.drain_timeout_s)
        if self.store is not None:
            await self.store.close()
        if self.indexes is not None:
            self.indexes.close()  # mapped readers see it retired
        await self.rpc.stop(grace_s=min(5.0, self.config.drain_timeout_s))
        if self.transports is not None:
            await self.transports.stop()
        if self.pool is not None:
            with contextlib.suppress(BufferError):
                self.pool.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.rpc.remove_socket()
        if self._served:
            log.info("stopped")


def inventory(config: KvdConfig, pool: HostPool, transports: TransportRouter, metrics: Metrics) -> str:
    """What runs, for the startup line: each tier on or off, whether the pool is page-locked, transports, metrics."""
    locked = config.host_pool.pin and TransportKind.CUDA_IPC in transports.kinds
    disk = config.disk
    parts = [
        f"host memory {human_bytes(pool.capacity_bytes)} ({'page-locked' if locked else 'not page-locked'})",
        f"disk {disk.path} up to {human_bytes(disk.capacity_bytes)}" if disk.path else "disk off",
        f"redis {config.redis.url}" if config.redis.url else "redis off",
        f"transports {', '.join(transports.kinds)}",
        f"metrics on {metrics.url}" if metrics.url else "metrics off (--metrics-port)",
    ]
    return "; ".join(parts)


def _sd_notify(state: str) -> None:
    """systemd's readiness protocol (Type=notify): one datagram to $NOTIFY_SOCKET; a no-op elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(state.encode(), address)


def run_daemon(config: KvdConfig) -> int:
    """`kvd serve`: run until stopped. EXIT_OK after a clean stop; EXIT_FAILURE, after one log line that says what
    to do, when it could not start (kvd.errors.StartupError) or a part of it failed."""
    import uvloop

    sys.setswitchinterval(config.runtime.gil_switch_interval_us / 1e6)
    _raise_fd_limit()
    daemon = KvdDaemon(config)
    try:
        uvloop.run(daemon.serve())
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    except RuntimeError as exc:
        log.error("kvd: %s", exc)
        return EXIT_FAILURE
    return EXIT_OK


def _raise_fd_limit() -> None:
    """Every session holds its worker's pidfd and /proc directory (and, for the CPU transport, its address space):
    take the whole hard limit on open files, not the 1024 a login shell often gives."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
