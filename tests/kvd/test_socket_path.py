"""The socket paths' checks on a real file system: only a socket nobody answers on is ever removed."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvd.errors import StartupError
from kvd.rpc.socket_path import clear_stale_socket, prepare_socket_dir


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths must stay short; pytest's tmp_path can be too long.
    with tempfile.TemporaryDirectory(prefix="kvd-") as directory:
        yield Path(directory)


def bound(path: Path, listen: bool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    if listen:
        sock.listen()
    return sock


def test_a_regular_file_is_never_removed(short_dir: Path) -> None:
    config = short_dir / "kvd.toml"
    config.write_text("lease_ms = 5000\n")
    with pytest.raises(StartupError, match=f"{config} is a regular file, and kvd replaces only a stale socket"):
        clear_stale_socket(config)
    assert config.read_text() == "lease_ms = 5000\n"


def test_a_directory_or_symlink_is_never_removed(short_dir: Path) -> None:
    (short_dir / "d").mkdir()
    (short_dir / "target").write_text("keep")
    (short_dir / "link").symlink_to(short_dir / "target")
    with pytest.raises(StartupError, match="is a directory"):
        clear_stale_socket(short_dir / "d")
    with pytest.raises(StartupError, match="is a symlink"):
        clear_stale_socket(short_dir / "link")
    assert (short_dir / "d").is_dir() and (short_dir / "link").is_symlink()
    assert (short_dir / "target").read_text() == "keep"


def test_a_live_socket_is_kept_and_a_stale_one_removed(short_dir: Path) -> None:
    live, stale = short_dir / "live.sock", short_dir / "stale.sock"
    with bound(live, listen=True), bound(stale, listen=False):
        with pytest.raises(StartupError, match=f"another daemon is serving on {live}"):
            clear_stale_socket(live)
        assert stat.S_ISSOCK(live.lstat().st_mode)
        clear_stale_socket(stale)  # nobody listens: connection refused
        assert not stale.exists()
    clear_stale_socket(short_dir / "absent.sock")


def test_the_socket_directory_is_created_0755(short_dir: Path) -> None:
    path = short_dir / "a" / "b" / "kvd.sock"
    prepare_socket_dir(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755 & ~_umask()


def test_a_directory_that_cannot_be_made_is_one_error(short_dir: Path) -> None:
    (short_dir / "file").write_text("x")
    with pytest.raises(StartupError, match=r"socket directory .*/file: it is not a directory"):
        prepare_socket_dir(short_dir / "file" / "kvd.sock")
    with pytest.raises(StartupError, match=r"cannot create the socket directory .*/file/sub: Not a directory"):
        prepare_socket_dir(short_dir / "file" / "sub" / "kvd.sock")
    assert (short_dir / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another user")
def test_a_directory_another_user_owns_is_refused(short_dir: Path) -> None:
    other = short_dir / "theirs"
    other.mkdir(mode=0o777)
    os.chown(other, 65534, 65534)
    with pytest.raises(StartupError, match="belongs to uid 65534, who could replace the socket"):
        prepare_socket_dir(other / "kvd.sock")
    # A directory of ours inside theirs is no better: they can rename it and put their own in its place.
    os.chown(other, 0, 0)
    (other / "ours").mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(StartupError, match=f"{other} belongs to uid 65534"):
        prepare_socket_dir(other / "ours" / "kvd.sock")


def test_a_world_writable_directory_without_the_sticky_bit_is_refused(short_dir: Path) -> None:
    open_dir = short_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(StartupError, match="is writable by everyone"):
        prepare_socket_dir(open_dir / "kvd.sock")
    open_dir.chmod(0o1777)  # sticky, as /tmp: only an entry's owner may rename it
    prepare_socket_dir(open_dir / "kvd.sock")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may enter any directory")
def test_a_directory_without_search_permission_is_refused(short_dir: Path) -> None:
    locked = short_dir / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(StartupError, match="no write and search permission"):
            prepare_socket_dir(locked / "kvd.sock")
    finally:
        locked.chmod(0o700)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
