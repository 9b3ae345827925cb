"""kvd.metrics: known observations in, exact values out over a real HTTP scrape."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvd.config import MetricsConfig
from kvd.errors import StartupError
from kvd.metrics import OPERATION_SECONDS_BUCKETS, Metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        body: bytes = response.read()
    return body.decode()


def test_start_without_port_serves_nothing(metrics: Metrics) -> None:
    assert metrics.start(MetricsConfig()) is None
    metrics.stop()  # no-op, must not raise


def test_port_zero_picks_a_free_port_and_stop_closes_it(metrics: Metrics) -> None:
    port = metrics.start(MetricsConfig(port=0, host="127.0.0.1"))
    assert port is not None and port > 0
    assert "kvd_build_info" in scrape(port)
    with pytest.raises(RuntimeError):
        metrics.start(MetricsConfig(port=0))
    metrics.stop()
    with pytest.raises(OSError):
        scrape(port)
    metrics.stop()


def test_exact_values_over_http(metrics: Metrics) -> None:
    port = metrics.start(MetricsConfig(port=0, host="127.0.0.1"))
    assert port is not None

    metrics.observe_lookup(blocks=10, hit_blocks=7)
    metrics.observe_lookup(blocks=5, hit_blocks=0)
    metrics.observe_operation("save", ok=True, nbytes=4096, seconds=0.0002, blocks=2, failed_blocks=0)
    metrics.observe_operation("save", ok=True, nbytes=1000, seconds=0.003, blocks=1, failed_blocks=0)
    metrics.observe_operation("load", ok=False, nbytes=512, seconds=0.5, blocks=4, failed_blocks=3, reason="evicted")
    metrics.observe_operation("load", ok=False, nbytes=0, seconds=20.0, blocks=1, failed_blocks=1)
    metrics.observe_load_blocks(hit=9, miss=4)
    metrics.observe_tier_hit("host_memory", 6)
    metrics.observe_tier_hit("disk", 2)
    metrics.observe_tier_hit("disk", 1)
    metrics.set_sessions(3)
    metrics.set_transport_sessions("cpu", 1)
    metrics.set_transport_sessions("cuda_ipc", 2)
    metrics.set_pinned_bytes(used=1 << 20, capacity=4 << 30)
    metrics.set_tier_health("redis", False)
    metrics.set_tier_health("disk", True)

    got = samples(scrape(port))

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("kvd_lookups_total") == 2
    assert value("kvd_lookup_blocks_total") == 15
    assert value("kvd_lookup_hit_blocks_total") == 7
    assert value("kvd_operations_total", kind="save", result="ok") == 2
    assert value("kvd_operations_total", kind="load", result="failed") == 2
    assert ("kvd_operations_total", (("kind", "save"), ("result", "failed"))) not in got
    assert value("kvd_bytes_total", kind="save") == 5096
    assert value("kvd_bytes_total", kind="load") == 512
    assert value("kvd_blocks_total", kind="load") == 5
    assert value("kvd_failed_blocks_total", kind="load") == 4
    assert value("kvd_failures_total", kind="load", reason="evicted") == 1
    assert value("kvd_failures_total", kind="load", reason="unknown") == 1
    assert not any(name == "kvd_failures_total" and ("kind", "save") in labels for name, labels in got)
    assert value("kvd_load_hit_blocks_total") == 9
    assert value("kvd_load_miss_blocks_total") == 4
    assert value("kvd_tier_hit_blocks_total", tier="host_memory") == 6
    assert value("kvd_tier_hit_blocks_total", tier="disk") == 3
    assert value("kvd_sessions") == 3
    assert value("kvd_sessions_by_transport", transport="cpu") == 1
    assert value("kvd_sessions_by_transport", transport="cuda_ipc") == 2
    assert value("kvd_pinned_bytes_used") == 1 << 20
    assert value("kvd_pinned_bytes_capacity") == 4 << 30
    assert value("kvd_tier_healthy", tier="redis") == 0
    assert value("kvd_tier_healthy", tier="disk") == 1

    # Histogram: cumulative buckets from 100 µs to 10 s; the 20 s load lands only in +Inf.
    assert value("kvd_operation_seconds_count", kind="save") == 2
    assert value("kvd_operation_seconds_sum", kind="save") == pytest.approx(0.0032)
    assert value("kvd_operation_seconds_bucket", kind="save", le="0.0001") == 0
    assert value("kvd_operation_seconds_bucket", kind="save", le="0.00025") == 1
    assert value("kvd_operation_seconds_bucket", kind="save", le="0.005") == 2
    assert value("kvd_operation_seconds_bucket", kind="load", le="10.0") == 1
    assert value("kvd_operation_seconds_bucket", kind="load", le="+Inf") == 2
    assert OPERATION_SECONDS_BUCKETS[0] == 0.0001 and OPERATION_SECONDS_BUCKETS[-1] == 10.0


def test_partial_failure_counts_as_failure_and_bad_values_never_raise(metrics: Metrics) -> None:
    metrics.observe_operation("save", ok=True, nbytes=10, seconds=0.001, blocks=3, failed_blocks=1)
    # Negative numbers (a caller bug) are clamped, not raised: metrics must never fail a transfer.
    metrics.observe_lookup(blocks=-1, hit_blocks=-5)
    metrics.observe_load_blocks(hit=-1, miss=-1)
    metrics.observe_tier_hit("disk", -3)
    metrics.observe_operation("load", ok=True, nbytes=-1, seconds=-1.0, blocks=-1, failed_blocks=0)

    got = samples(generate_latest(metrics.registry).decode())
    assert got[("kvd_failures_total", (("kind", "save"), ("reason", "partial")))] == 1
    assert got[("kvd_failed_blocks_total", (("kind", "save"),))] == 1
    assert got[("kvd_lookups_total", ())] == 1
    assert got[("kvd_lookup_blocks_total", ())] == 0
    assert got[("kvd_load_hit_blocks_total", ())] == 0
    assert got[("kvd_tier_hit_blocks_total", (("tier", "disk"),))] == 0
    assert got[("kvd_bytes_total", (("kind", "load"),))] == 0


def test_instances_do_not_share_a_registry() -> None:
    a, b = Metrics(process_metrics=False), Metrics(process_metrics=False)
    a.set_sessions(5)
    assert samples(generate_latest(a.registry).decode())[("kvd_sessions", ())] == 5
    assert samples(generate_latest(b.registry).decode())[("kvd_sessions", ())] == 0


def test_a_port_in_use_is_one_startup_error(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"):
            metrics.start(MetricsConfig(port=port, host="127.0.0.1"))


def test_dropped_write_downs_by_reason(metrics: Metrics) -> None:
    port = metrics.start(MetricsConfig(port=0, host="127.0.0.1"))
    assert port is not None
    metrics.set_tier_counters(
        {
            "tier_write_down_dropped_no_healthy_tier_blocks": 16,
            "tier_write_down_dropped_queue_full_blocks": 2,
            "tier_write_down_dropped_blocks": 18,  # the sum: no series of its own
            "tier_write_down_blocks": 99,
        }
    )
    got = {k: v for k, v in samples(scrape(port)).items() if k[0] == "kvd_tier_write_down_dropped_blocks"}
    assert got == {
        ("kvd_tier_write_down_dropped_blocks", (("reason", "no_healthy_tier"),)): 16,
        ("kvd_tier_write_down_dropped_blocks", (("reason", "queue_full"),)): 2,
    }
