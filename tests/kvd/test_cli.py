"""The `kvd` command line: config resolution, serve's hand-off to run_daemon, health and stats over a Unix socket.

health and stats run against a small real gRPC server (the standard health servicer plus a fake Kvd servicer that
only answers Stats), so these tests need no daemon.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import sys
import tempfile
import types
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

from kvd import cli
from kvd.config import KvdConfig, LogConfig
from kvd.logs import setup_logging
from tests.helpers.cli import clean_env, run_kvd


@pytest.fixture(autouse=True)
def _no_kvd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("KVD_"):
            monkeypatch.delenv(key)


# ---- kvd config ---------------------------------------------------------------------------------------------------


def test_config_shows_the_socket_flag(tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    done = run_kvd("config", "--socket", str(sock))
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["socket"] == str(sock)
    assert shown["socket_mode"] == "0600"
    assert shown["host_pool"]["capacity_bytes"] == KvdConfig.model_fields["host_pool"].default.capacity_bytes


def test_config_respects_env_and_flags_beat_env() -> None:
    done = run_kvd("config", env=clean_env(KVD_LEASE_MS="1234", KVD_SOCKET_MODE="0660"))
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["lease_ms"] == 1234
    assert shown["socket_mode"] == "0660"

    done = run_kvd("config", "--lease-ms", "5000", env=clean_env(KVD_LEASE_MS="1234"))
    assert json.loads(done.stdout)["lease_ms"] == 5000


def test_nested_flag_overrides_merge_with_env_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = tmp_path / "kvd.toml"
    config_file.write_text(
        'lease_ms = 2000\n[host_pool]\ncapacity_bytes = 2147483648\nslab_bytes = 1048576\n[log]\nlevel = "DEBUG"\n'
    )
    monkeypatch.setenv("KVD_HOST_POOL__POPULATE_THREADS", "3")
    assert cli.main(["config", "--config", str(config_file), "--capacity", "8GiB", "--log-json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lease_ms"] == 2000  # file
    assert shown["host_pool"] == {
        "capacity_bytes": 8 << 30,  # flag
        "slab_bytes": 1 << 20,  # file
        "pin": True,  # default
        "populate_threads": 3,  # env
        "numa_node": -1,  # default
        "reuse_grace_ms": 200,  # default
    }
    assert shown["log"] == {"level": "DEBUG", "json_format": True}


def test_config_errors_exit_with_the_usage_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "--config", str(tmp_path / "missing.toml")]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["config", "--capacity", "12"]) == cli.EXIT_USAGE  # below the 1 MiB minimum
    assert "capacity_bytes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["config", "--capacity", "lots"])
    assert exited.value.code == cli.EXIT_USAGE
    with pytest.raises(SystemExit):
        cli.main(["config", "--tcp", "127.0.0.1:7070"])  # gone: no TCP listener (docs/security.md)
    with pytest.raises(SystemExit) as exited:
        cli.main(["config", "--log-level", "chatty"])
    assert exited.value.code == cli.EXIT_USAGE


# ---- kvd serve ----------------------------------------------------------------------------------------------------


def test_serve_passes_the_effective_config_to_run_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[KvdConfig] = []

    def run_daemon(config: KvdConfig) -> int:
        seen.append(config)
        return 7

    # Stand-ins: the real daemon module needs the whole daemon, and real logging setup would rewire pytest's.
    fake_daemon = types.ModuleType("kvd.daemon")
    fake_daemon.run_daemon = run_daemon  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvd.daemon", fake_daemon)
    import kvd.logs

    logged: list[Any] = []
    monkeypatch.setattr(kvd.logs, "setup_logging", logged.append)
    monkeypatch.setenv("KVD_LEASE_MS", "3000")

    argv = ["serve", "--socket", str(tmp_path / "s.sock"), "--capacity", "64MiB"]
    argv += ["--metrics-port", "0", "--log-level", "debug"]
    assert cli.main(argv) == 7
    (config,) = seen
    assert config.socket == tmp_path / "s.sock"
    assert config.lease_ms == 3000
    assert config.host_pool.capacity_bytes == 64 << 20
    assert config.metrics.port == 0
    assert logged == [config.log]
    assert config.log.level == "DEBUG" and config.log.json_format is False


# ---- kvd health / kvd stats against a real gRPC server ----------------------------------------------------------


class FakeKvd(kvd_pb2_grpc.KvdServicer):
    def Stats(self, request: kvd_pb2.StatsRequest, context: grpc.ServicerContext) -> kvd_pb2.StatsResponse:
        return kvd_pb2.StatsResponse(
            boot_id="boot-1",
            version="0.1.0",
            uptime_s=3725,
            sessions=[
                kvd_pb2.SessionStats(
                    session_id="s-0123456789abcdef",
                    worker_name="vllm-tp0",
                    namespace=kvd_pb2.Namespace(model_id="llama@bf16", tp_rank=0, tp_world_size=2),
                    pid=4242,
                    transport="cuda_ipc",
                    saves=5,
                    loads=4,
                    ring=True,
                )
            ],
            tiers=[
                kvd_pb2.TierStats(
                    tier=kvd_pb2.TIER_HOST_MEMORY,
                    name="host",
                    capacity_bytes=4 << 30,
                    used_bytes=1 << 30,
                    blocks=100,
                    hits=30,
                    misses=10,
                    healthy=True,
                ),
                kvd_pb2.TierStats(tier=kvd_pb2.TIER_REMOTE, name="redis", healthy=False),
            ],
            lookups=3,
            lookup_blocks=40,
            lookup_hit_blocks=30,
            saves_ok=5,
            saves_failed=1,
            loads_ok=4,
            bytes_saved=3 << 20,
            bytes_loaded=2 << 20,
            load_hit_blocks=28,
            load_miss_blocks=2,
            ring_records=7,
            ring_refused=1,
        )


class Daemon:
    def __init__(self, path: Path, server: grpc.Server, servicer: health.HealthServicer) -> None:
        self.path, self.server, self.health = path, server, servicer

    def set(self, status: int, service: str = "") -> None:
        self.health.set(service, status)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    # A short private directory: Unix socket paths are limited to ~107 bytes, and pytest's tmp_path can exceed it.
    with tempfile.TemporaryDirectory(prefix="kvd-") as directory:
        path = Path(directory) / "kvd.sock"
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        kvd_pb2_grpc.add_KvdServicer_to_server(FakeKvd(), server)
        server.add_insecure_port(f"unix:{path}")
        server.start()
        try:
            yield Daemon(path, server, servicer)
        finally:
            server.stop(grace=None).wait(5)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_exit_codes(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(daemon.path)
    daemon.set(NOT_SERVING)
    daemon.set(NOT_SERVING, "kvd.v1.Kvd")
    assert cli.main(["health", "--socket", sock]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    assert cli.main(["health", "--socket", sock, "--live"]) == 0  # answering while starting or draining is alive
    assert capsys.readouterr().out.strip() == "NOT_SERVING"

    daemon.set(SERVING)
    daemon.set(SERVING, "kvd.v1.Kvd")
    assert cli.main(["health", "--socket", sock]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli.main(["health", "--socket", sock, "--service", "kvd.v1.Kvd"]) == 0
    assert cli.main(["health", "--socket", sock, "--service", "no.such.Service"]) == 1
    assert "SERVICE_UNKNOWN" in capsys.readouterr().err


def test_health_socket_from_env(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon.set(SERVING)
    monkeypatch.setenv("KVD_SOCKET", str(daemon.path))
    assert cli.main(["health"]) == 0


def test_health_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["health", "--socket", str(tmp_path / "missing.sock")]) == 2
    assert "no socket" in capsys.readouterr().err

    # A socket file with nobody listening (a daemon that died without cleaning up): refused, so unreachable.
    with tempfile.TemporaryDirectory(prefix="kvd-") as directory:
        stale = Path(directory) / "stale.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(stale))
        assert cli.main(["health", "--socket", str(stale), "--timeout", "1"]) == 2


def test_health_exit_status_of_the_real_command(daemon: Daemon) -> None:
    daemon.set(SERVING)
    done = run_kvd("health", "--socket", str(daemon.path))
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr
    daemon.set(NOT_SERVING)
    assert run_kvd("health", "--socket", str(daemon.path)).returncode == 1
    assert run_kvd("health", "--socket", str(daemon.path) + ".gone").returncode == 2


def test_stats_table(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stats", "--socket", str(daemon.path)]) == 0
    out = capsys.readouterr().out
    assert "boot boot-1" in out and "up 01:02:05" in out
    assert "sessions: 1" in out and "vllm-tp0" in out and "cuda_ipc+ring" in out and "0/2" in out
    host_row = next(line for line in out.splitlines() if line.strip().startswith("host_memory"))
    assert host_row.split()[1:9] == ["host", "yes", "4GiB", "1GiB", "100", "30", "10", "75.0%"]
    remote_row = next(line for line in out.splitlines() if line.strip().startswith("remote"))
    assert "NO" in remote_row.split()
    assert "lookup hit rate: 75.0%" in out
    assert "load hit rate:   93.3%  (28/30 blocks asked for by Load; a miss is one no tier had then)" in out
    assert "saves: 5 ok, 1 failed, 3MiB saved" in out
    assert "submission rings: 7 requests, 1 refused" in out


def test_stats_json(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stats", "--socket", str(daemon.path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["lookup_hit_blocks"] == 30  # a number, not proto3 JSON's quoted uint64
    assert doc["loads_failed"] == 0  # zero fields are printed too
    assert doc["tiers"][0]["tier"] == "TIER_HOST_MEMORY"
    assert doc["sessions"][0]["namespace"]["model_id"] == "llama@bf16"


def test_stats_unreachable(tmp_path: Path) -> None:
    assert cli.main(["stats", "--socket", str(tmp_path / "missing.sock")]) == cli.EXIT_UNREACHABLE


# ---- logging ------------------------------------------------------------------------------------------------------


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_json_logs_are_one_object_per_line() -> None:
    out = io.StringIO()
    setup_logging(LogConfig(level="debug", json_format=True), stream=out)
    setup_logging(LogConfig(level="debug", json_format=True), stream=out)  # reconfigures, does not stack handlers
    log = logging.getLogger("kvd.test")
    log.debug("pool %s", "ready", extra={"session": "s-1", "path": Path("/x")})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "pool ready" and first["level"] == "DEBUG" and first["logger"] == "kvd.test"
    assert first["session"] == "s-1" and first["path"] == "/x"
    assert "ValueError: boom" in second["exc"]


@pytest.mark.usefixtures("restore_root_logger")
def test_plain_logs_and_levels() -> None:
    out = io.StringIO()
    setup_logging(LogConfig(level="WARNING"), stream=out)
    logging.getLogger("kvd.test").info("hidden")
    logging.getLogger("kvd.test").warning("shown")
    assert out.getvalue().rstrip().endswith("WARNING kvd.test: shown")
    assert "hidden" not in out.getvalue()
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging(LogConfig(level="chatty"))
