"""What differs between vLLM releases, tested without an engine: the version gate, the fingerprint's stability
across releases, and the memory-access and sleep-mode decisions."""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace
from typing import Any

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

# The fingerprint of `_fixed_config()`. It changes only with the key scheme (fingerprint.SCHEME): a change here
# makes every kvd cache cold for every user, so it must be deliberate.
PINNED = "5135f60cf5958e4b8247ddb6216a07c2"


def _spec(cls: Any = None, **extra: Any) -> Any:
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    fields: dict[str, Any] = {"block_size": 16, "num_kv_heads": 8, "head_size": 128, "dtype": torch.bfloat16}
    return (cls or FullAttentionSpec)(**{**fields, **extra})


def _fixed_config(spec: Any = None) -> tuple[Any, Any]:
    """A Llama-3.1-8B-like engine on CUDA, TP 2, as vLLM's config objects present it to the connector."""
    import torch

    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(
            model="meta-llama/Llama-3.1-8B-Instruct",
            revision=None,
            dtype=torch.bfloat16,
            quantization=None,
            hf_overrides={},
        ),
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=16),
        device_config=SimpleNamespace(device_type="cuda"),
        parallel_config=SimpleNamespace(tensor_parallel_size=2, pipeline_parallel_size=1),
    )
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(32)]
    group = SimpleNamespace(layer_names=layers, kv_cache_spec=spec if spec is not None else _spec())
    return vllm_config, SimpleNamespace(kv_cache_layout="NHD", kv_cache_groups=[group])


def _later_release(*fields: tuple[str, type, Any]) -> Any:
    """FullAttentionSpec as a later release declares it: the same class with more fields."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return dataclasses.make_dataclass("FullAttentionSpec", list(fields), bases=(FullAttentionSpec,), frozen=True)


def test_fingerprint_is_pinned() -> None:
    from kvd_client.vllm.fingerprint import fingerprint

    assert fingerprint(*_fixed_config()) == PINNED


def test_releases_with_the_same_bytes_share_the_fingerprint() -> None:
    from kvd_client.vllm.fingerprint import fingerprint

    # 0.33 adds is_draft (compare=False), 0.34 kv_head_major_slots (False: the old layout).
    v033 = _later_release(("is_draft", bool, dataclasses.field(default=False, kw_only=True, compare=False)))
    v034 = _later_release(
        ("is_draft", bool, dataclasses.field(default=False, kw_only=True, compare=False)),
        ("kv_head_major_slots", bool, dataclasses.field(default=False, kw_only=True)),
    )
    base = fingerprint(*_fixed_config())
    assert fingerprint(*_fixed_config(_spec(v033))) == base
    assert fingerprint(*_fixed_config(_spec(v033, is_draft=True))) == base
    assert fingerprint(*_fixed_config(_spec(v034))) == base
    # A different layout is different bytes: never shared.
    assert fingerprint(*_fixed_config(_spec(v034, kv_head_major_slots=True))) != base


def test_fingerprint_covers_what_makes_the_bytes() -> None:
    from kvd_client.vllm.fingerprint import fingerprint

    base = fingerprint(*_fixed_config())
    variants = []
    for path, value in [
        ("model_config.model", "mistralai/Mistral-7B"),
        ("model_config.revision", "abc123"),
        ("model_config.dtype", "float16"),
        ("model_config.quantization", "fp8"),
        ("model_config.hf_overrides", {"rope_scaling": {"factor": 2.0}}),
        ("cache_config.cache_dtype", "fp8"),
        ("cache_config.block_size", 32),
        ("device_config.device_type", "cpu"),
        ("parallel_config.tensor_parallel_size", 4),
    ]:
        vllm_config, kv_cache_config = _fixed_config()
        owner, name = path.split(".")
        setattr(getattr(vllm_config, owner), name, value)
        variants.append(fingerprint(vllm_config, kv_cache_config))
    vllm_config, kv_cache_config = _fixed_config(_spec(head_size=64))
    variants.append(fingerprint(vllm_config, kv_cache_config))
    vllm_config, kv_cache_config = _fixed_config()
    kv_cache_config.kv_cache_layout = "HND"
    variants.append(fingerprint(vllm_config, kv_cache_config))
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_fingerprint_ignores_what_does_not() -> None:
    from kvd_client.vllm.fingerprint import fingerprint

    base = fingerprint(*_fixed_config())
    # Masking and scheduling fields do not change a block's bytes (the model fixes them anyway).
    assert fingerprint(*_fixed_config(_spec(sliding_window=4096))) == base
    vllm_config, kv_cache_config = _fixed_config()
    vllm_config.model_config.max_model_len = 4096  # not read
    assert fingerprint(vllm_config, kv_cache_config) == base


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.32.0", True),
        ("0.32.0+cpu", True),
        ("0.33.0", True),
        ("0.34.0", True),
        ("0.34.2.dev7+g0123abc", True),
        ("0.31.2", False),
        ("0.35.0", False),
        ("1.0.0", False),
        ("", False),
        ("nightly", False),
    ],
)
def test_version_gate(version: str, ok: bool) -> None:
    from kvd_client import KvdError
    from kvd_client.vllm.compat import check_supported

    if ok:
        assert check_supported(version) == version
        return
    with pytest.raises(KvdError, match=r"supports vLLM 0\.32 to 0\.34"):
        check_supported(version)


def test_resumed_requests_from_either_place() -> None:
    from kvd_client.vllm.compat import resumed_req_ids

    assert resumed_req_ids(SimpleNamespace(req_ids=["a"], resumed_req_ids={"a"})) == {"a"}
    assert list(resumed_req_ids(SimpleNamespace(req_ids=["a"]))) == []  # 0.34: resumed requests come as new ones


def test_memory_access_choice() -> None:
    from kvd_client import KvdError
    from kvd_client.vllm.compat import resolve_access
    from kvd_client.vllm.config import MemoryAccess

    assert resolve_access(MemoryAccess.AUTO, on_cuda=True) is MemoryAccess.FD
    assert resolve_access(MemoryAccess.AUTO, on_cuda=False) is None
    assert resolve_access(MemoryAccess.LEGACY_IPC, on_cuda=True) is MemoryAccess.LEGACY_IPC
    assert MemoryAccess.parse("LEGACY_IPC") is MemoryAccess.LEGACY_IPC
    assert MemoryAccess.parse(None) is MemoryAccess.AUTO
    with pytest.raises(KvdError, match="kv_cache_access"):
        MemoryAccess.parse("cuda_ipc")


def test_sleep_mode_refused_on_this_release_with_the_reason() -> None:
    from kvd_client.vllm.compat import has_sleep_hooks, sleep_mode_refusal
    from kvd_client.vllm.config import MemoryAccess

    reason = sleep_mode_refusal(MemoryAccess.AUTO)
    if has_sleep_hooks():
        pytest.skip("the installed vLLM has sleep hooks; tests/client/test_vllm_releases.py covers later releases")
    assert reason is not None and "0.33" in reason
