"""Prometheus metrics for one daemon.

Every `Metrics` owns its own `CollectorRegistry` instead of prometheus_client's global one, so several daemons (or
tests) in one process never collide over metric names. The `observe_*` / `set_*` methods sit on the hot path of the
service layer: they are cheap, take plain numbers, and never raise (a metrics bug must not fail a transfer).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from kvd import __version__
from kvd.config import MetricsConfig
from kvd.errors import StartupError

log = logging.getLogger(__name__)

# A CPU-transport save of a few blocks takes ~100 µs; a load of thousands of blocks from a remote tier can take
# seconds. Roughly 1-2.5-5 steps per decade over that range.
_DROPPED = re.compile(r"tier_write_down_dropped_(\w+?)_blocks")  # the store counter of each reason
OPERATION_SECONDS_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def _count(value: int | float) -> float:
    # Counter.inc raises on negative amounts; a bad caller value is clamped rather than allowed to raise.
    return float(value) if value > 0 else 0.0


class Metrics:
    """The daemon's metrics and, once `start` is called with a port, their HTTP endpoint."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if process_metrics:
            # process_resident_memory_bytes etc.: what an operator checks first when the pinned pool looks wrong.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        Info("kvd_build", "kvd version", registry=r).info({"version": __version__})
        self._add_operation_metrics(r)
        self._add_state_metrics(r)
        self._lock = threading.Lock()
        self.url: str | None = None  # the endpoint once started
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _add_operation_metrics(self, r: CollectorRegistry) -> None:
        """Counters and histograms of lookups, saves and loads."""
        self._lookups = Counter("kvd_lookups_total", "Lookup calls", registry=r)
        self._lookup_blocks = Counter("kvd_lookup_blocks_total", "Block hashes asked about by Lookup", registry=r)
        self._lookup_hit_blocks = Counter(
            "kvd_lookup_hit_blocks_total", "Blocks Lookup reported as loadable (prefix hits)", registry=r
        )
        self._series: dict[tuple[str, bool], tuple[Any, Any, Any, Any]] = {}  # (kind, ok) -> _operation_series
        self._operations = Counter(
            "kvd_operations_total", "Completed save/load operations", ["kind", "result"], registry=r
        )
        self._bytes = Counter("kvd_bytes_total", "Bytes moved by completed operations", ["kind"], registry=r)
        self._blocks = Counter("kvd_blocks_total", "Blocks in completed operations", ["kind"], registry=r)
        self._failed_blocks = Counter(
            "kvd_failed_blocks_total", "Blocks that failed inside completed operations", ["kind"], registry=r
        )
        self._seconds = Histogram(
            "kvd_operation_seconds",
            "Operation duration from acceptance to completion",
            ["kind"],
            buckets=OPERATION_SECONDS_BUCKETS,
            registry=r,
        )
        self._failures = Counter(
            "kvd_failures_total", "Operations that failed wholly or in part, by reason", ["kind", "reason"], registry=r
        )
        # Kept apart from the lookup hit rate: a block Lookup promised can still be evicted before the Load runs.
        self._load_hit_blocks = Counter("kvd_load_hit_blocks_total", "Blocks a Load found and copied", registry=r)
        self._load_miss_blocks = Counter(
            "kvd_load_miss_blocks_total", "Blocks a Load asked for but no tier had", registry=r
        )
        self._tier_hit_blocks = Counter(
            "kvd_tier_hit_blocks_total", "Blocks served from each tier", ["tier"], registry=r
        )

    def _add_state_metrics(self, r: CollectorRegistry) -> None:
        """Gauges of what the daemon holds now."""
        self._sessions = Gauge("kvd_sessions", "Registered worker sessions", registry=r)
        self._sessions_by_transport = Gauge(
            "kvd_sessions_by_transport", "Registered worker sessions by transport", ["transport"], registry=r
        )
        self._pinned_used = Gauge("kvd_pinned_bytes_used", "Bytes of the pinned host pool in use", registry=r)
        self._pinned_capacity = Gauge("kvd_pinned_bytes_capacity", "Size of the pinned host pool", registry=r)
        self._tier_healthy = Gauge("kvd_tier_healthy", "1 when the tier is usable, else 0", ["tier"], registry=r)
        self._dropped = Gauge(
            "kvd_tier_write_down_dropped_blocks",
            "Blocks that left L1 for no lower tier, since start, by reason (see docs/tiers.md)",
            ["reason"],
            registry=r,
        )

    # ---- HTTP endpoint ---------------------------------------------------------------------------------------

    def start(self, config: MetricsConfig) -> int | None:
        """Serve /metrics on config.host:config.port; port 0 picks a free one. Returns the bound port, or None
        when metrics are off (port unset). A port in use, or a host that is not this machine's, is a StartupError:
        the operator asked for exactly that endpoint, so kvd neither picks another nor starts without it."""
        if config.port is None:
            return None
        with self._lock:
            if self._server is not None:
                raise RuntimeError("metrics endpoint already started")
            try:
                server, thread = start_http_server(config.port, addr=config.host, registry=self.registry)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {config.host}:{config.port}: {exc.strerror or exc}; choose another "
                    "--metrics-port (KVD_METRICS__PORT; 0 picks a free one) or metrics.host"
                ) from exc
            self._server, self._thread = server, thread
        port = int(server.server_address[1])
        self.url = f"http://{config.host}:{port}/metrics"
        log.info("metrics on %s", self.url)
        return port

    def stop(self) -> None:
        """Stop the endpoint if it runs; safe to call more than once."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # ---- called by the service layer -------------------------------------------------------------------------

    def observe_lookup(self, blocks: int, hit_blocks: int) -> None:
        try:
            self._lookups.inc()
            self._lookup_blocks.inc(_count(blocks))
            self._lookup_hit_blocks.inc(_count(hit_blocks))
        except Exception:  # never let metrics fail a request
            log.debug("metrics: observe_lookup failed", exc_info=True)

    def observe_operation(
        self,
        kind: str,
        ok: bool,
        nbytes: int,
        seconds: float,
        blocks: int,
        failed_blocks: int,
        reason: str = "",
    ) -> None:
        """One completed save or load. `reason` becomes a label: a kvd.errors.FailureReason value ("not_stored",
        "host_pool_full", ...), never free text, or the series count explodes."""
        try:
            kind = str(kind)
            operations, moved, counted, durations = self._operation_series(kind, ok)
            operations.inc()
            moved.inc(_count(nbytes))
            counted.inc(_count(blocks))
            durations.observe(max(float(seconds), 0.0))
            if failed_blocks > 0:
                self._failed_blocks.labels(kind).inc(_count(failed_blocks))
            if not ok or failed_blocks > 0:
                self._failures.labels(kind, str(reason) or ("partial" if ok else "unknown")).inc()
        except Exception:
            log.debug("metrics: observe_operation failed", exc_info=True)

    def _operation_series(self, kind: str, ok: bool) -> tuple[Any, Any, Any, Any]:
        """The series every completed operation of `kind` and result updates, looked up once (labels() takes a lock
        and builds a key each time: four times per operation otherwise)."""
        series = self._series.get((kind, ok))
        if series is None:
            series = self._series[(kind, ok)] = (
                self._operations.labels(kind, "ok" if ok else "failed"),
                self._bytes.labels(kind),
                self._blocks.labels(kind),
                self._seconds.labels(kind),
            )
        return series

    def observe_load_blocks(self, hit: int, miss: int) -> None:
        try:
            self._load_hit_blocks.inc(_count(hit))
            self._load_miss_blocks.inc(_count(miss))
        except Exception:
            log.debug("metrics: observe_load_blocks failed", exc_info=True)

    def observe_tier_hit(self, tier: str, blocks: int) -> None:
        try:
            self._tier_hit_blocks.labels(str(tier)).inc(_count(blocks))
        except Exception:
            log.debug("metrics: observe_tier_hit failed", exc_info=True)

    def set_sessions(self, n: int) -> None:
        try:
            self._sessions.set(n)
        except Exception:
            log.debug("metrics: set_sessions failed", exc_info=True)

    def set_transport_sessions(self, transport: str, n: int) -> None:
        try:
            self._sessions_by_transport.labels(str(transport)).set(n)
        except Exception:
            log.debug("metrics: set_transport_sessions failed", exc_info=True)

    def set_pinned_bytes(self, used: int, capacity: int) -> None:
        try:
            self._pinned_used.set(used)
            self._pinned_capacity.set(capacity)
        except Exception:
            log.debug("metrics: set_pinned_bytes failed", exc_info=True)

    def set_tier_counters(self, counters: Mapping[str, int]) -> None:
        """The store's counters that have a metric of their own: dropped write-downs by reason."""
        try:
            for name, value in counters.items():
                reason = _DROPPED.fullmatch(name)
                if reason is not None:
                    self._dropped.labels(reason.group(1)).set(value)
        except Exception:
            log.debug("metrics: set_tier_counters failed", exc_info=True)

    def set_tier_health(self, tier: str, healthy: bool) -> None:
        try:
            self._tier_healthy.labels(str(tier)).set(1 if healthy else 0)
        except Exception:
            log.debug("metrics: set_tier_health failed", exc_info=True)
