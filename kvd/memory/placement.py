"""Where a request's blocks go in the host pool: runs of consecutive slots, so the CUDA transport copies each run
with one DMA (kvd.transports.cuda.kernels.slot_runs merges adjacent slots, across slab boundaries too).

Best fit: a request takes whole empty slabs while it would fill them (adjacent slabs first), and the rest from the
smallest run of free slots in an open slab that holds it, else from a fresh slab, else scattered over the open slabs
(lowest slots first). Only the first OPEN_SCAN open slabs are searched for a run, so placement stays cheap however
fragmented the pool is.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvd.memory.slots import SizeClass, Slab

OPEN_SCAN = 8  # open slabs searched for a best-fitting run (oldest first)


class Placer:
    """Takes free slots of one size class for a request (the pool has made sure there are enough)."""

    def __init__(self, slabs: list[Slab], free_slabs: list[int], slab_bytes: int) -> None:
        self._slabs = slabs
        self._free_slabs = free_slabs  # a stack: the last one is taken first
        self._slab_bytes = slab_bytes

    def take(self, size_class: SizeClass, count: int) -> list[tuple[int, int]]:
        """`count` (slab, slot) places in request order, as few runs as the free space allows."""
        per_slab = self._slab_bytes // size_class.block_bytes
        out: list[tuple[int, int]] = []
        if count >= per_slab and len(self._free_slabs) > 1:
            self._free_slabs.sort(reverse=True)  # lowest index last: consecutive pops are adjacent in memory
        while count - len(out) >= per_slab and self._free_slabs:
            self._take_from(size_class, self._fresh(size_class), per_slab, out)
        rest = count - len(out)
        if rest:
            fit = self._best_fit(size_class, rest)
            if fit is not None:
                slab, first = fit
                self._take_run(size_class, slab, first, rest, out)
            elif self._free_slabs:
                self._take_from(size_class, self._fresh(size_class), rest, out)
            else:
                for index in list(size_class.open):
                    if len(out) == count:
                        break
                    self._take_from(size_class, self._slabs[index], count - len(out), out)
        return out

    def _fresh(self, size_class: SizeClass) -> Slab:
        slab = self._slabs[self._free_slabs.pop()]
        slab.block_bytes = size_class.block_bytes
        slab.free_slots = list(range(self._slab_bytes // size_class.block_bytes - 1, -1, -1))  # lowest last
        slab.sorted = True
        size_class.slabs.add(slab.index)
        size_class.free += len(slab.free_slots)
        size_class.open[slab.index] = None
        return slab

    def _take_from(self, size_class: SizeClass, slab: Slab, want: int, out: list[tuple[int, int]]) -> None:
        """The lowest `want` free slots of `slab` (or all of them), ascending."""
        free = _sorted(slab)
        taken = free[-want:] if want < len(free) else free[:]
        del free[len(free) - len(taken) :]
        out.extend((slab.index, slot) for slot in reversed(taken))
        self._took(size_class, slab, len(taken))

    def _take_run(self, size_class: SizeClass, slab: Slab, first: int, want: int, out: list[tuple[int, int]]) -> None:
        end = first + want
        slab.free_slots = [slot for slot in slab.free_slots if not first <= slot < end]  # still sorted
        out.extend((slab.index, slot) for slot in range(first, end))
        self._took(size_class, slab, want)

    @staticmethod
    def _took(size_class: SizeClass, slab: Slab, taken: int) -> None:
        size_class.free -= taken
        if not slab.free_slots:
            size_class.open.pop(slab.index, None)

    def _best_fit(self, size_class: SizeClass, want: int) -> tuple[Slab, int] | None:
        """(slab, first slot) of the shortest free run of at least `want` slots in the first open slabs."""
        best: tuple[int, Slab, int] | None = None
        for scanned, index in enumerate(size_class.open):
            if scanned == OPEN_SCAN:
                break
            slab = self._slabs[index]
            for first, length in _runs(_sorted(slab)):
                if length >= want and (best is None or length < best[0]):
                    best = (length, slab, first)
                    if length == want:
                        return slab, first
        return None if best is None else (best[1], best[2])


def _sorted(slab: Slab) -> list[int]:
    """The slab's free slots, descending (the lowest is taken first, from the end)."""
    if not slab.sorted:
        slab.free_slots.sort(reverse=True)
        slab.sorted = True
    return slab.free_slots


def _runs(descending: list[int]) -> Iterator[tuple[int, int]]:
    """(first slot, length) of each run of consecutive slots in a descending free list."""
    i = len(descending) - 1
    while i >= 0:
        first = descending[i]
        j = i
        while j > 0 and descending[j - 1] == descending[j] + 1:
            j -= 1
        yield first, i - j + 1
        i = j - 1
