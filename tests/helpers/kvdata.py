"""vLLM-shaped CPU KV caches and the deterministic block contents tests compare loaded bytes against.

A block's contents depend only on its hash and layer, never on the block index it sits at, so a worker that loads
block `h` into any index can check the bytes without asking the worker that saved it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """Per layer one `[2, num_blocks, block_size, kv_heads, head_dim]` bfloat16 tensor, as vLLM's flash-attention
    backend lays it out (block_dim 1)."""

    num_layers: int = 2
    num_blocks: int = 64
    block_size: int = 16
    kv_heads: int = 2
    head_dim: int = 32

    @property
    def layer_shape(self) -> tuple[int, int, int, int, int]:
        return (2, self.num_blocks, self.block_size, self.kv_heads, self.head_dim)

    @property
    def layer_names(self) -> list[str]:
        return [f"model.layers.{i}.self_attn.attn" for i in range(self.num_layers)]

    @property
    def block_bytes_per_layer(self) -> int:
        return 2 * self.block_size * self.kv_heads * self.head_dim * 2  # K and V, bf16

    @property
    def block_bytes(self) -> int:
        return self.num_layers * self.block_bytes_per_layer

    def to_args(self) -> list[str]:
        return [
            f"--num-layers={self.num_layers}",
            f"--num-blocks={self.num_blocks}",
            f"--block-size={self.block_size}",
            f"--kv-heads={self.kv_heads}",
            f"--head-dim={self.head_dim}",
        ]


BLOCK_DIM = 1


def make_caches(spec: CacheSpec) -> dict[str, torch.Tensor]:
    """Zeroed caches, one contiguous tensor per layer (a zero block is what 'never written' looks like)."""
    return {name: torch.zeros(spec.layer_shape, dtype=torch.bfloat16) for name in spec.layer_names}


def block_hash(i: int, salt: str = "") -> bytes:
    """A 32-byte block hash, like vLLM's sha256 chained hashes (the daemon only sees opaque bytes)."""
    return hashlib.blake2b(f"{salt}/{i}".encode(), digest_size=32).digest()


def block_content(h: bytes, layer: int, spec: CacheSpec) -> torch.Tensor:
    """Block `h` of layer `layer` as raw int16 bit patterns, shape [2, block_size, kv_heads, head_dim].

    Bits, not floats: comparing and filling through int16 views keeps NaN payloads and -0.0 exact."""
    seed = int.from_bytes(hashlib.blake2b(h + layer.to_bytes(4, "little"), digest_size=8).digest(), "little")
    gen = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
    shape = (2, spec.block_size, spec.kv_heads, spec.head_dim)
    return torch.randint(-(1 << 15), 1 << 15, shape, dtype=torch.int16, generator=gen)


def fill(caches: dict[str, torch.Tensor], spec: CacheSpec, pairs: Iterable[tuple[int, bytes]]) -> None:
    """Write block `h`'s deterministic contents at block index `i` of every layer (CPU or GPU caches)."""
    for i, h in pairs:
        for layer, tensor in enumerate(caches.values()):
            tensor.view(torch.int16)[:, i] = block_content(h, layer, spec).to(tensor.device)


def mismatches(caches: dict[str, torch.Tensor], spec: CacheSpec, pairs: Iterable[tuple[int, bytes]]) -> list[bytes]:
    """The hashes whose block at index `i` is not, bit for bit, block `h`'s contents in every layer."""
    bad = []
    for i, h in pairs:
        for layer, tensor in enumerate(caches.values()):
            if not torch.equal(tensor.view(torch.int16)[:, i].cpu(), block_content(h, layer, spec)):
                bad.append(h)
                break
    return bad


def nonzero_blocks(caches: dict[str, torch.Tensor], exclude: Sequence[int] = ()) -> list[int]:
    """Block indices (outside `exclude`) holding anything but zeros: bytes a load should not have touched."""
    skip = set(exclude)
    out = set()
    for tensor in caches.values():
        per_block = tensor.view(torch.int16).transpose(0, 1).reshape(tensor.shape[1], -1)
        for i in torch.nonzero(per_block.any(dim=1)).flatten().tolist():
            if i not in skip:
                out.add(int(i))
    return sorted(out)
