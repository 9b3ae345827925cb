"""Every index this daemon publishes (one per namespace group), kept equal to what the local tiers hold.

The host pool, the write-down queue and the disk tier report each block a rank's copy of which arrives in them
(`stored`) or leaves them (`dropped`, before the space may be reused) through the BlockListener protocol; the
registry routes the report to its namespace group's index. A save into host memory may instead stage its blocks
while they are copied and reveal them once complete (`staging`: kvd.memory.index_batches). A group's index is
created when its first session with KV memory registers (its block size fixes the sizing); blocks of namespaces
without an index are not published.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Protocol

from kvd_client.index import DAEMON_REMOTE_TIER, group_key
from kvd_client.layout import Namespace

from kvd.config import IndexConfig
from kvd.memory.shm_index import ShmIndex, Source, Staged
from kvd.types import BlockKey, namespace_key

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StagedSave:
    """A save's blocks in the indexes that publish them, placed while the copy runs and revealed once it is complete
    (each part: one index, one rank's share; the index's lock orders the three verbs, from whichever threads)."""

    parts: tuple[tuple[ShmIndex, Staged], ...]

    def stage(self) -> None:
        """Place the blocks, invisible (any thread: the copy's, once it is queued)."""
        for index, token in self.parts:
            index.stage(token)

    def reveal(self) -> None:
        """The bytes are complete: publish (before the save's notice)."""
        for index, token in self.parts:
            index.reveal(token)

    def unstage(self) -> None:
        """The copy failed: take back whatever was placed."""
        for index, token in self.parts:
            index.unstage(token)


class BlockListener(Protocol):
    def stored(self, key: BlockKey, source: Source) -> None: ...

    def staging(self, keys: Sequence[BlockKey]) -> StagedSave | None: ...

    def stored_many(self, keys: Sequence[BlockKey], source: Source) -> None: ...

    def dropped_many(self, keys: Sequence[BlockKey], source: Source) -> None: ...

    def dropped(self, key: BlockKey, source: Source) -> None: ...


def group_of(tenant: str, namespace: Namespace) -> str:
    return group_key(tenant, namespace.model_id, namespace.layout_fingerprint, namespace.tp_world_size)


class IndexRegistry:
    def __init__(
        self, config: IndexConfig, *, boot_id: str, local_bytes: int, remote_tier: bool, max_lookup_blocks: int
    ) -> None:
        """`local_bytes`: what the local tiers can hold in all (host pool plus disk), for sizing."""
        self.config = config
        self.boot_id = boot_id
        self.local_bytes = local_bytes
        self._flags = DAEMON_REMOTE_TIER if remote_tier else 0
        self._max_lookup_blocks = max_lookup_blocks
        self._groups: dict[str, ShmIndex] = {}
        self._routes: dict[str, tuple[ShmIndex, int]] = {}  # namespace key -> (its group's index, its rank)
        self._attached: set[str] = set()  # namespace keys whose resident blocks were published

    def attach(self, tenant: str, namespace: Namespace, block_bytes: int) -> tuple[ShmIndex | None, bool]:
        """The index of `namespace`'s group in `tenant`, created at its first memory session (None when indexes are
        off), and whether this namespace is new to it: then the caller publishes what the tiers hold of it."""
        if not self.config.enabled:
            return None, False
        key = group_of(tenant, namespace)
        index = self._groups.get(key)
        if index is None:
            index = ShmIndex(
                capacity_blocks=max(1, self.local_bytes // max(1, block_bytes)),
                tp_world_size=namespace.tp_world_size,
                boot_id=self.boot_id,
                group_key=key,
                max_bytes=self.config.max_bytes,
                daemon_flags=self._flags,
                max_lookup_blocks=self._max_lookup_blocks,
            )
            self._groups[key] = index
            for rank in range(namespace.tp_world_size):
                rank_ns = Namespace(namespace.model_id, namespace.layout_fingerprint, rank, namespace.tp_world_size)
                self._routes[namespace_key(tenant, rank_ns)] = (index, rank)
            log.info("index for %r: %d slots", key, index.slots)
        first = namespace_key(tenant, namespace) not in self._attached
        self._attached.add(namespace_key(tenant, namespace))
        return index, first

    def index_of(self, tenant: str, namespace: Namespace) -> ShmIndex | None:
        return self._groups.get(group_of(tenant, namespace))

    def stored(self, key: BlockKey, source: Source) -> None:
        route = self._routes.get(key[0])
        if route is not None:
            route[0].add(key[1], route[1], source)

    def stored_many(self, keys: Sequence[BlockKey], source: Source) -> None:
        """`stored` for a whole save: one index update per namespace, not one per block."""
        for (index, rank), hashes in self._by_index(keys).items():
            index.add_many(hashes, rank, source)

    def staging(self, keys: Sequence[BlockKey]) -> StagedSave | None:
        """The publication of a save into host memory, to stage while its bytes are copied (None: no index covers
        its blocks); `StagedSave.reveal` stands for `stored_many(keys, Source.HOST)`."""
        parts = tuple((index, Staged(hashes, rank)) for (index, rank), hashes in self._by_index(keys).items())
        return StagedSave(parts) if parts else None

    def dropped_many(self, keys: Sequence[BlockKey], source: Source) -> None:
        for (index, rank), hashes in self._by_index(keys).items():
            index.discard_many(hashes, rank, source)

    def _by_index(self, keys: Sequence[BlockKey]) -> dict[tuple[ShmIndex, int], list[bytes]]:
        if keys and keys[0][0] == keys[-1][0]:
            namespaces = set(map(itemgetter(0), keys))  # one C-speed pass: a request's keys share their namespace
            if len(namespaces) == 1:
                route = self._routes.get(keys[0][0])
                return {} if route is None else {route: list(map(itemgetter(1), keys))}
        out: dict[tuple[ShmIndex, int], list[bytes]] = {}
        for namespace, block_hash in keys:
            route = self._routes.get(namespace)
            if route is not None:
                out.setdefault(route, []).append(block_hash)
        return out

    def dropped(self, key: BlockKey, source: Source) -> None:
        route = self._routes.get(key[0])
        if route is not None:
            route[0].discard(key[1], route[1], source)

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {"index_groups": len(self._groups)}
        for index in self._groups.values():
            for name, value in index.counters().items():
                out[f"index_{name}"] = out.get(f"index_{name}", 0) + value
        return out

    def close(self) -> None:
        for index in self._groups.values():
            index.close()
        self._groups.clear()
        self._routes.clear()
        self._attached.clear()
