"""`kvd serve` that cannot start: one log line that says what is wrong and what to do, exit 3 (documented), no
traceback, no "shutting down" for a daemon that never served, and nothing at the socket paths removed but a stale
socket. Every test runs the real `kvd` executable."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvd.cli.exit_codes import EXIT_FAILURE, EXIT_USAGE
from tests.conftest import DaemonFactory
from tests.helpers.cli import clean_env, kvd_command, one_line_error, run_kvd
from tests.helpers.daemon import SERVING, MiB

SMALL_POOL = {"KVD_HOST_POOL__CAPACITY_BYTES": str(64 * MiB), "KVD_HOST_POOL__SLAB_BYTES": str(MiB)}


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kvd-") as directory:  # short: socket paths are limited
        yield Path(directory)


def serve(socket_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_kvd("serve", "--socket", str(socket_path), env=clean_env(**SMALL_POOL, **env), timeout=60)


def never_served(done: subprocess.CompletedProcess[str]) -> None:
    assert "shutting down" not in done.stderr and "stopped" not in done.stderr, done.stderr


def test_a_file_at_the_socket_path_survives(workdir: Path) -> None:
    config = workdir / "kvd.toml"
    config.write_text("lease_ms = 5000\n")  # `--socket /etc/kvd/kvd.toml`, a typo
    done = serve(config)
    one_line_error(done, EXIT_FAILURE, f"{config} is a regular file", "stale socket", "--socket")
    never_served(done)
    assert config.read_text() == "lease_ms = 5000\n"


def test_a_file_at_the_credential_socket_path_survives(workdir: Path) -> None:
    cred = workdir / "kvd.sock.cred"
    cred.write_text("precious")
    done = serve(workdir / "kvd.sock")
    one_line_error(done, EXIT_FAILURE, f"{cred} is a regular file")
    never_served(done)
    assert cred.read_text() == "precious"
    assert not (workdir / "kvd.sock").exists()  # checked before anything bound


def test_a_directory_or_symlink_at_the_socket_path_survives(workdir: Path) -> None:
    (workdir / "d").mkdir()
    (workdir / "d" / "inside").write_text("x")
    one_line_error(serve(workdir / "d"), EXIT_FAILURE, f"{workdir / 'd'} is a directory")
    assert (workdir / "d" / "inside").read_text() == "x"

    (workdir / "target").write_text("keep")
    (workdir / "link").symlink_to(workdir / "target")
    one_line_error(serve(workdir / "link"), EXIT_FAILURE, f"{workdir / 'link'} is a symlink")
    assert (workdir / "link").is_symlink() and (workdir / "target").read_text() == "keep"


def test_a_socket_directory_that_cannot_be_made(workdir: Path) -> None:
    (workdir / "file").write_text("x")
    done = serve(workdir / "file" / "sub" / "kvd.sock")
    one_line_error(done, EXIT_FAILURE, "cannot create the socket directory", "--socket")
    never_served(done)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another user")
def test_a_socket_directory_another_user_owns(workdir: Path) -> None:
    theirs = workdir / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 65534, 65534)
    one_line_error(serve(theirs / "kvd.sock"), EXIT_FAILURE, "belongs to uid 65534")


def test_a_second_daemon_on_a_live_socket(daemon_factory: DaemonFactory) -> None:
    first = daemon_factory()
    done = serve(first.socket)
    one_line_error(done, EXIT_FAILURE, f"another daemon is serving on {first.socket}")
    never_served(done)
    assert first.health() == SERVING
    assert first.socket.exists() and first.credential_socket.exists()


def test_a_stale_socket_is_replaced(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    daemon.kill()  # SIGKILL leaves both sockets behind, nobody answering
    assert daemon.socket.exists()
    daemon.start()
    assert daemon.health() == SERVING


def test_a_metrics_port_in_use(workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(workdir / "kvd.sock", KVD_METRICS__PORT=str(port))
    one_line_error(done, EXIT_FAILURE, f"127.0.0.1:{port}", "in use", "--metrics-port")
    never_served(done)
    assert not (workdir / "kvd.sock").exists() and not (workdir / "kvd.sock.cred").exists()


def test_a_pool_larger_than_memory(workdir: Path) -> None:
    # An address-space limit makes the pool's mapping fail the same way on any machine (and touches no memory).
    command = " ".join([*kvd_command(), "serve", "--socket", str(workdir / "kvd.sock"), "--capacity", "16GiB"])
    done = subprocess.run(
        ["bash", "-c", f"ulimit -v {4 << 20}; exec {command}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    one_line_error(done, EXIT_FAILURE, "16GiB", "--capacity")
    never_served(done)
    assert not (workdir / "kvd.sock").exists()


def test_startup_says_which_tiers_and_metrics(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = daemon_factory(env={"KVD_DISK__PATH": str(tmp_path / "disk"), "KVD_METRICS__PORT": "0"})
    log = daemon.log_text()
    assert f"listening on {daemon.socket}" in log
    ready = next(line for line in log.splitlines() if "kvd ready" in line)
    assert "host memory 64MiB" in ready and f"disk {tmp_path / 'disk'}" in ready and "redis off" in ready, ready
    assert "metrics on http://127.0.0.1:" in log

    plain = daemon_factory()
    ready = next(line for line in plain.log_text().splitlines() if "kvd ready" in line)
    assert "disk off" in ready and "redis off" in ready and "metrics off" in ready, ready


def test_a_pool_larger_than_the_machine_is_refused_before_mapping(workdir: Path) -> None:
    done = run_kvd("serve", "--socket", str(workdir / "kvd.sock"), "--capacity", "1PiB", env=clean_env())
    one_line_error(done, EXIT_FAILURE, "a host pool of 1024TiB does not fit", "lower --capacity")
    never_served(done)


def test_the_tcp_listener_is_gone_and_asking_for_it_says_so(workdir: Path) -> None:
    """A peer over TCP has no kernel-verified identity (docs/security.md): the option is refused, never ignored."""
    env = clean_env(KVD_TCP="127.0.0.1:7070", **SMALL_POOL)
    done = run_kvd("serve", "--socket", str(workdir / "kvd.sock"), env=env)
    one_line_error(done, EXIT_USAGE, "KVD_TCP: tcp is gone", "Unix socket")
    never_served(done)


def test_a_pool_rounded_to_whole_slabs_says_so_in_human_units(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(capacity_bytes=100 * MiB, slab_bytes=64 * MiB)
    log = daemon.log_text()
    assert "host pool: 100MiB is not a whole number of 64MiB slabs; using 64MiB" in log
    assert "host memory 64MiB" in log and "GiB" not in log
    assert daemon.host_tier().capacity_bytes == 64 * MiB


def test_a_socket_path_the_kernel_refuses() -> None:
    # /proc takes no sockets, whoever asks (root too): the kernel's reason, once, without gRPC's line.
    done = run_kvd("serve", "--socket", "/proc/kvd.sock", env=clean_env(**SMALL_POOL))
    one_line_error(done, EXIT_FAILURE, "/proc", "--socket")
    never_served(done)
