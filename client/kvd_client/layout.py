"""KV-cache layouts: what block N of a worker's cache is, in bytes, on both sides of the wire.

The client describes its tensors with these types; the daemon derives each layer's block geometry from the same
code, so a block is the same bytes to both. Plain frozen dataclasses: protobuf stays at the rpc edge.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvd_client.errors import InvalidArgument


class DType(enum.IntEnum):
    """Element types, numbered as kvd.v1.DType."""

    BFLOAT16 = 1
    FLOAT16 = 2
    FLOAT32 = 3
    FLOAT8_E4M3 = 4
    FLOAT8_E5M2 = 5
    INT8 = 6
    UINT8 = 7

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @classmethod
    def from_torch(cls, dtype: object) -> DType:
        name = str(dtype).removeprefix("torch.")
        try:
            return _FROM_TORCH_NAME[name]
        except KeyError:
            raise InvalidArgument(f"unsupported KV dtype {dtype}") from None

    @property
    def torch_name(self) -> str:
        return _TORCH_NAME[self]


_ITEMSIZE = {
    DType.BFLOAT16: 2,
    DType.FLOAT16: 2,
    DType.FLOAT32: 4,
    DType.FLOAT8_E4M3: 1,
    DType.FLOAT8_E5M2: 1,
    DType.INT8: 1,
    DType.UINT8: 1,
}
_TORCH_NAME = {
    DType.BFLOAT16: "bfloat16",
    DType.FLOAT16: "float16",
    DType.FLOAT32: "float32",
    DType.FLOAT8_E4M3: "float8_e4m3fn",
    DType.FLOAT8_E5M2: "float8_e5m2",
    DType.INT8: "int8",
    DType.UINT8: "uint8",
}
_FROM_TORCH_NAME = {name: dtype for dtype, name in _TORCH_NAME.items()}


@dataclass(frozen=True, slots=True)
class LayerLayout:
    """One layer's contiguous KV tensor; `block_dim` is the dimension indexed by block id."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    block_dim: int

    def __post_init__(self) -> None:
        if not self.shape or any(d <= 0 for d in self.shape):
            raise InvalidArgument(f"layer {self.name!r}: shape {self.shape} must be non-empty and positive")
        if not 0 <= self.block_dim < len(self.shape):
            raise InvalidArgument(f"layer {self.name!r}: block_dim {self.block_dim} outside shape {self.shape}")

    @property
    def num_blocks(self) -> int:
        return self.shape[self.block_dim]

    @property
    def segments_per_block(self) -> int:
        """Runs of contiguous bytes one block occupies (2 for `[2, blocks, ...]`: K and V)."""
        return math.prod(self.shape[: self.block_dim])

    @property
    def segment_bytes(self) -> int:
        return math.prod(self.shape[self.block_dim + 1 :]) * self.dtype.itemsize

    @property
    def segment_stride(self) -> int:
        """Bytes between segment i and i+1 of the same block."""
        return self.num_blocks * self.segment_bytes

    @property
    def block_bytes(self) -> int:
        return self.segments_per_block * self.segment_bytes

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def canonical(self) -> str:
        # num_blocks is left out on purpose: two workers with caches of different sizes store identical blocks.
        dims = ",".join("*" if i == self.block_dim else str(d) for i, d in enumerate(self.shape))
        return f"{self.name}:{dims}:{self.dtype.name}"


@dataclass(frozen=True, slots=True)
class KvLayout:
    layers: tuple[LayerLayout, ...]
    block_size_tokens: int = 0
    # Bytes of one stored block: every layer's K and V, in layer order. Computed once: every save and load needs it
    # several times, and summing it over a model's layers took longer than planning the request.
    block_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise InvalidArgument("a KV layout needs at least one layer")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise InvalidArgument("layer names must be unique")
        counts = {layer.num_blocks for layer in self.layers}
        if len(counts) != 1:
            raise InvalidArgument(f"every layer must hold the same number of blocks, got {sorted(counts)}")
        object.__setattr__(self, "block_bytes", sum(layer.block_bytes for layer in self.layers))

    @property
    def num_blocks(self) -> int:
        return self.layers[0].num_blocks

    def fingerprint(self) -> str:
        """A stable digest of everything that shapes a block's bytes (not PYTHONHASHSEED-dependent)."""
        text = f"kvd-layout-v1|{self.block_size_tokens}|" + "|".join(layer.canonical() for layer in self.layers)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Any], block_dim: int, block_size_tokens: int = 0) -> KvLayout:
        """Describe torch tensors (duck-typed: shape, dtype, is_contiguous) that all index blocks on `block_dim`."""
        layers = []
        for name, tensor in tensors.items():
            if not tensor.is_contiguous():
                raise InvalidArgument(f"layer {name!r} is not contiguous; kvd needs contiguous KV tensors")
            layers.append(
                LayerLayout(
                    name=name,
                    shape=tuple(int(d) for d in tensor.shape),
                    dtype=DType.from_torch(tensor.dtype),
                    block_dim=block_dim,
                )
            )
        return cls(layers=tuple(layers), block_size_tokens=block_size_tokens)


@dataclass(frozen=True, slots=True)
class Namespace:
    """Blocks are shared exactly between workers with equal namespaces."""

    model_id: str
    layout_fingerprint: str
    tp_rank: int = 0
    tp_world_size: int = 1

    def __post_init__(self) -> None:
        if not self.model_id:
            raise InvalidArgument("namespace.model_id is empty")
        if self.tp_world_size < 1 or not 0 <= self.tp_rank < self.tp_world_size:
            raise InvalidArgument(f"tp_rank {self.tp_rank} must lie in [0, tp_world_size={self.tp_world_size})")

    @property
    def key(self) -> str:
        return f"{self.model_id}|{self.layout_fingerprint}|tp{self.tp_rank}/{self.tp_world_size}"
