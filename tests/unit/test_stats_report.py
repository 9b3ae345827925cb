"""`kvd stats`: the remote tier's figures are labelled as this daemon's, next to what the whole store holds, and
write-downs that were dropped are listed by reason."""

from __future__ import annotations

from kvd_client.wire.kvd.v1 import kvd_pb2

from kvd.cli.stats_report import format_stats


def test_remote_tier_and_dropped_write_downs_are_explained() -> None:
    stats = kvd_pb2.StatsResponse(
        version="0.1.0",
        tiers=[
            kvd_pb2.TierStats(tier=kvd_pb2.TIER_HOST_MEMORY, name="host", used_bytes=1 << 20, blocks=8, healthy=True),
            kvd_pb2.TierStats(tier=kvd_pb2.TIER_REMOTE, name="redis", used_bytes=1 << 20, blocks=8, healthy=True),
        ],
        tier_counters={
            "tier_redis_store_keys": 4000,
            "tier_redis_store_used_bytes": 658 << 20,
            "tier_write_down_dropped_blocks": 7,
            "tier_write_down_dropped_no_healthy_tier_blocks": 5,
            "tier_write_down_dropped_queue_full_blocks": 2,
            "tier_write_down_dropped_shutdown_blocks": 0,
        },
    )
    text = format_stats(stats)
    assert (
        "redis: USED and BLOCKS are this daemon's blocks the store still holds; the whole store holds 4000 keys, 658MiB"
        in text
    )
    assert "blocks that left L1 for no lower tier: 7 (no_healthy_tier 5, queue_full 2)" in text


def test_no_notes_without_a_remote_tier_or_drops() -> None:
    stats = kvd_pb2.StatsResponse(tiers=[kvd_pb2.TierStats(tier=kvd_pb2.TIER_HOST_MEMORY, name="host", healthy=True)])
    assert "USED and BLOCKS" not in format_stats(stats) and "left L1" not in format_stats(stats)
