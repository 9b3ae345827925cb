"""What an operator sees of a real daemon: `kvd health` through startup, serving and draining, and the Prometheus
endpoint after real traffic."""

from __future__ import annotations

import signal
import socket
import time
import urllib.request

from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kvd.cli import main as kvd_main
from tests.helpers.daemon import Daemon
from tests.helpers.kvdata import CacheSpec, block_hash
from tests.helpers.rpc import fingerprint, lookup_hits

GiB = 1 << 30
MiB = 1 << 20


def _health(daemon: Daemon) -> int:
    return kvd_main(["health", "--socket", str(daemon.socket), "--timeout", "1"])


def test_health_before_ready_ready_and_draining(capsys) -> None:  # type: ignore[no-untyped-def]
    # A pool big enough that allocating it takes a while: the daemon listens (NOT_SERVING) before it is ready.
    daemon = Daemon(capacity_bytes=3 * GiB, slab_bytes=64 * MiB)
    try:
        daemon.start(wait=False)
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while not seen or seen[-1] != 0:
            assert time.monotonic() < deadline, f"never SERVING: {seen}\n{daemon.log_text()}"
            if daemon.socket.exists():
                seen.append(_health(daemon))
            time.sleep(0.01)
        assert 1 in seen, f"no NOT_SERVING while the pool was allocated: {seen}"
        assert seen.index(1) < seen.index(0)

        # SIGTERM: health turns NOT_SERVING first (seen on the Watch stream), and from then on a probe never passes:
        # `kvd health` answers NOT_SERVING (1) while the daemon drains and unreachable (2) once it has stopped.
        channel = daemon.new_channel()
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        daemon.signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        draining = [_health(daemon) for _ in range(3)]
        assert all(code in (1, 2) for code in draining), draining
        watch.cancel()
        channel.close()
        assert daemon.proc is not None and daemon.proc.wait(30) == 0
        assert _health(daemon) == 2
    finally:
        daemon.close()
    capsys.readouterr()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_match_real_traffic(worker_factory, spec: CacheSpec) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    with Daemon(env={"KVD_METRICS__PORT": str(port)}) as daemon:
        worker = worker_factory(daemon.socket, spec, "metrics-model")
        assert worker.wait_ready()["ready"]
        stored = [(i, block_hash(i, "metrics")) for i in range(4)]
        worker.fill(stored)
        assert worker.save(stored)["ok"]
        missing = [(10, block_hash(99, "never")), (11, block_hash(98, "never"))]
        result = worker.load([(20, stored[0][1]), (21, stored[1][1]), *missing])
        assert not result["ok"]
        looked_up = [h for _, h in stored] + [h for _, h in missing]
        assert worker.lookup(looked_up)["hit_blocks"] == 4  # answered from the shared index: no RPC, no metric
        assert lookup_hits(daemon.stub(), daemon.socket, "metrics-model", fingerprint(spec), looked_up) == 4  # the RPC

        m = _scrape(port)
        assert m[("kvd_operations_total", (("kind", "save"), ("result", "ok")))] == 1
        assert m[("kvd_operations_total", (("kind", "load"), ("result", "failed")))] == 1
        assert m[("kvd_bytes_total", (("kind", "save"),))] == 4 * spec.block_bytes
        assert m[("kvd_bytes_total", (("kind", "load"),))] == 2 * spec.block_bytes
        assert m[("kvd_load_hit_blocks_total", ())] == 2
        assert m[("kvd_load_miss_blocks_total", ())] == 2
        assert m[("kvd_lookups_total", ())] == 1
        assert m[("kvd_lookup_blocks_total", ())] == 6
        assert m[("kvd_lookup_hit_blocks_total", ())] == 4
        assert m[("kvd_tier_hit_blocks_total", (("tier", "host_memory"),))] == 4
        assert m[("kvd_operation_seconds_count", (("kind", "save"),))] == 1
        assert m[("kvd_sessions", ())] == 1
        assert m[("kvd_sessions_by_transport", (("transport", "cpu"),))] == 1
        assert m[("kvd_pinned_bytes_capacity", ())] == daemon.host_tier().capacity_bytes
        failures = {k: v for k, v in m.items() if k[0] == "kvd_failures_total"}
        assert sum(failures.values()) == 1, failures
        # Gauges of the pool are published once a second.
        deadline = time.monotonic() + 5
        while _scrape(port).get(("kvd_pinned_bytes_used", ())) != 4 * spec.block_bytes:
            assert time.monotonic() < deadline, "kvd_pinned_bytes_used never showed the 4 stored blocks"
            time.sleep(0.1)
