"""kvd's one typed configuration object.

Built once at start from (highest first) command-line flags, `KVD_*` environment variables (nested with `__`, e.g.
`KVD_HOST_POOL__CAPACITY_BYTES`), an optional TOML file (`--config` / `KVD_CONFIG`), then the defaults below, and
passed down from there. Nothing below the rpc layer reads the environment.
"""

from __future__ import annotations

import enum
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

# The TOML file for the KvdConfig being built right now (a source needs it before the model exists).
_config_file: ContextVar[Path | None] = ContextVar("kvd_config_file", default=None)

GiB = 1 << 30
MiB = 1 << 20

# A Unix socket's path must fit sun_path (108 bytes with its NUL); the credential socket adds ".cred" to ours.
SUN_PATH_MAX = 107
CREDENTIAL_SUFFIX = ".cred"


def human_bytes(n: int) -> str:
    """4GiB, 1.5GiB, 100MiB, 512B: what `--capacity` accepts back, and no space, so tables split on whitespace."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"


def default_socket_path() -> Path:
    """/run/kvd/kvd.sock when we may write there (systemd's RuntimeDirectory), else $XDG_RUNTIME_DIR/kvd/kvd.sock."""
    run = Path("/run/kvd")
    if (run.is_dir() and os.access(run, os.W_OK)) or (not run.exists() and os.access("/run", os.W_OK)):
        return run / "kvd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/kvd-{os.getuid()}"
    return Path(runtime) / "kvd" / "kvd.sock"


# The `engine` section was split by layer; an old setting must not be ignored without a word.
RENAMED_ENGINE = (
    "the [engine] section is now [transports] (KVD_TRANSPORTS__*); engine.max_inflight_ops is now the top-level"
    " max_inflight_ops and engine.gil_switch_interval_us is runtime.gil_switch_interval_us"
)

REMOVED_TCP = (
    "tcp is gone: a peer over TCP has no kernel-verified identity, so the daemon could trust nothing it says"
    " (docs/security.md); workers connect to the Unix socket (socket_mode and allowed_uids for other users)"
)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HostPoolConfig(_Section):
    """L1: pinned host memory, allocated once at start."""

    capacity_bytes: int = Field(default=4 * GiB, ge=1 * MiB)
    slab_bytes: int = Field(default=64 * MiB, ge=64 * 1024)  # a block may not exceed one slab
    pin: bool = True  # page-lock with cudaHostRegister when CUDA is present (DMA at full PCIe rate)
    populate_threads: int = Field(default=8, ge=1)  # parallel first touch of the pool
    # An evicted block leaves the published index at once but keeps its bytes this long before its slot is reused,
    # so a load that follows a lookup still finds it (0: reuse at once).
    reuse_grace_ms: int = Field(default=200, ge=0)
    # First-touch the pool from the CPUs of this NUMA node, so its pages sit there (put it on the GPU's node: DMA then
    # crosses no socket link). -1: wherever the populating threads run.
    numa_node: int = Field(default=-1, ge=-1)

    @model_validator(mode="after")
    def _at_least_one_slab(self) -> HostPoolConfig:
        if self.capacity_bytes < self.slab_bytes:
            raise ValueError(
                f"capacity_bytes {human_bytes(self.capacity_bytes)} is smaller than one slab "
                f"(slab_bytes {human_bytes(self.slab_bytes)}): give at least {human_bytes(self.slab_bytes)}"
            )
        return self

    @property
    def usable_bytes(self) -> int:
        """The pool is whole slabs: capacity_bytes rounded down to a multiple of slab_bytes."""
        return self.capacity_bytes - self.capacity_bytes % self.slab_bytes


class IndexConfig(_Section):
    """The published block index: clients look blocks up in shared memory instead of asking over RPC."""

    enabled: bool = True
    max_bytes: int = Field(default=256 * MiB, ge=64 * 1024)  # per namespace group (9 bytes per slot, 4 per block)


class DiskTierConfig(_Section):
    """L2: a local directory. Off unless `path` is set."""

    path: Path | None = None
    capacity_bytes: int = Field(default=64 * GiB, ge=1 * MiB)
    io_threads: int = Field(default=4, ge=1)
    fsync: bool = False  # durability across power loss; writes are atomic (rename) either way
    # Free space the tier leaves on its filesystem: it evicts to stay within min(capacity_bytes, what it stores +
    # free space - reserve_bytes), so a filesystem smaller than capacity_bytes (or shared) is not written full.
    reserve_bytes: int = Field(default=64 * MiB, ge=0)
    # While the filesystem refuses writes (ENOSPC with nothing left to evict, read-only, I/O errors), the tier is
    # degraded: writes are dropped at once and one is tried again after this long (doubling up to 16x).
    retry_ms: int = Field(default=1000, ge=1)


class RedisTierConfig(_Section):
    """L3: a global kvstore (Redis or Valkey). Off unless `url` is set."""

    url: str | None = None  # e.g. redis://127.0.0.1:6379/0; with `cluster`, any one node of the cluster
    # Redis Cluster / Valkey cluster: `url` (and `cluster_nodes`) are seeds the client learns the topology from.
    cluster: bool = False
    cluster_nodes: tuple[str, ...] = ()  # more seeds, "host:port", tried when `url`'s node is down at start
    key_prefix: str = "kvd:"
    capacity_bytes: int = Field(default=0, ge=0)  # 0: the store's own maxmemory policy decides
    timeout_ms: int = Field(default=500, ge=1)
    reconnect_backoff_ms: int = Field(default=1000, ge=1)
    # How often the blocks this daemon wrote are checked against the store (EXISTS, in batches), so the tier's
    # used bytes and blocks drop what the store evicted or another node deleted.
    accounting_interval_s: float = Field(default=60.0, gt=0)


class TierWritePolicy(enum.StrEnum):
    WRITE_THROUGH = "write_through"  # every save goes to every lower tier at once
    WRITE_ON_EVICT = "write_on_evict"  # a block goes down only when L1 evicts it


class DiskAdmission(enum.StrEnum):
    ALWAYS = "always"  # every block leaving L1 goes to disk
    # A block that was reused (hit while in L1, or leaving L1 for the second time: kvd.tiers.reuse), and any block
    # no other healthy tier takes (no kvstore, or it is down): nothing saved is lost to the policy.
    REUSED = "reused"
    # Reused blocks only: a block leaving L1 before its first hit, with no other tier to take it, is dropped
    # (counted). The least disk churn on a node with no kvstore, at the price of recomputing such blocks.
    REUSED_ONLY = "reused_only"


class TiersConfig(_Section):
    write_policy: TierWritePolicy = TierWritePolicy.WRITE_ON_EVICT
    # Which blocks leaving L1 (write_on_evict) the disk tier takes; the global kvstore takes every one. "reused"
    # keeps a working set bigger than the disk from being rewritten at the rate blocks leave L1.
    disk_admission: DiskAdmission = DiskAdmission.REUSED
    # A save that must evict blocks whose only copy is in L1 while the write-down queue is full waits this long at
    # most for the queue to drain (when a lower tier is healthy), rather than the evicted blocks being dropped.
    write_down_wait_ms: int = Field(default=2000, ge=0)
    promote_on_hit: bool = True  # a lookup hit below L1 starts copying the block up (prefetch for the load)
    # Cost-aware admission: report a lower-tier hit only if loading it beats recomputing it.
    recompute_us_per_token: float = Field(default=20.0, ge=0.0)
    tokens_per_block: int = Field(default=16, ge=1)


class CompletionWait(enum.StrEnum):
    POLL = "poll"
    SPIN = "spin"
    BLOCK = "block"


class TransportsConfig(_Section):
    """How kvd/transports move bytes (the CPU transport's threads, each GPU's pipeline)."""

    cpu_copy_threads: int = Field(default=4, ge=1)  # CPU transport: process_vm_* calls in flight at once
    cuda_chunk_bytes: int = Field(default=64 * MiB, ge=1 * MiB)  # pipelining unit between gather and PCIe copy
    cuda_staging_bytes: int = Field(default=512 * MiB, ge=4 * MiB)  # device staging per GPU, half per direction
    # How a GPU's completion waiters learn that copies finished (bench/event_wait.py measures each): POLL queries
    # the event with 20 µs naps (little CPU, ~40 µs late), SPIN spins a core per waiter while copies are in flight
    # (~5 µs late), BLOCK sleeps in the driver on an interrupt (no CPU, ~100 µs late).
    cuda_completion_wait: CompletionWait = CompletionWait.POLL
    # At most this many CTAs per gather/scatter launch while DMA of the same direction runs beside it (earlier chunks
    # in flight); the kernels stride over the rest. An uncapped kernel saturates device memory while the copy engine
    # reads it: on an H100 the cap of 64 gave 1 GiB requests 52-53 GB/s instead of 49-51, within the model's 2 %. A
    # chunk alone (a small request) is never capped: its kernel is on the request's path. 0: never capped.
    cuda_kernel_ctas: int = Field(default=64, ge=0)
    # Where a save's or load's GPU work is queued: on the event loop, right where it was planned (the default: no
    # thread hop and no wait for the GIL in between, and the loop is free again while the copy runs), or (False) on
    # the GPU's engine thread. On an H100, on the loop: a 16-block save 1.03-1.14 ms instead of 1.16-1.39, a load
    # 0.94-1.01 instead of 1.04-1.19, both directions at once 91.4 GB/s instead of 87.1 (medians of 8 and 9 runs).
    cuda_queue_on_loop: bool = True
    # Diagnostics: append one JSON line per CUDA operation to this file, with GPU timestamps around every chunk's
    # kernel and DMA (kvd/transports/cuda/trace.py; bench/gpu_transfer.py reads it). Off (None) in production: four
    # more event records per chunk.
    cuda_trace_path: Path | None = None


class RuntimeConfig(_Section):
    """The daemon process's interpreter (set once by kvd.daemon before anything starts)."""

    # The GIL switch interval. Python's default (5 ms) lets the gRPC thread, busy with a large batch, keep a GPU
    # engine thread from submitting or completing copies for that long; the daemon is ours to tune.
    gil_switch_interval_us: int = Field(default=500, ge=50, le=5000)
    # Python 3.12 on: run each save's and load's first step (planning, handing it to its transport) as an eager task,
    # inside the RPC handler or ring callback, instead of on the event loop's next iteration. No effect on 3.11.
    eager_operations: bool = True


class MetricsConfig(_Section):
    port: int | None = Field(default=None, ge=0, le=65535)  # Prometheus endpoint; off by default; 0: any free port
    host: str = "127.0.0.1"


class LogConfig(_Section):
    level: str = "INFO"
    json_format: bool = False


class KvdConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KVD_", env_nested_delimiter="__", frozen=True, extra="forbid", toml_file=None
    )

    # The listener (kvd/rpc) and who may register.
    socket: Path = Field(default_factory=default_socket_path)
    socket_mode: int = Field(default=0o600, ge=0, le=0o777)  # 0660 plus a shared group lets other users' workers in
    allowed_uids: tuple[int, ...] = ()  # peers besides the daemon's own uid and root that may register
    # Who shares blocks (docs/security.md): each uid is its own tenant unless listed here, name -> uids.
    tenants: dict[str, tuple[int, ...]] = Field(default_factory=dict)
    max_tokens_per_uid: int = Field(default=64, ge=1)  # credential tokens issued and not yet redeemed
    max_tokens: int = Field(default=1024, ge=1)  # ... of every uid together
    # The service (kvd/service): sessions and the limits it admits work under.
    lease_ms: int = Field(default=10_000, ge=100)
    max_batch_blocks: int = Field(default=16_384, ge=1)
    max_lookup_blocks: int = Field(default=65_536, ge=1)
    max_inflight_ops: int = Field(default=64, ge=1)  # per session: more is RESOURCE_EXHAUSTED
    drain_timeout_s: float = Field(default=30.0, ge=0)
    max_sessions_per_uid: int = Field(default=128, ge=1)
    max_worker_events: int = Field(default=256, ge=1)  # CUDA IPC events one session may have the daemon open
    # A save or load of more than this many bytes goes in segments of about this size, pipelined (planning the next
    # segment and committing the last one while others copy: kvd/service/operations.py). 0: never split.
    segment_bytes: int = Field(default=64 * MiB, ge=0)
    # Submission rings (kvd.rpc.ring): a memory session's saves and loads through shared memory and a pipe doorbell
    # instead of a unary RPC. Slots per session (0: no rings; a full ring sends requests by RPC) and bytes per slot
    # (one request each: a slot of 64 KiB holds 1,817 blocks with 32-byte hashes, 29,072 tokens of 16-token blocks;
    # larger requests go by RPC, whose receipt waits behind the loop's other work: on an H100, 1 GiB requests by RPC
    # reached the daemon 1-9 ms after they were sent while others were being planned).
    ring_slots: int = Field(default=64, ge=0, le=4096)
    ring_slot_bytes: int = Field(default=65536, ge=512, le=1 << 20, multiple_of=64)
    # Completion queues (kvd.memory.completions): a memory session's successful saves and loads reported through
    # shared memory and a pipe instead of its Watch stream. Slots per session, 256 bytes each (0: no queues); more
    # than the operations a worker keeps in flight, so a worker always finds a free one.
    completion_slots: int = Field(default=1024, ge=0, le=65536)
    # One section per layer below.
    host_pool: HostPoolConfig = HostPoolConfig()  # kvd/memory
    index: IndexConfig = IndexConfig()
    transports: TransportsConfig = TransportsConfig()  # kvd/transports
    disk: DiskTierConfig = DiskTierConfig()  # kvd/tiers
    redis: RedisTierConfig = RedisTierConfig()
    tiers: TiersConfig = TiersConfig()
    runtime: RuntimeConfig = RuntimeConfig()  # kvd/daemon.py
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """A file or flags written for the old `[engine]` section get a clear error, not a silent default."""
        if isinstance(data, dict) and "engine" in data:
            raise ValueError(RENAMED_ENGINE)
        if isinstance(data, dict) and "tcp" in data:
            raise ValueError(REMOVED_TCP)
        return data

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        return int(value, 8) if isinstance(value, str) else value

    @field_validator("socket")
    @classmethod
    def _fits_sun_path(cls, value: Path) -> Path:
        longest = len(os.fsencode(value)) + len(CREDENTIAL_SUFFIX)
        if longest > SUN_PATH_MAX:
            limit = SUN_PATH_MAX - len(CREDENTIAL_SUFFIX)
            raise ValueError(
                f"a path of {longest - len(CREDENTIAL_SUFFIX)} bytes is too long for a Unix socket (at most {limit}, "
                f"leaving room for the {CREDENTIAL_SUFFIX} socket beside it): choose a shorter path"
            )
        return value

    @field_validator("tenants")
    @classmethod
    def _one_tenant_per_uid(cls, value: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        seen: dict[int, str] = {}
        for name, uids in value.items():
            if not name or name.startswith("uid:"):
                raise ValueError(f"tenant name {name!r}: empty, or of the form uid:N (the default names)")
            for uid in uids:
                if uid in seen:
                    raise ValueError(f"uid {uid} is in two tenants: {seen[uid]!r} and {name!r}")
                seen[uid] = name
        return value

    def tenant_of(self, uid: int) -> str:
        """The tenant whose blocks a peer of `uid` sees: the one listing it, else its own (`uid:N`)."""
        for name, uids in self.tenants.items():
            if uid in uids:
                return name
        return f"uid:{uid}"

    def may_register(self, uid: int) -> bool:
        return uid in (0, os.getuid(), *self.allowed_uids)

    @property
    def credential_socket(self) -> Path:
        """Where workers prove who they are (SO_PEERCRED) before registering; next to the gRPC socket."""
        return self.socket.with_name(self.socket.name + CREDENTIAL_SUFFIX)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> KvdConfig:
        """flags (overrides) > env > TOML file > defaults. `config_file` falls back to $KVD_CONFIG."""
        if stale := sorted(name for name in os.environ if name.startswith("KVD_ENGINE__")):
            raise ValueError(f"{', '.join(stale)}: {RENAMED_ENGINE}")
        if "KVD_TCP" in os.environ:
            raise ValueError(f"KVD_TCP: {REMOVED_TCP}")
        path = config_file or (Path(os.environ["KVD_CONFIG"]) if os.environ.get("KVD_CONFIG") else None)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        token = _config_file.set(path)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _config_file.reset(token)


def describe_config_error(exc: Exception) -> str:
    """One line: pydantic's report of every bad setting (where, what, the value given) without its URLs."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "configuration"
        what = "unknown setting" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        given = error["input"]
        parts.append(f"{where}: {what}" + ("" if isinstance(given, dict) else f" (given {str(given)!r})"))
    return "; ".join(parts)
