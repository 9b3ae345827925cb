"""The block store the service talks to: which blocks exist, where, and slots to copy them into or out of.

The service layer decides (sessions, admission); the transports move bytes; the store keeps the books of what is
stored. L1 is the host pool (the only tier the transports copy to and from directly); lower tiers (disk, remote
kvstore) sit behind it (kvd.tiers.chain) and are reached only through the same interface.

A save and a load are each two verbs around the copy the service runs in between:

    await store.make_room(keys, nbytes)        (may wait, bounded)
    plan = store.prepare_save(keys, nbytes)    reserve L1 slots       entries = await store.prepare_load(keys)
    ... copy worker blocks into plan.entries ...                      ... copy entries into the worker ...
        (plan.while_copying, once it is queued)
    store.complete_save(plan, ok)              commit, or drop        store.complete_load(entries)   unpin
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvd.memory.host_pool import Entry, HostPool
from kvd.memory.index_registry import BlockListener, StagedSave
from kvd.memory.shm_index import Source
from kvd.types import BlockKey, Tier, TierSnapshot


@dataclass(slots=True)
class SavePlan:
    """What a save has to do, per position in its batch. Columns, not a record per block: a large save has hundreds."""

    positions: list[int] = field(default_factory=list)  # batch positions of the reserved slots this save fills
    entries: list[Entry] = field(default_factory=list)  # those slots, in the same order
    in_flight: list[tuple[int, asyncio.Future[bool]]] = field(default_factory=list)  # another save is writing it
    no_room: list[int] = field(default_factory=list)
    # (block bytes, blocks) reserved without retiring blocks ahead of need: complete_save schedules that upkeep
    retire_ahead: tuple[int, int] | None = None
    staged: StagedSave | None = None  # the index publication of `entries`, placed while they are copied

    @property
    def while_copying(self) -> Callable[[], None] | None:
        """What to run once the copy into `entries` is queued (any thread): placing their index entries, invisible
        until complete_save reveals them, so only the reveal is left between the last byte and the notice."""
        return self.staged.stage if self.staged is not None else None

    @property
    def to_write(self) -> list[tuple[int, Entry]]:
        """(batch position, reserved slot) pairs."""
        return list(zip(self.positions, self.entries, strict=True))


class BlockStore(abc.ABC):
    """What the service asks of storage. Every method runs on the event loop; none blocks it."""

    @property
    @abc.abstractmethod
    def max_block_bytes(self) -> int:
        """The largest block this store can hold (a session whose blocks are larger is refused)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin serving (start backends and background writers). Called once, by the daemon, in its event loop."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush what can be flushed and release everything. Called once, after every operation finished."""

    @abc.abstractmethod
    async def lookup(self, keys: Sequence[BlockKey]) -> tuple[int, tuple[Tier, ...]]:
        """How many leading `keys` are loadable, and from which tier each of them would come.

        Args:
            keys: the blocks of one request, in prefix order.
        Returns:
            (hit blocks, one Tier per hit block).
        """

    async def make_room(self, keys: Sequence[BlockKey], nbytes: int) -> None:  # noqa: B027 - optional hook
        """Called right before `prepare_save(keys, nbytes)`: a store whose reservation would evict blocks that
        exist nowhere else may wait here (bounded) until they can be written down, rather than lose them."""

    @abc.abstractmethod
    def prepare_save(self, keys: Sequence[BlockKey], nbytes: int) -> SavePlan:
        """Reserve slots for the keys not stored yet. Keys already stored need nothing; keys being written by another
        save are waited for, so this save's notice never claims a block that is not there yet.

        Args:
            keys: the blocks to store (duplicates are planned once).
            nbytes: the size of every block.
        Returns:
            The plan: slots to fill, saves to wait for, and positions that found no room.
        """

    @abc.abstractmethod
    def complete_save(self, plan: SavePlan, ok: bool) -> None:
        """Commit the plan's slots (their bytes are complete: lookups hit from now on) or drop them.

        Args:
            plan: what `prepare_save` returned.
            ok: whether every slot of the plan was written.
        """

    @abc.abstractmethod
    async def prepare_load(self, keys: Sequence[BlockKey]) -> list[Entry | None]:
        """Pin the stored blocks for reading (fetching them into L1 first where they are only below it).

        Args:
            keys: the blocks to load.
        Returns:
            One entry per key, pinned; None where the block is missing.
        """

    @abc.abstractmethod
    def complete_load(self, entries: Sequence[Entry | None]) -> None:
        """Unpin what `prepare_load` pinned (the copy out of the slots is over).

        Args:
            entries: what `prepare_load` returned.
        """

    @abc.abstractmethod
    def snapshots(self) -> tuple[TierSnapshot, ...]:
        """One snapshot per tier, fastest first."""

    def publish_to(self, listener: BlockListener) -> None:  # noqa: B027 - optional hook
        """Report every block that enters or leaves a local tier (host pool, write-down queue, disk) to `listener`
        from now on: the published index."""

    def resident(self, namespace_key: str) -> list[tuple[bytes, Source]]:
        """What the local tiers hold of `namespace_key` now (hash, where), to publish a namespace's blocks when its
        index starts covering it."""
        return []

    def counters(self) -> dict[str, int]:
        """Counters beyond TierSnapshot (write-downs, prefetches, admission), flat, for stats and metrics."""
        return {}

    def degraded_tiers(self) -> tuple[str, ...]:
        """Names of tiers that cannot serve now (health reports them; the daemon keeps serving from the others)."""
        return tuple(snapshot.name for snapshot in self.snapshots() if not snapshot.healthy)


class HostStore(BlockStore):
    """L1 only: the host pool. It is the whole store when no backend is configured, and the part the tier chain
    composes otherwise (the chain also reserves and finishes fetched blocks through it, so a save of a key being
    fetched waits for the fetch like for another save)."""

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self._writing: dict[BlockKey, asyncio.Future[bool]] = {}  # reserved, being written: True once committed
        self.hits = 0
        self.misses = 0

    @property
    def max_block_bytes(self) -> int:
        return self.pool.slab_bytes

    # -- lookups -------------------------------------------------------------------------------------------------

    async def lookup(self, keys: Sequence[BlockKey]) -> tuple[int, tuple[Tier, ...]]:
        hit = self.pool.touch_prefix(keys)
        self.hits += hit
        self.misses += len(keys) - hit
        return hit, (Tier.HOST_MEMORY,) * hit

    def count_late_hits(self, blocks: int) -> None:
        """`blocks` keys that missed the L1 prefix were found in L1 after all (behind a block only in a lower tier)."""
        self.hits += blocks
        self.misses -= blocks

    # -- saves ---------------------------------------------------------------------------------------------------

    def prepare_save(self, keys: Sequence[BlockKey], nbytes: int) -> SavePlan:
        pool, writing = self.pool, self._writing
        if pool.holds_none(keys) and writing.keys().isdisjoint(keys) and len(set(keys)) == len(keys):
            # Every block new (the common save): set operations at C speed instead of four lookups a block.
            # Retiring blocks ahead of need (an index update per block) is upkeep for later saves, not this one's:
            # complete_save leaves it to the loop's next turn, after this save's notice, instead of running it
            # between the request and its copy (or, on the next turn, while the copy waits for the GIL to be queued).
            entries = pool.reserve_many(keys, nbytes, checked=True, retire_ahead=False)
            reserved = keys[: len(entries)]
            writing.update(dict.fromkeys(reserved, asyncio.get_running_loop().create_future()))
            positions, no_room = list(range(len(entries))), list(range(len(entries), len(keys)))
            plan = SavePlan(positions, entries, no_room=no_room, retire_ahead=(nbytes, len(entries)))
            plan.staged = pool.staging(reserved)
            return plan
        return self._prepare_mixed(keys, nbytes)

    def _prepare_mixed(self, keys: Sequence[BlockKey], nbytes: int) -> SavePlan:
        """prepare_save where some keys are stored, being written, or repeated."""
        plan = SavePlan()
        seen: set[BlockKey] = set()
        fresh: list[int] = []
        pool, writing = self.pool, self._writing
        for i, key in enumerate(keys):
            if key in seen:
                continue
            seen.add(key)
            if pool.get(key) is not None or pool.reclaim(key) is not None:  # stored (retired: bytes still there)
                continue
            pending = writing.get(key)
            if pending is not None:
                plan.in_flight.append((i, pending))
                continue
            fresh.append(i)
        # One reservation call and one future for the whole save (finish_writes settles its blocks together).
        entries = pool.reserve_many([keys[i] for i in fresh], nbytes)
        done = asyncio.get_running_loop().create_future()
        for entry in entries:
            writing[entry.key] = done
        plan.positions, plan.entries = fresh[: len(entries)], entries
        plan.no_room = fresh[len(entries) :]
        return plan

    def complete_save(self, plan: SavePlan, ok: bool) -> None:
        self.finish_writes(plan.entries, ok, plan.staged)
        if plan.retire_ahead is not None:
            asyncio.get_running_loop().call_soon(self.pool.retire_ahead, *plan.retire_ahead)

    def reserve(self, key: BlockKey, nbytes: int) -> Entry:
        """A RESERVED slot for `key`, registered as being written (raises ResourceExhausted, InvalidArgument)."""
        entry = self.pool.reserve(key, nbytes)
        self._writing[key] = asyncio.get_running_loop().create_future()
        return entry

    def pending_write(self, key: BlockKey) -> asyncio.Future[bool] | None:
        """The write in flight for `key`, if any: resolves True once committed, False if dropped."""
        return self._writing.get(key)

    def finish_writes(self, entries: Sequence[Entry], ok: bool, staged: StagedSave | None = None) -> None:
        """Commit (bytes complete) or drop reserved slots, and wake saves waiting on them. `staged`: their index
        publication, staged during the copy (revealed, or taken back)."""
        if ok:
            self.pool.commit_many(entries, staged)
        else:
            if staged is not None:
                staged.unstage()
            for entry in entries:
                self.pool.discard(entry)
        writing = self._writing
        for waiter in {writing.pop(entry.key, None) for entry in entries}:  # a save's blocks share one future
            if waiter is not None and not waiter.done():
                waiter.set_result(ok)

    # -- loads ---------------------------------------------------------------------------------------------------

    async def prepare_load(self, keys: Sequence[BlockKey]) -> list[Entry | None]:
        return self.pool.pin_stored(keys)  # one pass, one clock read

    def pin(self, key: BlockKey) -> Entry | None:
        """The stored entry for `key`, pinned for reading and marked used; None where it is not in L1."""
        entry = self.pool.get(key) or self.pool.reclaim(key)  # a retired block is loadable until its slot is reused
        if entry is not None:
            self.pool.pin(entry)
            self.pool.touch(entry)
        return entry

    def complete_load(self, entries: Sequence[Entry | None]) -> None:
        for entry in entries:
            if entry is not None:
                self.pool.unpin(entry)

    # -- the published index -------------------------------------------------------------------------------------

    def publish_to(self, listener: BlockListener) -> None:
        self.pool.listener = listener

    def resident(self, namespace_key: str) -> list[tuple[bytes, Source]]:
        return [(h, Source.HOST) for h in self.pool.resident(namespace_key)]

    def counters(self) -> dict[str, int]:
        """Slots reused before their block's grace period was over (kvd.memory.retire)."""
        return {"host_grace_cut": self.pool.grace_cut}

    # -- stats ---------------------------------------------------------------------------------------------------

    def snapshots(self) -> tuple[TierSnapshot, ...]:
        pool = self.pool
        return (
            TierSnapshot(
                tier=Tier.HOST_MEMORY,
                name="host",
                capacity_bytes=pool.capacity_bytes,
                used_bytes=pool.used_bytes,
                blocks=len(pool),
                hits=self.hits,
                misses=self.misses,
                evictions=pool.evictions,
            ),
        )

    async def close(self) -> None:
        for waiter in self._writing.values():
            if not waiter.done():
                waiter.set_result(False)
