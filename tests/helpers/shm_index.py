"""What the published index's tests share: block keys, a small index, and both of the client's probe paths on it."""

from __future__ import annotations

import hashlib
import os

from kvd_client.index import IndexReader

from kvd.memory.shm_index import ShmIndex


def key(kind: str, i: int, size: int = 32) -> bytes:
    return hashlib.blake2b(f"{kind}/{i}".encode(), digest_size=size).digest()


def make_index(capacity: int = 1024, world: int = 1) -> ShmIndex:
    return ShmIndex(capacity_blocks=capacity, tp_world_size=world, boot_id="boot-1", group_key=f"test|{world}")


def readers(index: ShmIndex) -> list[IndexReader]:
    """A reader on the index per probe path: numpy, then plain Python."""
    fd = index.open_reader_fd()
    try:
        return [IndexReader(fd, use_numpy=True), IndexReader(fd, use_numpy=False)]
    finally:
        os.close(fd)
