"""The daemon's Unix socket paths, checked before anything binds.

kvd removes nothing at a socket path but a socket nobody answers on (a crashed daemon's). Anything else there, a
regular file (a typo such as `--socket /etc/kvd/kvd.toml`), a directory, a symlink, or a socket a live daemon answers
on, is a StartupError that names the path. So is a socket directory that cannot be created or entered, or one on a
path another user could rename (who could replace the socket under the daemon and take its workers' connections).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from kvd.errors import StartupError

_KINDS = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink"}
_CHOOSE = "choose another socket path (--socket, KVD_SOCKET)"


def prepare_socket_dir(path: Path) -> None:
    """Create the directory `path` goes in (0755) if need be; a StartupError if the daemon may not use it."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    except FileExistsError as exc:
        raise StartupError(f"cannot create the socket directory {directory}: it is not a directory") from exc
    except OSError as exc:
        raise StartupError(
            f"cannot create the socket directory {directory}: {exc.strerror} (uid {os.geteuid()}); create it for this "
            f"user, or {_CHOOSE}"
        ) from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StartupError(
            f"cannot create a socket in {directory}: no write and search permission for uid {os.geteuid()}; "
            f"give this user access, or {_CHOOSE}"
        )
    _check_owners(directory.resolve())


def _check_owners(directory: Path) -> None:
    """Whoever may rename an entry on the way to the socket could put their own socket in its place and take the
    workers' connections: every directory up to / must be this user's or root's, and none writable by everyone
    unless sticky (as /tmp is)."""
    for ancestor in (directory, *directory.parents):
        st = ancestor.stat()
        if st.st_uid not in (os.geteuid(), 0):
            raise StartupError(
                f"{ancestor} belongs to uid {st.st_uid}, who could replace the socket in {directory}: use a directory "
                f"of this user (uid {os.geteuid()}) or root, or {_CHOOSE}"
            )
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise StartupError(
                f"{ancestor} is writable by everyone, who could replace the socket in {directory}: chmod o-w it, "
                f"or {_CHOOSE}"
            )


def clear_stale_socket(path: Path) -> None:
    """Remove a socket at `path` that nobody answers on; a StartupError for anything else there."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"cannot inspect {path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a socket")
        raise StartupError(f"{path} is {kind}, and kvd replaces only a stale socket: move it away, or {_CHOOSE}")
    if _answers(path):
        raise StartupError(f"another daemon is serving on {path}: stop it first, or {_CHOOSE}")
    path.unlink(missing_ok=True)


def check_bindable(path: Path) -> None:
    """Bind a throwaway socket at the (cleared) `path` to learn the kernel's reason if it cannot be done (a read-only
    or special file system...): grpc would log its own line and report only that the bind failed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(str(path))
        except OSError as exc:
            raise StartupError(f"cannot create a socket at {path}: {exc.strerror}; {_CHOOSE}") from exc
    path.unlink(missing_ok=True)


def _answers(path: Path) -> bool:
    """Whether a process accepts connections on the socket `path` (refused: a stale socket a crashed daemon left)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ETIMEDOUT) or isinstance(exc, TimeoutError):
                return True  # a full backlog: someone is there, just busy
            raise StartupError(f"cannot tell whether {path} is live: {exc.strerror or exc}; {_CHOOSE}") from exc
    return True
