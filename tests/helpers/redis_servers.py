"""Real redis-server processes on loopback for tests and benchmarks: one node, or a Redis Cluster of N shards.

    server = RedisServer(workdir); server.start(); server.url; server.kill(); server.start()   # same port
    cluster = RedisClusterServers(workdir, shards=3); cluster.start()   # joined by `redis-cli --cluster create`
    cluster.kill_shard(0); cluster.restart_shard(0); cluster.stop_shard(1)  # SIGSTOP; cont_shard(1)

Nothing is persisted (no RDB, no AOF): a restarted node comes back empty. A cluster node keeps its `nodes.conf`
across a restart, so it rejoins with its node id and slots. The cluster runs with
`cluster-require-full-coverage no`, as an operator who wants the other shards to serve while one is down would.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from tests.helpers.daemon import reap, track

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process in `workdir`, on a fixed loopback port across restarts (no persistence)."""

    def __init__(self, workdir: Path, *, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.proc = track(subprocess.Popen(
            [
                str(REDIS_SERVER),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--protected-mode", "no",
                *self.extra_args,
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        ))  # fmt: skip
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
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot be reaped until it runs
            self.proc.kill()
        if self.proc is not None:
            reap(self.proc)  # also off the list of processes killed at exit
        self.proc = None

    def stop(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers (a hung server)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


class RedisClusterServers:
    """`shards` cluster-enabled redis-servers on loopback, joined into one cluster with no replicas."""

    def __init__(self, workdir: Path, shards: int = 3, node_timeout_ms: int = 1000) -> None:
        if REDIS_CLI is None:
            raise RuntimeError("redis-cli is not installed")
        args = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-require-full-coverage", "no",
            "--cluster-allow-reads-when-down", "yes",
        )  # fmt: skip
        # The cluster bus port is set too: by default it is the port + 10000, which may be taken or out of range.
        self.nodes = [
            RedisServer(workdir / f"shard{i}", extra_args=(*args, "--cluster-port", str(free_port())))
            for i in range(shards)
        ]

    @property
    def url(self) -> str:
        """A seed: any one node is enough for the client to learn the cluster."""
        return self.nodes[0].url

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [str(REDIS_CLI), "--cluster", "create", *self.addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says cluster_state:ok (slots assigned, every node seen)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            client = node.client()
            try:
                while client.cluster("info").get("cluster_state") != "ok":  # type: ignore[union-attr]
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"cluster node {node.address} is not ok")
                    time.sleep(0.05)
            finally:
                client.close()

    def shard_of(self, key: bytes) -> int:
        """The index of the node that serves `key` now."""
        for node in self.nodes:
            client = node.client()
            try:
                slot = int(client.cluster("keyslot", key))  # type: ignore[arg-type]
                for start, end, *owners in client.cluster("slots"):  # type: ignore[union-attr]
                    if start <= slot <= end:
                        port = int(owners[0][1])  # every node is on 127.0.0.1
                        return next(j for j, n in enumerate(self.nodes) if n.port == port)
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise RuntimeError("no cluster node answered")

    def kill_shard(self, i: int) -> None:
        self.nodes[i].kill()

    def restart_shard(self, i: int, timeout: float = 30.0) -> None:
        self.nodes[i].start()
        self.wait_ok(timeout)

    def revive(self, timeout: float = 30.0) -> None:
        """Every shard running (restarted if killed, continued if stopped), the cluster ok, and no keys."""
        for node in self.nodes:
            node.cont()
            if node.proc is None or node.proc.poll() is not None:
                node.start()
        self.wait_ok(timeout)
        for node in self.nodes:
            client = node.client()
            try:
                client.flushall()
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
