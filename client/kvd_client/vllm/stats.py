"""The connector's counters, logged by vLLM as "KV Transfer metrics"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

COUNTERS = (
    "lookups",
    "lookup_errors",
    "lookup_not_ready",  # get_num_new_matched_tokens answered "ask again" (None), for any reason
    "lookup_not_ready_local",  # ... while waiting for a lookup of the local tiers (no shared index mapped)
    "lookup_not_ready_remote",  # ... while waiting only for the remote tier (remote_lookups="wait")
    "lookups_local",  # answered from the shared index, in the scheduler's thread
    "lookups_remote",  # lookup RPCs sent for what only a remote tier may add
    "query_tokens",
    "hit_tokens",
    "loads",
    "in_step_loads",  # loads inside the step that scheduled the request (hits in the daemon's host memory)
    "load_blocks",
    "load_failed_blocks",
    "load_bytes",
    "load_time_s",
    "saves",
    "save_blocks",
    "save_failed_blocks",
    "save_bytes",
    "save_time_s",
    "worker_steps",  # engine steps this worker ran (get_finished calls): with saves pending, vLLM steps until reported
    "steps_with_saves_pending",  # ... of them, those that began with a save of a finished request still in flight
)


STEP_COUNTERS = frozenset({"worker_steps", "steps_with_saves_pending"})


@dataclass
class KvdConnectorStats(KVConnectorStats):
    """Counters for one interval, summed over workers and the scheduler. `data` holds plain numbers, so the stats
    cross process boundaries as they are."""

    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def add(self, name: str, value: float = 1) -> None:
        self.data[name] = self.data.get(name, 0) + value

    def reset(self) -> None:
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if isinstance(value, int | float):
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {name: d.get(name, 0) for name in COUNTERS}
        load_s, save_s = d.get("load_time_s", 0), d.get("save_time_s", 0)
        out["load_MBps"] = round(d.get("load_bytes", 0) / load_s / 1e6, 1) if load_s else 0.0
        out["save_MBps"] = round(d.get("save_bytes", 0) / save_s / 1e6, 1) if save_s else 0.0
        return out

    def is_empty(self) -> bool:
        """Nothing to report: the step counts alone do not make an interval worth shipping (they would every step);
        they ride along with the next interval that has something else."""
        return not any(self.data.get(name, 0) for name in COUNTERS if name not in STEP_COUNTERS)


class StatsOwner:
    """Hands out one interval's counters and starts the next (both connector sides keep their own)."""

    def __init__(self) -> None:
        self.stats = KvdConnectorStats()

    def take(self) -> KvdConnectorStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, KvdConnectorStats()
        return stats


class KvdPromMetrics(KVConnectorPromMetrics):
    """The counters as Prometheus counters, `vllm:kvd_<name>` per engine (what LLM.get_metrics() and /metrics show)."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str], per_engine: dict[int, Any]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine)
        counter: Any = self._counter_cls
        self._counters: dict[str, Any] = {
            name: counter(name=f"vllm:kvd_{name}", documentation=f"KvdConnector: {name}", labelnames=labelnames)
            for name in COUNTERS
        }
        self._children: dict[tuple[int, str], Any] = {}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            if name not in self._counters or not isinstance(value, int | float) or value <= 0:
                continue
            child = self._children.get((engine_idx, name))
            if child is None:
                child = self._counters[name].labels(*self.per_engine_labelvalues[engine_idx])
                self._children[(engine_idx, name)] = child
            child.inc(value)
