"""The disk tier's room: how much it may store on its filesystem, and whether it can write there at all.

Room: the tier stores at most min(`capacity_bytes`, what the filesystem lets it have), the latter being what it
stores plus the free space, less `reserve_bytes`, sampled with statvfs at most once per `SAMPLE_INTERVAL_S` (and
after every ENOSPC). Its own writes and evictions move bytes between "stored" and "free" and leave that sum alone,
so a sample stays right until something else on the filesystem grows or shrinks. A filesystem smaller than
`capacity_bytes`, or shared with other data, is then written up to the reserve and no further, evicting as it goes.

Writability: a write that fails for lack of space (ENOSPC, EDQUOT) first makes room (the store evicts and retries
once). When that cannot help (nothing left to evict, a read-only or failing device), the tier is degraded: writes
are dropped at once and counted, and a probe writes and removes one blob-sized file after `retry_ms` (doubling up to
16x) until it succeeds. One log line when the tier degrades, one when it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from kvd.tiers.base import stop_task

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 1.0
_MAX_BACKOFF_FACTOR = 16
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})  # room can be made by evicting
DEVICE = NO_SPACE | {errno.EROFS, errno.EIO}  # every write will fail alike until the device recovers
PROBE_PREFIX = ".tmp-probe-"


class Room:
    """The tier's byte limit on its filesystem (see the module docstring)."""

    def __init__(self, root: Path, capacity_bytes: int, reserve_bytes: int) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        self.reserve_bytes = reserve_bytes
        self._budget: int | None = None  # stored + free - reserve at the last sample; None: not sampled
        self._sampled_at = 0.0
        self.free_bytes = 0

    def limit(self) -> int:
        if self._budget is None:
            return self.capacity_bytes
        return max(0, min(self.capacity_bytes, self._budget))

    def due(self) -> bool:
        return time.monotonic() - self._sampled_at >= SAMPLE_INTERVAL_S

    def sample(self, stored_bytes: int) -> None:
        """statvfs (blocking: call it in the I/O pool); `stored_bytes` is what the tier has on disk right now."""
        self._sampled_at = time.monotonic()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            st = os.statvfs(self.root)
        except OSError:
            return  # the write that follows finds out what is wrong
        self.free_bytes = st.f_bavail * st.f_frsize
        self._budget = stored_bytes + self.free_bytes - self.reserve_bytes


class Writability:
    """Degraded or not, and the probe that ends it."""

    def __init__(self, tier: str, root: Path, retry_s: float, run: Callable[..., Awaitable[object]]) -> None:
        self.tier = tier
        self.root = root
        self.retry_s = retry_s
        self._run = run
        self.degraded = False
        self.reason = ""
        self.transitions = 0
        self._probe_bytes = 0
        self._since = 0.0
        self._probe: asyncio.Task[None] | None = None

    def failed(self, exc: OSError, blob_bytes: int) -> None:
        """A write failed for a reason every write will share (DEVICE errors, no room after evicting)."""
        self._probe_bytes = max(self._probe_bytes, blob_bytes)
        if self.degraded:
            return
        self.degraded = True
        self.transitions += 1
        self.reason = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self._since = time.monotonic()
        log.warning(
            "disk tier %s degraded: cannot write to %s (%s); dropping writes, trying again every %.1f s or more",
            self.tier, self.root, exc.strerror or exc, self.retry_s,
        )  # fmt: skip
        self._probe = asyncio.get_running_loop().create_task(self._probe_loop(), name=f"kvd-{self.tier}-probe")

    def recovered(self) -> None:
        if not self.degraded:
            return
        self.degraded = False
        log.info("disk tier %s: writable again after %.1f s", self.tier, time.monotonic() - self._since)

    async def _probe_loop(self) -> None:
        delay = self.retry_s
        while self.degraded:
            await asyncio.sleep(delay)
            try:
                await self._run(_probe_write, self.root, self._probe_bytes)
            except OSError as exc:
                log.debug("disk tier %s: still not writable: %s", self.tier, exc)
                delay = min(delay * 2, self.retry_s * _MAX_BACKOFF_FACTOR)
                continue
            self.recovered()

    async def close(self) -> None:
        await stop_task(self._probe)


def _probe_write(root: Path, nbytes: int) -> None:
    """Write and remove one file of `nbytes` (a blob's size) in `root`: raises what a write would raise now."""
    path = root / f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            chunk = b"\0" * min(max(nbytes, 1), 1 << 20)
            left = max(nbytes, 1)
            while left > 0:
                left -= os.write(fd, chunk[:left])
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
