"""A real small filesystem for disk-full tests and the soak: a tmpfs of a given size mounted on a directory.

Mounting needs root (or CAP_SYS_ADMIN); `mount_tmpfs` says why it could not, so a caller can skip with that reason.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path


def mount_tmpfs(mountpoint: Path, size_bytes: int) -> str | None:
    """Mount a tmpfs of `size_bytes` on `mountpoint` (created if needed); None, or why it could not."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None:
        return "no mount(8) on this machine"
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "kvd-test", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}"
    return None


def unmount(mountpoint: Path) -> None:
    """Unmount (lazily if something still holds it open); nothing if it is not a mount point."""
    if not os.path.ismount(mountpoint):
        return
    subprocess.run(["umount", str(mountpoint)], capture_output=True)
    if os.path.ismount(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill_up(path: Path) -> int:
    """Append to `path` until the filesystem refuses another byte (ENOSPC); the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 64 << 10, 4 << 10, 512, 1):
            block = b"x" * chunk
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written
