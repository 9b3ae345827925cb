from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3: _ClassVar[DType]
    DTYPE_FLOAT8_E5M2: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_HOST_MEMORY: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]
    TIER_REMOTE: _ClassVar[Tier]
DTYPE_UNSPECIFIED: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT8_E4M3: DType
DTYPE_FLOAT8_E5M2: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
TIER_UNSPECIFIED: Tier
TIER_HOST_MEMORY: Tier
TIER_DISK: Tier
TIER_REMOTE: Tier

class LayerLayout(_message.Message):
    __slots__ = ("name", "shape", "dtype", "block_dim")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    block_dim: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., block_dim: _Optional[int] = ...) -> None: ...

class KvLayout(_message.Message):
    __slots__ = ("layers", "block_size_tokens")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerLayout]
    block_size_tokens: int
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerLayout, _Mapping]]] = ..., block_size_tokens: _Optional[int] = ...) -> None: ...

class Namespace(_message.Message):
    __slots__ = ("model_id", "layout_fingerprint", "tp_rank", "tp_world_size")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    layout_fingerprint: str
    tp_rank: int
    tp_world_size: int
    def __init__(self, model_id: _Optional[str] = ..., layout_fingerprint: _Optional[str] = ..., tp_rank: _Optional[int] = ..., tp_world_size: _Optional[int] = ...) -> None: ...

class CpuRegion(_message.Message):
    __slots__ = ("address", "nbytes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    address: int
    nbytes: int
    def __init__(self, address: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class CpuMemory(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[CpuRegion]
    def __init__(self, layers: _Optional[_Iterable[_Union[CpuRegion, _Mapping]]] = ...) -> None: ...

class CudaAllocation(_message.Message):
    __slots__ = ("ipc_handle", "nbytes")
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ipc_handle: bytes
    nbytes: int
    def __init__(self, ipc_handle: _Optional[bytes] = ..., nbytes: _Optional[int] = ...) -> None: ...

class CudaLayer(_message.Message):
    __slots__ = ("allocation", "offset", "nbytes")
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    allocation: int
    offset: int
    nbytes: int
    def __init__(self, allocation: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class CudaMemory(_message.Message):
    __slots__ = ("device_uuid", "allocations", "layers")
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    device_uuid: str
    allocations: _containers.RepeatedCompositeFieldContainer[CudaAllocation]
    layers: _containers.RepeatedCompositeFieldContainer[CudaLayer]
    def __init__(self, device_uuid: _Optional[str] = ..., allocations: _Optional[_Iterable[_Union[CudaAllocation, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[CudaLayer, _Mapping]]] = ...) -> None: ...

class RegisterSessionRequest(_message.Message):
    __slots__ = ("namespace", "layout", "pid", "credential_token", "cpu", "cuda", "worker_name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    layout: KvLayout
    pid: int
    credential_token: bytes
    cpu: CpuMemory
    cuda: CudaMemory
    worker_name: str
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., pid: _Optional[int] = ..., credential_token: _Optional[bytes] = ..., cpu: _Optional[_Union[CpuMemory, _Mapping]] = ..., cuda: _Optional[_Union[CudaMemory, _Mapping]] = ..., worker_name: _Optional[str] = ...) -> None: ...

class RegisterSessionResponse(_message.Message):
    __slots__ = ("session_id", "lease_ms", "boot_id", "block_bytes", "max_batch_blocks")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    lease_ms: int
    boot_id: str
    block_bytes: int
    max_batch_blocks: int
    def __init__(self, session_id: _Optional[str] = ..., lease_ms: _Optional[int] = ..., boot_id: _Optional[str] = ..., block_bytes: _Optional[int] = ..., max_batch_blocks: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("boot_id",)
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    boot_id: str
    def __init__(self, boot_id: _Optional[str] = ...) -> None: ...

class UnregisterRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class UnregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("session_id", "block_hashes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[str] = ..., block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hit_blocks", "tiers")
    HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    hit_blocks: int
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    def __init__(self, hit_blocks: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ...) -> None: ...

class BlockTransfer(_message.Message):
    __slots__ = ("block_index", "block_hash")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    block_hash: bytes
    def __init__(self, block_index: _Optional[int] = ..., block_hash: _Optional[bytes] = ...) -> None: ...

class TransferRequest(_message.Message):
    __slots__ = ("session_id", "blocks", "ready_event", "client_tag")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    READY_EVENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TAG_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    blocks: _containers.RepeatedCompositeFieldContainer[BlockTransfer]
    ready_event: bytes
    client_tag: int
    def __init__(self, session_id: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[BlockTransfer, _Mapping]]] = ..., ready_event: _Optional[bytes] = ..., client_tag: _Optional[int] = ...) -> None: ...

class TransferAccepted(_message.Message):
    __slots__ = ("operation_id",)
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    operation_id: int
    def __init__(self, operation_id: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CompletionNotice(_message.Message):
    __slots__ = ("operation_id", "ok", "failed_block_hashes", "error", "client_tag", "bytes_moved", "duration_us", "done_event")
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    FAILED_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TAG_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    DURATION_US_FIELD_NUMBER: _ClassVar[int]
    DONE_EVENT_FIELD_NUMBER: _ClassVar[int]
    operation_id: int
    ok: bool
    failed_block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    error: str
    client_tag: int
    bytes_moved: int
    duration_us: int
    done_event: bytes
    def __init__(self, operation_id: _Optional[int] = ..., ok: _Optional[bool] = ..., failed_block_hashes: _Optional[_Iterable[bytes]] = ..., error: _Optional[str] = ..., client_tag: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., duration_us: _Optional[int] = ..., done_event: _Optional[bytes] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "name", "capacity_bytes", "used_bytes", "blocks", "hits", "misses", "evictions", "corrupt", "healthy")
    TIER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    name: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    evictions: int
    corrupt: int
    healthy: bool
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., name: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., blocks: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., corrupt: _Optional[int] = ..., healthy: _Optional[bool] = ...) -> None: ...

class SessionStats(_message.Message):
    __slots__ = ("session_id", "worker_name", "namespace", "pid", "transport", "saves", "loads", "in_flight")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SAVES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    worker_name: str
    namespace: Namespace
    pid: int
    transport: str
    saves: int
    loads: int
    in_flight: int
    def __init__(self, session_id: _Optional[str] = ..., worker_name: _Optional[str] = ..., namespace: _Optional[_Union[Namespace, _Mapping]] = ..., pid: _Optional[int] = ..., transport: _Optional[str] = ..., saves: _Optional[int] = ..., loads: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("boot_id", "version", "uptime_s", "sessions", "tiers", "lookups", "lookup_blocks", "lookup_hit_blocks", "saves_ok", "saves_failed", "loads_ok", "loads_failed", "bytes_saved", "bytes_loaded", "load_hit_blocks", "load_miss_blocks")
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SAVES_OK_FIELD_NUMBER: _ClassVar[int]
    SAVES_FAILED_FIELD_NUMBER: _ClassVar[int]
    LOADS_OK_FIELD_NUMBER: _ClassVar[int]
    LOADS_FAILED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SAVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOADED_FIELD_NUMBER: _ClassVar[int]
    LOAD_HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MISS_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    boot_id: str
    version: str
    uptime_s: int
    sessions: _containers.RepeatedCompositeFieldContainer[SessionStats]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    lookups: int
    lookup_blocks: int
    lookup_hit_blocks: int
    saves_ok: int
    saves_failed: int
    loads_ok: int
    loads_failed: int
    bytes_saved: int
    bytes_loaded: int
    load_hit_blocks: int
    load_miss_blocks: int
    def __init__(self, boot_id: _Optional[str] = ..., version: _Optional[str] = ..., uptime_s: _Optional[int] = ..., sessions: _Optional[_Iterable[_Union[SessionStats, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., lookups: _Optional[int] = ..., lookup_blocks: _Optional[int] = ..., lookup_hit_blocks: _Optional[int] = ..., saves_ok: _Optional[int] = ..., saves_failed: _Optional[int] = ..., loads_ok: _Optional[int] = ..., loads_failed: _Optional[int] = ..., bytes_saved: _Optional[int] = ..., bytes_loaded: _Optional[int] = ..., load_hit_blocks: _Optional[int] = ..., load_miss_blocks: _Optional[int] = ...) -> None: ...
