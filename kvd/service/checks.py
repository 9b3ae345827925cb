"""The service's input checks and key naming: pure functions over value types, raising KvdErrors only."""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

from kvd_client.layout import Namespace

from kvd.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from kvd.types import BlockKey, PeerIdentity, namespace_key

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


def check_block_indices(indices: Sequence[int], num_blocks: int) -> None:
    """Every index names a block of the worker's cache (two C-speed passes; a Python loop only to name the bad one)."""
    if indices and (min(indices) < 0 or max(indices) >= num_blocks):
        bad = next(i for i in indices if not 0 <= i < num_blocks)
        raise InvalidArgument(f"block index {bad} out of range [0, {num_blocks})")


class LayoutClaims:
    """The one KV layout every memory session of a namespace shares (the first one registered), kept as digests of
    the namespace key and the layout, for at most `limit` namespaces (the oldest claim is forgotten first): what a
    client sends can neither grow this without bound nor hold its strings here."""

    def __init__(self, limit: int = 65_536) -> None:
        self._limit = limit
        self._claims: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()

    def check(self, ns_key: str, canonical: tuple[str, ...]) -> None:
        """InvalidArgument if the namespace is claimed by another layout."""
        known = self._claims.get(_digest(ns_key))
        if known is not None and known != _digest("|".join(canonical)):
            raise InvalidArgument(
                f"namespace {ns_key[:300]!r} is registered with another KV layout; the fingerprint must cover the"
                " layout"
            )

    def claim(self, ns_key: str, canonical: tuple[str, ...]) -> None:
        """Claim the namespace for this layout (or check it against the claim already there)."""
        self.check(ns_key, canonical)
        key = _digest(ns_key)
        self._claims[key] = _digest("|".join(canonical))
        self._claims.move_to_end(key)
        while len(self._claims) > self._limit:
            self._claims.popitem(last=False)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(errors="surrogatepass"), digest_size=16).digest()


def block_keys(namespace_key: str, hashes: Sequence[bytes]) -> list[BlockKey]:
    return [(namespace_key, h) for h in hashes]


def rank_namespace_key(tenant: str, namespace: Namespace, rank: int) -> str:
    """The key of the same model and layout on another tensor-parallel rank, in the same tenant."""
    other = type(namespace)(namespace.model_id, namespace.layout_fingerprint, rank, namespace.tp_world_size)
    return namespace_key(tenant, other)


def check_peer(peer: PeerIdentity, may_register: bool, sessions_of_uid: int, max_sessions_per_uid: int) -> None:
    """A verified peer whose uid may register and has room for one more session."""
    if not may_register:
        raise PermissionDenied(f"uid {peer.uid} may not register (allowed: root, the daemon's user, allowed_uids)")
    if sessions_of_uid >= max_sessions_per_uid:
        raise ResourceExhausted(
            f"uid {peer.uid} holds {sessions_of_uid} sessions (max_sessions_per_uid): unregister one first"
        )


def check_block_fits(block_bytes: int, limits: Sequence[tuple[int, str, str]]) -> None:
    """A block must fit every buffer it passes through whole: (limit in bytes, what, the setting) for each."""
    for limit, what, key in limits:
        if block_bytes > limit:
            settings = " and ".join(k for _, _, k in limits)
            raise InvalidArgument(
                f"a block of {block_bytes} bytes exceeds {what} of {limit} bytes ({key}); a block must fit"
                f" {settings}: raise {key}"
            )


def admit_event(events: set[bytes], handle: bytes, limit: int) -> None:
    """One more IPC event handle for a session to have open, up to `limit` distinct ones (the client reuses a
    ring of them; a new handle on every call would open events without bound)."""
    if handle and handle not in events:
        if len(events) >= limit:
            raise ResourceExhausted(
                f"this session already had the daemon open {len(events)} IPC events (max_worker_events): reuse them"
            )
        events.add(handle)
