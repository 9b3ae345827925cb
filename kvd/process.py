"""A peer process the daemon acts for: bound to the process itself (a pidfd), never to its pid number.

kvd often runs as root or with CAP_SYS_PTRACE, so it must never read or write memory its peer could not. The peer is
the process that connected to the credential socket, with the uid and gid the kernel recorded for that connection
(SO_PEERCRED), and the process is held by a pidfd taken from the same connection (SO_PEERPIDFD; on kernels before
6.5, pidfd_open of the recorded pid, kept only if that process started before the connection was accepted).

`check()` answers "could that peer still do this itself?": the process has not exited (a pid number may belong to
someone else by then), its real, effective, saved and filesystem uids and gids all equal the peer's, and it is
dumpable (the kernel hands a non-dumpable process's /proc directory to root). A setuid or setgid exec, a credential
change or PR_SET_DUMPABLE 0 fails it.

`open_memory()` opens /proc/<pid>/mem between two checks, with the peer's filesystem credentials where the daemon can
take them (the kernel's own ptrace check for that uid, Yama included). The descriptor is bound to the address space
the process had at that moment: I/O through it fails once the process execs, so a copy through it can never reach a
new (setuid) image, and its one-byte read is how a copy made by pid proves the address space is still that one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kvd.errors import PermissionDenied

log = logging.getLogger(__name__)

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5
_UCRED = struct.Struct("3i")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
CAP_SYS_PTRACE = 19
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYSCALLS = {  # setfsuid, setfsgid, capget, capset
    "x86_64": (122, 123, 125, 126),
    "aarch64": (151, 152, 90, 91),
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True, slots=True)
class ProcessCredentials:
    """What /proc says about a process now: (real, effective, saved, fs) uids and gids, and its /proc owner."""

    uids: tuple[int, ...]
    gids: tuple[int, ...]
    owner: tuple[int, int]


class PeerProcess:
    """The process at the other end of a credential-socket connection, and the uid and gid it connected with.

    `pid` is its pid in the daemon's pid namespace (0 where the daemon cannot see it: no /proc access then, and no
    CPU transport). Owns two descriptors (the pidfd and /proc/<pid>); `close()` them."""

    def __init__(self, pid: int, uid: int, gid: int, pidfd: int | None, proc_dir: int | None) -> None:
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.pidfd = pidfd
        self._proc_dir = proc_dir

    @classmethod
    def of_connection(cls, sock: socket.socket) -> PeerProcess:
        """The peer of an accepted Unix-socket connection, bound to its process now (PermissionDenied if that
        process cannot be held: it exited already, or its pid was reused)."""
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        pidfd = _peer_pidfd(sock, pid)
        peer = cls(pid, uid, gid, pidfd, None)
        try:
            if pid > 0 and pidfd is not None:
                peer._proc_dir = _open_proc_dir(pid)
                if not peer.alive():  # the directory may be a newer process's with the same pid
                    raise PermissionDenied(f"pid {pid} exited while connecting to the credential socket")
            peer.check("credential socket")
        except BaseException:
            peer.close()
            raise
        return peer

    @property
    def visible(self) -> bool:
        """Whether the daemon can reach the process through /proc (same or parent pid namespace)."""
        return self._proc_dir is not None

    def alive(self) -> bool:
        """False once the process has exited (its pidfd turns readable). Without a pidfd: assumed alive."""
        if self.pidfd is None:
            return True
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    def credentials(self) -> ProcessCredentials:
        """The process's credentials now; PermissionDenied if it exited or cannot be seen."""
        if self._proc_dir is None:
            raise PermissionDenied(f"pid {self.pid} is not visible to the daemon (another pid namespace)")
        try:
            fd = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._proc_dir)
            try:
                text = os.read(fd, 16384).decode(errors="replace")
            finally:
                os.close(fd)
            st = os.fstat(self._proc_dir)
        except OSError as exc:
            raise PermissionDenied(f"pid {self.pid} exited") from exc
        return ProcessCredentials(_ids(text, "Uid:"), _ids(text, "Gid:"), (st.st_uid, st.st_gid))

    def check(self, what: str) -> None:
        """PermissionDenied unless the peer could still act on its process itself (see the module docstring)."""
        if not self.alive():
            raise PermissionDenied(f"{what}: the worker process (pid {self.pid}) has exited")
        if self._proc_dir is None:
            return  # nothing more to see; such a peer is never given access to process memory
        creds = self.credentials()
        if creds.uids != (self.uid,) * 4 or creds.gids != (self.gid,) * 4:
            raise PermissionDenied(
                f"{what}: the credentials of pid {self.pid} changed since it connected (uid {self.uid}, gid"
                f" {self.gid}; now uids {creds.uids}, gids {creds.gids}: a setuid/setgid exec or a credential change)"
            )
        if creds.owner != (self.uid, self.gid) and self.uid != 0:
            raise PermissionDenied(f"{what}: pid {self.pid} is not dumpable (a setuid exec or PR_SET_DUMPABLE 0)")
        if not self.alive():
            raise PermissionDenied(f"{what}: the worker process (pid {self.pid}) has exited")

    def open_memory(self) -> int:
        """/proc/<pid>/mem for reading and writing, bound to the process's address space now (see the module
        docstring); the caller closes it. PermissionDenied if the peer could not open it itself."""
        if self._proc_dir is None:
            raise PermissionDenied(
                f"pid {self.pid} is not visible to the daemon: the CPU transport needs the worker in the daemon's"
                " pid namespace (hostPID, or one pod with shareProcessNamespace)"
            )
        self.check("registration")
        try:
            with _filesystem_credentials(self.uid, self.gid):
                fd = os.open("mem", os.O_RDWR | os.O_CLOEXEC, dir_fd=self._proc_dir)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermissionDenied(
                    f"uid {self.uid} may not access pid {self.pid}'s memory: the worker must call"
                    f" prctl(PR_SET_PTRACER, {os.getpid()}) (Yama) and stay dumpable"
                ) from None
            raise PermissionDenied(f"pid {self.pid} exited") from exc
        try:
            self.check("registration")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def same_process(self, other: PeerProcess) -> bool:
        """Whether `other` (the peer of another connection) is this very process, alive: the same pidfd inode where
        pidfds have their own (pidfs, Linux 6.9), else the same pid while both are alive (a live process's pid is
        its own). Never true for a process the daemon cannot tell apart (no pidfd and no pid)."""
        if (self.uid, self.gid) != (other.uid, other.gid) or not (self.alive() and other.alive()):
            return False
        mine, theirs = _pidfd_identity(self.pidfd), _pidfd_identity(other.pidfd)
        if mine is not None and theirs is not None:
            return mine == theirs
        return self.pid > 0 and self.pid == other.pid and self.pidfd is not None and other.pidfd is not None

    def close(self) -> None:
        for fd in (self.pidfd, self._proc_dir):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pidfd = self._proc_dir = None

    def __repr__(self) -> str:
        return f"PeerProcess(pid={self.pid}, uid={self.uid}, gid={self.gid})"


def _ids(status: str, label: str) -> tuple[int, ...]:
    for line in status.splitlines():
        if line.startswith(label):
            return tuple(int(x) for x in line.split()[1:5])
    return ()


def _open_proc_dir(pid: int) -> int | None:
    try:
        return os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def _peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd for the connecting process: SO_PEERPIDFD (the kernel's own, Linux 6.5), else pidfd_open of the
    recorded pid, kept only if that process started before now (a pid reused since would have started later)."""
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise PermissionDenied("the connecting process exited before its credentials were read") from None
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    if pid <= 0 or not hasattr(os, "pidfd_open"):
        return None
    accepted = time.clock_gettime(time.CLOCK_BOOTTIME)
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        raise PermissionDenied(f"pid {pid} exited before its credentials were read") from None
    started = _start_time(pid)
    if started is None or started > accepted + 1.0 / _CLK_TCK:
        os.close(fd)
        raise PermissionDenied(f"pid {pid} is not the process that connected (it started after the connection)")
    return fd


_unique_pidfd_inodes: bool | None = None


def _pidfd_identity(pidfd: int | None) -> tuple[int, int] | None:
    """(device, inode) of a pidfd where each process has its own (pidfs); None where all share one anonymous inode
    (before Linux 6.9), or without a pidfd."""
    global _unique_pidfd_inodes
    if pidfd is None:
        return None
    if _unique_pidfd_inodes is None:
        _unique_pidfd_inodes = _pidfds_have_own_inodes()
    if not _unique_pidfd_inodes:
        return None
    st = os.fstat(pidfd)
    return st.st_dev, st.st_ino


def _pidfds_have_own_inodes() -> bool:
    """Whether pidfds of two processes (ours and our parent's) have different inodes."""
    try:
        fds = [os.pidfd_open(os.getpid()), os.pidfd_open(os.getppid())]
    except (OSError, AttributeError):
        return False
    try:
        return os.fstat(fds[0]).st_ino != os.fstat(fds[1]).st_ino
    finally:
        for fd in fds:
            os.close(fd)


def _start_time(pid: int) -> float | None:
    """Seconds after boot at which `pid` started (/proc/<pid>/stat field 22), or None if it is gone."""
    try:
        stat = open(f"/proc/{pid}/stat", "rb").read().decode(errors="replace")  # noqa: SIM115 - one read
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19]) / _CLK_TCK


# -- filesystem credentials of one thread ---------------------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _calls() -> tuple[int, int, int, int] | None:
    return _SYSCALLS.get(platform.machine())


@contextlib.contextmanager
def _filesystem_credentials(uid: int, gid: int) -> Iterator[None]:
    """Run the body (on this thread only) with the peer's filesystem uid and gid and without CAP_SYS_PTRACE in
    effect, so the kernel's own ptrace check for opening /proc/<pid>/mem is the peer's. Signals and every other
    permission are unaffected (fs ids only). Where the daemon may not take those ids (no CAP_SETUID/CAP_SETGID and
    another uid), the body runs as the daemon and the checks around it decide alone."""
    calls = _calls()
    own_fsuid, own_fsgid = os.geteuid(), os.getegid()
    if calls is None or uid == 0 or (uid == own_fsuid and gid == own_fsgid and not _has_ptrace()):
        yield  # a root peer may do what the daemon may (and ptrace needs the caps a root worker holds)
        return
    setfsuid, setfsgid, capget, capset = calls
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    saved = (_CapData * 2)()
    if _libc.syscall(capget, ctypes.byref(header), saved) != 0:
        yield
        return
    _libc.syscall(setfsgid, gid)
    _libc.syscall(setfsuid, uid)
    switched = _libc.syscall(setfsuid, -1) == uid and _libc.syscall(setfsgid, -1) == gid
    try:
        if switched:
            dropped = (_CapData * 2)()
            ctypes.memmove(dropped, saved, ctypes.sizeof(saved))
            dropped[0].effective &= ~(1 << CAP_SYS_PTRACE)
            _libc.syscall(capset, ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), dropped)
        else:
            log.debug("running as the daemon's own fs ids: may not take uid %d gid %d", uid, gid)
        yield
    finally:
        _libc.syscall(setfsuid, own_fsuid)
        _libc.syscall(setfsgid, own_fsgid)
        _libc.syscall(capset, ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), saved)
        if _libc.syscall(setfsuid, -1) != own_fsuid or _libc.syscall(setfsgid, -1) != own_fsgid:
            log.critical("could not restore the daemon's filesystem credentials; exiting")
            os._exit(70)


def _effective_caps() -> int:
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _has_ptrace() -> bool:
    return bool(_effective_caps() >> CAP_SYS_PTRACE & 1)


def no_more_privileged_than(uid: int, gid: int) -> bool:
    """Whether the daemon holds no privilege over a peer of (uid, gid): the same real, effective and saved ids and
    no capability in effect. Then the kernel's own checks on every copy the daemon makes (ptrace access, at the
    moment of the call) are exactly the peer's, and need no help from the daemon's."""
    return os.getresuid() == (uid,) * 3 and os.getresgid() == (gid,) * 3 and _effective_caps() == 0
