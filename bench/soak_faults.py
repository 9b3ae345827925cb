"""The soak's stores (Redis or a Redis Cluster, the disk tier's filesystem) and the faults it injects into them and
into the daemon; see bench/soak.py."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.helpers.daemon import Daemon
from tests.helpers.redis_servers import RedisClusterServers, RedisServer
from tests.helpers.small_fs import fill_up, mount_tmpfs, unmount

MiB = 1 << 20
FAULTS = ("kill-daemon", "stop-redis", "kill-redis", "fill-disk")
STOP_S = 5.0  # how long a SIGSTOPped store stays stopped
DOWN_S = 3.0  # how long a killed store stays down
FULL_S = 10.0  # how long the disk stays full


class Stores:
    """Redis (or a 3-shard cluster) and the disk tier's directory: a tmpfs of the tier's capacity plus a margin
    when mounting is allowed (so the disk can be filled), else a plain directory."""

    def __init__(self, workdir: Path, *, cluster: bool, disk_mib: int) -> None:
        self.redis: RedisServer | None = None
        self.cluster: RedisClusterServers | None = None
        if cluster:
            self.cluster = RedisClusterServers(workdir / "cluster", shards=3)
        else:
            self.redis = RedisServer(workdir / "redis")
        self.fs = workdir / "disk-fs"
        self.disk_path = self.fs / "blocks"
        self.small_fs = mount_tmpfs(self.fs, (disk_mib + 32) * MiB) is None
        self.disk_path.mkdir(parents=True, exist_ok=True)

    @property
    def redis_url(self) -> str:
        return self.cluster.url if self.cluster is not None else self.redis.url  # type: ignore[union-attr]

    @property
    def nodes(self) -> list[RedisServer]:
        return self.cluster.nodes if self.cluster is not None else [self.redis]  # type: ignore[list-item]

    def __enter__(self) -> Stores:
        if self.cluster is not None:
            self.cluster.start()
        else:
            self.redis.start()  # type: ignore[union-attr]
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        for node in self.nodes:
            node.kill()
        unmount(self.fs)


class Faults:
    """One fault every `every_s` seconds, the enabled kinds in turn; `epoch` moves when one starts or ends."""

    def __init__(self, kinds: str, every_s: float, daemon: Daemon, stores: Stores) -> None:
        self.kinds = [k for k in kinds.split(",") if k]
        unknown = set(self.kinds) - set(FAULTS)
        if unknown:
            raise SystemExit(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
        self.every_s = every_s
        self.daemon = daemon
        self.stores = stores
        self.done: Counter[str] = Counter()
        self.epoch = 0
        self.active = False

    def run_until(self, deadline: float, sample_every: float, sample: Callable[[], dict[str, Any]]) -> list[Any]:
        """Inject faults and take samples until `deadline` (in the calling thread); the samples."""
        samples = [sample()]
        next_sample = time.monotonic() + sample_every
        next_fault = time.monotonic() + self.every_s
        turn = 0
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_sample:
                samples.append(sample())
                next_sample = now + sample_every
            if self.kinds and now >= next_fault and deadline - now > self.every_s / 2:
                self.inject(self.kinds[turn % len(self.kinds)])
                turn += 1
                next_fault = time.monotonic() + self.every_s
            time.sleep(0.2)
        samples.append(sample())
        return samples

    def inject(self, kind: str) -> None:
        self.epoch += 1
        self.active = True
        try:
            if kind == "kill-daemon":
                self.daemon.kill()
                time.sleep(1.0)
                self.daemon.start(timeout=120)
            elif kind == "stop-redis":
                node = self.stores.nodes[0]
                node.stop()
                time.sleep(STOP_S)
                node.cont()
            elif kind == "kill-redis":
                self._kill_redis()
            elif not self._fill_disk():
                kind = "fill-disk (skipped: no small filesystem here)"
            self.done[kind] += 1
        finally:
            self.active = False
            self.epoch += 1

    def _kill_redis(self) -> None:
        if self.stores.cluster is not None:
            self.stores.cluster.kill_shard(0)
            time.sleep(DOWN_S)
            self.stores.cluster.restart_shard(0)
        else:
            self.stores.nodes[0].kill()
            time.sleep(DOWN_S)
            self.stores.nodes[0].start()

    def _fill_disk(self) -> bool:
        if not self.stores.small_fs:
            return False
        ballast = self.stores.fs / "ballast"
        deadline = time.monotonic() + FULL_S
        while time.monotonic() < deadline:  # the tier evicts to make room: keep the filesystem full anyway
            fill_up(ballast)
            time.sleep(0.5)
        ballast.unlink()
        return True


def tier_figures(daemon: Daemon, stores: Stores) -> dict[str, Any]:
    """What the daemon says of its lower tiers, next to what the stores and the filesystem hold."""
    stats = daemon.stats()
    out: dict[str, Any] = {
        t.name: {"used_bytes": t.used_bytes, "blocks": t.blocks, "healthy": t.healthy} for t in stats.tiers
    }
    out["counters"] = {
        k: v for k, v in stats.tier_counters.items() if k.startswith(("tier_redis", "tier_disk", "tier_write"))
    }
    keys = nbytes = 0
    for node in stores.nodes:
        client = node.client()
        try:
            for name in client.scan_iter(match="kvd:*", count=1000):
                keys += 1
                nbytes += int(client.strlen(name))  # type: ignore[arg-type]
        finally:
            client.close()
    out["redis_store_has"] = {"used_bytes": nbytes, "blocks": keys}
    files = [p for p in stores.disk_path.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]
    out["disk_files"] = {"used_bytes": sum(p.stat().st_size for p in files), "blocks": len(files)}
    return out
