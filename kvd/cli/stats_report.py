"""What `kvd stats` prints: a kvd.v1.StatsResponse as an operator reads it (sessions, tiers, hit rates, bytes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvd_client.wire.kvd.v1 import kvd_pb2

from kvd.config import human_bytes


def _rate(hit: int, total: int) -> str:
    return f"{100.0 * hit / total:.1f}%" if total else "-"


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d" if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [list(header), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def format_stats(stats: Any) -> str:
    """A kvd.v1.StatsResponse as an operator-readable report."""
    lines = [f"kvd {stats.version or '?'}  boot {stats.boot_id or '?'}  up {_duration(stats.uptime_s)}", ""]
    lines += [f"sessions: {len(stats.sessions)}", *(_sessions(stats.sessions) if stats.sessions else []), ""]
    lines += ["tiers:", *_tiers(stats.tiers), *_tier_notes(stats), ""]
    load_blocks = stats.load_hit_blocks + stats.load_miss_blocks
    lines += [
        f"lookup hit rate: {_rate(stats.lookup_hit_blocks, stats.lookup_blocks)}"
        f"  ({stats.lookup_hit_blocks}/{stats.lookup_blocks} blocks in {stats.lookups} lookups)",
        f"load hit rate:   {_rate(stats.load_hit_blocks, load_blocks)}"
        f"  ({stats.load_hit_blocks}/{load_blocks} blocks asked for by Load; a miss is one no tier had then)",
        f"saves: {stats.saves_ok} ok, {stats.saves_failed} failed, {human_bytes(stats.bytes_saved)} saved",
        f"loads: {stats.loads_ok} ok, {stats.loads_failed} failed, {human_bytes(stats.bytes_loaded)} loaded",
        f"submission rings: {stats.ring_records} requests, {stats.ring_refused} refused",
    ]
    return "\n".join(lines)


def _sessions(sessions: Sequence[Any]) -> list[str]:
    return _table(
        ["SESSION", "WORKER", "PID", "TRANSPORT", "MODEL", "TP", "SAVES", "LOADS", "IN-FLIGHT"],
        [
            [
                s.session_id[:12],
                s.worker_name or "-",
                s.pid,
                (s.transport or "-") + ("+ring" if s.ring else ""),
                s.namespace.model_id or "-",
                f"{s.namespace.tp_rank}/{s.namespace.tp_world_size}",
                s.saves,
                s.loads,
                s.in_flight,
            ]
            for s in sessions
        ],
    )


def _tiers(tiers: Sequence[Any]) -> list[str]:
    return _table(
        ["TIER", "NAME", "HEALTHY", "CAPACITY", "USED", "BLOCKS", "HITS", "MISSES", "HIT RATE", "EVICTED", "CORRUPT"],
        [
            [
                kvd_pb2.Tier.Name(t.tier).removeprefix("TIER_").lower() if t.tier in kvd_pb2.Tier.values() else t.tier,
                t.name or "-",
                "yes" if t.healthy else "NO",
                human_bytes(t.capacity_bytes) if t.capacity_bytes else "-",
                human_bytes(t.used_bytes),
                t.blocks,
                t.hits,
                t.misses,
                _rate(t.hits, t.hits + t.misses),
                t.evictions,
                t.corrupt,
            ]
            for t in tiers
        ],
    )


def _tier_notes(stats: Any) -> list[str]:
    """What the tier table cannot say: whose blocks the remote tier counts, and write-downs that were dropped."""
    counters = dict(stats.tier_counters)
    notes = []
    remote = [t for t in stats.tiers if t.tier == kvd_pb2.TIER_REMOTE]
    if remote and "tier_redis_store_keys" in counters:
        notes.append(
            f"  {remote[0].name or 'remote'}: USED and BLOCKS are this daemon's blocks the store still holds; the whole"
            f" store holds {int(counters['tier_redis_store_keys'])} keys,"
            f" {human_bytes(int(counters.get('tier_redis_store_used_bytes', 0)))}"
        )
    prefix, suffix = "tier_write_down_dropped_", "_blocks"
    dropped = {
        name.removeprefix(prefix).removesuffix(suffix): int(value)
        for name, value in counters.items()
        if name.startswith(prefix) and name != prefix + "blocks" and value
    }
    if dropped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(dropped.items()))
        notes.append(f"  blocks that left L1 for no lower tier: {sum(dropped.values())} ({reasons})")
    return notes
