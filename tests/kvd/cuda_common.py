"""GPU KV caches for the CUDA tests: vLLM's layout, placed inside one allocation at a non-zero offset (tensors rarely
start at an allocation's base), with deterministic per-(hash, layer) contents."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tests.helpers.kvdata import CacheSpec, fill, mismatches

SPEC = CacheSpec(num_layers=4, num_blocks=256, block_size=16, kv_heads=8, head_dim=128)


def make_gpu_caches(offset_elements: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Zeroed per-layer views `[2, blocks, 16, 8, 128]` into one bf16 allocation, the first at `offset_elements`."""
    per_layer = 1
    for d in SPEC.layer_shape:
        per_layer *= d
    backing = torch.zeros(offset_elements + SPEC.num_layers * per_layer, dtype=torch.bfloat16, device="cuda")
    caches = {
        name: backing[offset_elements + i * per_layer : offset_elements + (i + 1) * per_layer].view(SPEC.layer_shape)
        for i, name in enumerate(SPEC.layer_names)
    }
    return caches, backing


def write_blocks(caches: dict[str, torch.Tensor], pairs: Iterable[tuple[int, bytes]]) -> None:
    fill(caches, SPEC, pairs)


def mismatched_blocks(caches: dict[str, torch.Tensor], pairs: Iterable[tuple[int, bytes]]) -> list[bytes]:
    return mismatches(caches, SPEC, pairs)
