"""The whole daemon inside the test's own event loop: a real grpc.aio server on a temporary Unix socket, with the
real pool, transports, store and service (kvd.daemon.KvdDaemon), and an async stub to talk to it.

For RPC-level tests where no process boundary is the point; they run in milliseconds instead of a daemon start.
Tests about signals, crashes, restarts, systemd or the CLI keep the subprocess daemon (tests/helpers/daemon.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from kvd_client.wire.kvd.v1 import kvd_pb2_grpc

from kvd.config import HostPoolConfig, KvdConfig
from kvd.daemon import KvdDaemon

MiB = 1 << 20


@contextlib.asynccontextmanager
async def serving(**overrides: Any) -> AsyncIterator[KvdDaemon]:
    """A started daemon (health SERVING) on a fresh socket; shut down (drained, socket removed) afterwards.

    `overrides` are KvdConfig fields; the environment's KVD_* variables are ignored, as for subprocess daemons."""
    workdir = Path(tempfile.mkdtemp(prefix="kvd-"))  # short: a Unix socket path must fit in 108 bytes
    settings: dict[str, Any] = {
        "socket": workdir / "kvd.sock",
        "host_pool": HostPoolConfig(capacity_bytes=16 * MiB, slab_bytes=1 * MiB, populate_threads=1),
        "lease_ms": 5_000,
        "drain_timeout_s": 2.0,
        **overrides,
    }
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("KVD_")}
    try:
        daemon = KvdDaemon(KvdConfig(**settings))
    finally:
        os.environ.update(saved)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def stub_for(daemon: KvdDaemon) -> AsyncIterator[kvd_pb2_grpc.KvdStub]:
    async with grpc.aio.insecure_channel(f"unix:{daemon.config.socket}") as channel:
        yield kvd_pb2_grpc.KvdStub(channel)
