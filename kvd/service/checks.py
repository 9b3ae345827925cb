"""The service's input checks and key naming: pure functions over value types, raising KvdErrors only."""

from __future__ import annotations

from collections.abc import Sequence

from kvd_client.layout import Namespace

from kvd.errors import InvalidArgument, ResourceExhausted
from kvd.types import BlockKey, BlockTransfer

MAX_HASH_BYTES = 64


def check_hashes(hashes: Sequence[bytes], limit: int) -> None:
    """A batch is 1..`limit` hashes of 1..MAX_HASH_BYTES bytes each."""
    if not hashes:
        raise InvalidArgument("empty batch")
    if len(hashes) > limit:
        raise ResourceExhausted(f"batch of {len(hashes)} blocks exceeds the limit of {limit}")
    lengths = list(map(len, hashes))
    if min(lengths) < 1 or max(lengths) > MAX_HASH_BYTES:
        bad = next(n for n in lengths if not 0 < n <= MAX_HASH_BYTES)
        raise InvalidArgument(f"a block hash must be 1..{MAX_HASH_BYTES} bytes, got {bad}")


def check_block_indices(blocks: Sequence[BlockTransfer], num_blocks: int) -> None:
    for b in blocks:
        if not 0 <= b.block_index < num_blocks:
            raise InvalidArgument(f"block index {b.block_index} out of range [0, {num_blocks})")


def check_layout(ns_key: str, known: tuple[str, ...], canonical: tuple[str, ...]) -> None:
    """Every session of a namespace shares one KV layout (the first one registered)."""
    if known != canonical:
        raise InvalidArgument(
            f"namespace {ns_key!r} is registered with another KV layout; the fingerprint must cover the layout"
        )


def block_keys(namespace_key: str, hashes: Sequence[bytes]) -> list[BlockKey]:
    return [(namespace_key, h) for h in hashes]


def rank_namespace_key(namespace: Namespace, rank: int) -> str:
    """The key of the same model and layout on another tensor-parallel rank."""
    return type(namespace)(namespace.model_id, namespace.layout_fingerprint, rank, namespace.tp_world_size).key
