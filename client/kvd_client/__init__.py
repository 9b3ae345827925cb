"""kvd_client: the thin in-worker client for kvd (grpcio + protobuf; torch only for GPU caches)."""

from kvd_client.client import KvdClient
from kvd_client.errors import KvdError, Unavailable
from kvd_client.layout import DType, KvLayout, LayerLayout, Namespace
from kvd_client.types import Completion, DaemonStages, LookupResult, OperationStages, OpKind, Tier

__all__ = [
    "Completion",
    "DType",
    "DaemonStages",
    "KvLayout",
    "KvdClient",
    "KvdError",
    "LayerLayout",
    "LookupResult",
    "Namespace",
    "OpKind",
    "OperationStages",
    "Tier",
    "Unavailable",
]
