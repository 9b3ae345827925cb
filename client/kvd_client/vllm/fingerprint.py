"""The namespace fingerprint: one string the scheduler and every worker compute alike, from configuration alone.

It covers exactly what determines the bytes of a block, and nothing else, so that engines of two vLLM releases
share blocks whenever their bytes are the same:

- the model: its name (or path) and revision, its dtype and quantization, user overrides of its HF config;
- the KV cache: cache dtype, block size, layout (vLLM's KV cache layout and the device type, which picks the
  attention backend), and each KV cache group's layer names and per-layer spec (`spec_facts`);
- the TP and PP sizes (each rank stores its own shard, under its rank in the namespace).

Cache salt and LoRA are not part of it: they seed each request's root key (`kvd_client.hashing.root_hash`).

Per-layer specs are vLLM dataclasses that gain fields from release to release. A field is part of the fingerprint
when it can change a block's bytes; `NOT_BYTES` lists those that cannot (scheduling and masking; the model already
fixes them) and fields that do not compare (`compare=False`, e.g. 0.33's `is_draft`) never are. A field at its
default value is left out, so a field a new release adds with the old behaviour as its default (0.34's
`kv_head_major_slots=False`) leaves the fingerprint as it was, while its non-default value (a different layout)
changes it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import TYPE_CHECKING, Any

from kvd_client.hashing import config_fingerprint

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

SCHEME = "kvd-vllm-fingerprint-v2"  # bump when the key scheme or this list of facts changes

# Spec fields that never change a block's bytes.
NOT_BYTES = frozenset(
    {
        "sliding_window",
        "attention_chunk_size",
        "extra_retained_tokens",
        "non_causal",
        "non_causal_multi_token_decode",
    }
)


def _plain(value: object) -> object:
    """A JSON value that does not depend on the Python or torch version (an IntEnum's str() changed in 3.12)."""
    if isinstance(value, enum.Enum):
        return value.name
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value).removeprefix("torch.")


def _at_default(field: dataclasses.Field[Any], value: object) -> bool:
    if field.default is not dataclasses.MISSING:
        return bool(value == field.default)
    if field.default_factory is not dataclasses.MISSING:
        return bool(value == field.default_factory())
    return False  # a required field is always part of the fingerprint


def spec_facts(spec: object) -> dict[str, object]:
    """The byte-relevant fields of one KV cache spec (see the module docstring)."""
    facts: dict[str, object] = {"type": type(spec).__name__}
    if not dataclasses.is_dataclass(spec):
        facts["repr"] = repr(spec)
        return facts
    for field in dataclasses.fields(spec):
        if not field.compare or field.name in NOT_BYTES:
            continue
        value = getattr(spec, field.name)
        if not _at_default(field, value):
            facts[field.name] = _plain(value)
    return facts


def _device_type(vllm_config: VllmConfig) -> str:
    """The engine's device type ("cuda", "cpu"): with the layout, it decides the attention backend's page shape."""
    device = getattr(getattr(vllm_config, "device_config", None), "device_type", "")
    if device:
        return str(device)
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def layout_facts(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> dict[str, object]:
    """The facts behind the fingerprint. They must be equal on the scheduler and on every worker: configuration,
    never tensors."""
    model = vllm_config.model_config
    groups: list[object] = []
    layout = None
    if kv_cache_config is not None:
        layout = getattr(kv_cache_config, "kv_cache_layout", None)
        for group in kv_cache_config.kv_cache_groups:
            groups.append({"layers": list(group.layer_names), "spec": spec_facts(group.kv_cache_spec)})
    parallel = vllm_config.parallel_config
    overrides = getattr(model, "hf_overrides", None)
    return {
        "scheme": SCHEME,
        "model": str(model.model),
        "revision": str(model.revision or ""),
        "dtype": _plain(model.dtype),
        "quantization": str(model.quantization or ""),
        "hf_overrides": json.dumps(overrides, sort_keys=True, default=str) if isinstance(overrides, dict) else "",
        "cache_dtype": str(vllm_config.cache_config.cache_dtype),
        "block_size": int(vllm_config.cache_config.block_size),
        "kv_cache_layout": str(layout or os.environ.get("VLLM_KV_CACHE_LAYOUT", "")),
        "device": _device_type(vllm_config),
        "groups": groups,
        "tp": int(parallel.tensor_parallel_size),
        "pp": int(parallel.pipeline_parallel_size),
    }


def fingerprint(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> str:
    return config_fingerprint(layout_facts(vllm_config, kv_cache_config))
