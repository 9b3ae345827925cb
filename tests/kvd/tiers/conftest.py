"""Fixtures for the tier tests: a real redis-server on loopback (skipped only when it is not installed), a real
host pool, and real backends in temporary directories."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from kvd.config import DiskTierConfig, HostPoolConfig, RedisTierConfig
from kvd.memory.host_pool import HostPool

REDIS_SERVER = shutil.which("redis-server")
KiB = 1 << 10
MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process in `workdir`, on a fixed loopback port across restarts (no persistence)."""

    def __init__(self, workdir: Path) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(REDIS_SERVER),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--protected-mode", "no",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()}")
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError("redis-server did not answer PING")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def pool() -> AsyncIterator[HostPool]:
    """4 MiB of 64 KiB slabs: small enough that a test fills it. Plain LRU (a slot is reused the moment its block
    is evicted): these tests count evictions and write-downs exactly; the grace period has its own tests."""
    config = HostPoolConfig(capacity_bytes=4 * MiB, slab_bytes=64 * KiB, pin=False, populate_threads=1)
    host = HostPool(config.model_copy(update={"reuse_grace_ms": 0}))
    yield host
    with contextlib.suppress(BufferError):
        host.close()


def disk_config(path: Path, capacity_bytes: int = 64 * MiB) -> DiskTierConfig:
    return DiskTierConfig(path=path, capacity_bytes=capacity_bytes, io_threads=2)


def redis_config(server: RedisServer, **kwargs: object) -> RedisTierConfig:
    fields: dict[str, object] = {"url": server.url, "timeout_ms": 300, "reconnect_backoff_ms": 50, **kwargs}
    return RedisTierConfig(**fields)  # type: ignore[arg-type]
