"""`kv_connector_extra_config`, parsed once into one typed object (docs/vllm.md lists the keys)."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvd_client.errors import InvalidArgument

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class MemoryAccess(enum.StrEnum):
    """How kvd reaches a CUDA KV cache; decides what the connector answers vLLM's `kv_cache_access()` (0.34+).

    AUTO: driver-mapped memory shared by file descriptor on CUDA (vLLM keeps its extensible KV cache and allocates
    it exportable); nothing on other devices. FD: always the file-descriptor path. LEGACY_IPC: CUDA IPC handles, for
    which vLLM turns its extensible KV cache off (the setting to use where that cache cannot be on, e.g. with
    `kv_cache_memory_bytes`).
    """

    AUTO = "auto"
    FD = "fd"
    LEGACY_IPC = "legacy_ipc"

    @classmethod
    def parse(cls, value: object) -> MemoryAccess:
        try:
            return cls(str(value or "auto").lower())
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            message = f"kv_connector_extra_config kv_cache_access={value!r}: use one of {choices}"
            raise InvalidArgument(message) from None


class RemoteLookups(enum.StrEnum):
    """What a lookup does about a remote tier, which the daemon's shared index does not cover (docs/vllm.md).

    PREFETCH: answer from the index at once; where a remote tier might add blocks past the local hit, also send the
    lookup RPC without waiting for it (the daemon starts copying remote hits up, so later requests find them local).
    WAIT: where a remote tier might add blocks, answer "ask again" until the RPC returns (one scheduler step per such
    request, for the longer hit). OFF: local tiers only.
    """

    PREFETCH = "prefetch"
    WAIT = "wait"
    OFF = "off"


def _choice(enum_type: type[enum.StrEnum], extra: Mapping[str, Any], key: str, default: str) -> Any:
    value = str(extra.get(key) or default).lower()
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_type)
        raise InvalidArgument(f"kv_connector_extra_config {key}={value!r}: use one of {choices}") from None


def extra_config(kv_transfer_config: Any) -> dict[str, Any]:
    return dict(getattr(kv_transfer_config, "kv_connector_extra_config", None) or {})


def _flag(extra: Mapping[str, Any], key: str, default: bool) -> bool:
    value = extra.get(key, default)
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    socket: str
    model_id: str
    layout_fingerprint: str  # an override; "" = computed from the configuration
    timeout_s: float  # RPC timeout of the kvd client; also bounds flushes at shutdown and sleep
    save_generated_tokens: bool
    loads: bool  # kv_role is a consumer and "load" is not off
    saves: bool  # kv_role is a producer and "save" is not off
    memory_access: MemoryAccess
    remote_lookups: RemoteLookups = RemoteLookups.PREFETCH
    in_step_loads: bool = True  # hits all in the daemon's host memory load inside the step (kvd_client.vllm.in_step)

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> ConnectorConfig:
        transfer = vllm_config.kv_transfer_config
        extra = extra_config(transfer)
        socket = str(extra.get("socket") or os.environ.get("KVD_SOCKET", ""))
        if not socket:
            raise InvalidArgument('KvdConnector needs kv_connector_extra_config["socket"] (or $KVD_SOCKET)')
        try:
            timeout_s = float(extra.get("timeout_s", 5.0))
        except (TypeError, ValueError):
            message = f"kv_connector_extra_config timeout_s={extra['timeout_s']!r} is not a number"
            raise InvalidArgument(message) from None
        return cls(
            socket=socket,
            model_id=str(extra.get("model_id") or vllm_config.model_config.model),
            layout_fingerprint=str(extra.get("layout_fingerprint") or ""),
            timeout_s=timeout_s,
            save_generated_tokens=_flag(extra, "save_generated_tokens", True),
            loads=bool(transfer is not None and transfer.is_kv_consumer) and _flag(extra, "load", True),
            saves=bool(transfer is not None and transfer.is_kv_producer) and _flag(extra, "save", True),
            memory_access=MemoryAccess.parse(extra.get("kv_cache_access")),
            remote_lookups=_choice(RemoteLookups, extra, "remote_lookups", "prefetch"),
            in_step_loads=_flag(extra, "in_step_loads", True),
        )
