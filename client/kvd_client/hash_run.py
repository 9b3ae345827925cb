"""HashRun: block hashes held back to back in one buffer, which the index probes as it is (kvd_client.index)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

HASH_BYTES = 32  # a block hash as the index takes it without rehashing (kvd_client.index.DIGEST_BYTES)


class HashRun(Sequence[bytes]):
    """Block hashes of 32 bytes held as one buffer (kvd_client.hashing.BlockHasher keeps them so): a Sequence[bytes]
    that the index probes without joining its items. `buffer` must not change while the run is used (bytes, or a
    memoryview of bytes)."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: bytes | memoryview) -> None:
        if len(buffer) % HASH_BYTES:
            raise ValueError(f"a hash run is a whole number of {HASH_BYTES}-byte hashes, got {len(buffer)} bytes")
        self.buffer = buffer

    def __len__(self) -> int:
        return len(self.buffer) // HASH_BYTES

    def __iter__(self) -> Iterator[bytes]:
        view = memoryview(self.buffer)
        return (view[i : i + HASH_BYTES].tobytes() for i in range(0, len(view), HASH_BYTES))

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> HashRun: ...
    def __getitem__(self, i: int | slice) -> bytes | HashRun:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("a hash run slices with step 1 only")
            return HashRun(memoryview(self.buffer)[start * HASH_BYTES : max(start, stop) * HASH_BYTES])
        n = len(self)
        if not -n <= i < n:
            raise IndexError("hash run index out of range")
        i %= n
        return bytes(self.buffer[i * HASH_BYTES : (i + 1) * HASH_BYTES])
