"""A process the security tests drive as an attacker (or a bystander) of another uid, over JSON lines.

Child side (`python -m tests.security.agent --uid U --gid G`): started as root, it imports everything it needs, then
drops to (U, G) for good (every uid and gid, no supplementary groups) and makes itself dumpable again, like any
process of that user. The interpreter may live where only root can read (a pyenv under /root): nothing is imported
after the drop. Then it answers one JSON line per command read from stdin; bytes travel as hex.

    token {socket}                       connect to the credential socket, read until EOF: {data} (a token, or
                                         the daemon's refusal), {error} if the connection failed
    alloc {nbytes, addr?, fill?}         an anonymous mapping (at `addr` if given, never replacing one): {addr}
    read {addr, nbytes} / write {addr, data}
    call {socket, method, request, timeout_s}
                                         one unary kvd.v1.Kvd call with raw bytes: {code, details, response}
    watch {socket, request, timeout_s, count}
                                         a Watch stream: up to `count` notices within timeout_s: {code, notices}
    drop {uid, gid}                      become (uid, gid) now, like the start-up drop: {ids}
    exec {argv}                          execv in place (stdin and stdout stay: the new program answers next)
    exit

`holder.py` is the program such an agent execs: a setuid-root copy of the interpreter holding a root-only secret.
Parent side: `Agent`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

PR_SET_DUMPABLE = 4
MAP_FIXED_NOREPLACE = 0x100000
SERVICE = "/kvd.v1.Kvd/"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def map_anonymous(nbytes: int, addr: int = 0) -> int:
    """An anonymous read-write mapping; at exactly `addr` when given (MAP_FIXED_NOREPLACE: never over another)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (MAP_FIXED_NOREPLACE if addr else 0)
    got = _libc.mmap(ctypes.c_void_p(addr or None), nbytes, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if got in (None, ctypes.c_void_p(-1).value) or (addr and got != addr):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {nbytes} bytes at {addr:#x} failed: {os.strerror(err)}")
    return int(got)


def drop_privileges(uid: int, gid: int) -> None:
    """Become (uid, gid) for good: real, effective, saved and fs ids, no supplementary groups; dumpable again (the
    uid change made the process non-dumpable, which an ordinary process of that user is not)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)


def _warm_grpc() -> None:
    """Import what grpc loads lazily on a first call, while the interpreter's files are still readable."""
    channel = grpc.insecure_channel("unix:/nonexistent/kvd-agent-warmup")
    call = channel.unary_unary(SERVICE + "Stats")
    with contextlib.suppress(grpc.RpcError):
        call(b"", timeout=0.05)
    stream = channel.unary_stream(SERVICE + "Watch")
    with contextlib.suppress(grpc.RpcError):
        list(stream(b"", timeout=0.05))
    channel.close()
    # The shared-memory command's modules (and numpy, which the index reader uses), likewise.
    import kvd_client.credentials
    import kvd_client.index  # noqa: F401
    import numpy  # noqa: F401

    import tests.helpers.index_attack  # noqa: F401


def credential_reply(cred_path: str, timeout_s: float = 5.0) -> bytes:
    """What the credential socket answers this process: a 32-byte token, or the daemon's refusal (`KVDERR ...`, to
    the end of the connection). Then the connection closes: no descriptors are passed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(cred_path)
        data = b""
        while len(data) < 32 and (chunk := sock.recv(32 - len(data))):
            data += chunk
        if data.startswith(b"KVDERR "):
            while chunk := sock.recv(4096):
                data += chunk
    return data


def _read_all(sock_path: str) -> dict[str, Any]:
    try:
        return {"data": credential_reply(sock_path).hex()}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


class _Channels:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def get(self, path: str) -> grpc.Channel:
        if path not in self._channels:
            options = [("grpc.max_send_message_length", 1 << 28)]
            self._channels[path] = grpc.insecure_channel(f"unix:{path}", options=options)
        return self._channels[path]


def _call(channels: _Channels, msg: dict[str, Any]) -> dict[str, Any]:
    call = channels.get(msg["socket"]).unary_unary(SERVICE + msg["method"])
    try:
        response = call(bytes.fromhex(msg["request"]), timeout=float(msg.get("timeout_s", 10.0)))
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "details": exc.details() or "", "response": ""}
    return {"code": "OK", "details": "", "response": response.hex()}


def _watch(channels: _Channels, msg: dict[str, Any]) -> dict[str, Any]:
    stream = channels.get(msg["socket"]).unary_stream(SERVICE + "Watch")
    notices: list[str] = []
    call = stream(bytes.fromhex(msg["request"]), timeout=float(msg.get("timeout_s", 5.0)))
    try:
        for notice in call:
            notices.append(notice.hex())
            if len(notices) >= int(msg.get("count", 1)):
                call.cancel()
                break
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            return {"code": exc.code().name, "details": exc.details() or "", "notices": notices}
    return {"code": "OK", "details": "", "notices": notices}


def _child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uid", type=int, default=-1)
    parser.add_argument("--gid", type=int, default=-1)
    args = parser.parse_args(argv)
    _warm_grpc()
    if args.uid >= 0:
        drop_privileges(args.uid, args.gid if args.gid >= 0 else args.uid)
    channels = _Channels()

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"event": "agent", "pid": os.getpid(), "ids": [os.getresuid(), os.getresgid()]})
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "token":
                reply(_read_all(msg["socket"]))
            elif cmd == "alloc":
                addr = map_anonymous(int(msg["nbytes"]), int(msg.get("addr", 0)))
                ctypes.memset(addr, int(msg.get("fill", 0)), int(msg["nbytes"]))
                reply({"addr": addr})
            elif cmd == "read":
                reply({"data": ctypes.string_at(int(msg["addr"]), int(msg["nbytes"])).hex()})
            elif cmd == "write":
                data = bytes.fromhex(msg["data"])
                ctypes.memmove(int(msg["addr"]), data, len(data))
                reply({"ok": True})
            elif cmd == "call":
                reply(_call(channels, msg))
            elif cmd == "watch":
                reply(_watch(channels, msg))
            elif cmd == "drop":
                drop_privileges(int(msg["uid"]), int(msg["gid"]))
                reply({"ids": [os.getresuid(), os.getresgid()]})
            elif cmd == "shared":
                reply(_shared(msg))
            elif cmd == "exec":
                sys.stdout.flush()
                os.execv(msg["argv"][0], msg["argv"])
            elif cmd == "exit":
                reply({"bye": True})
                return 0
            else:
                reply({"error": f"unknown command {cmd}"})
        except OSError as exc:
            reply({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def _shared(msg: dict[str, Any]) -> dict[str, Any]:
    """As this process: ask for a session's shared memory; probe its index for `hashes`, try every way to write
    it (tests.helpers.index_attack), and try to open the `foreign` paths (another process's descriptors)."""
    from kvd_client.credentials import fetch_grant
    from kvd_client.errors import KvdError
    from kvd_client.fdpass import GRANT_INDEX, GRANT_SHARED
    from kvd_client.index import IndexReader

    from tests.helpers.index_attack import attempts

    foreign = {}
    for path in msg.get("foreign", []):
        try:
            os.close(os.open(path, os.O_RDONLY))
            foreign[path] = "ALLOWED"
        except OSError as exc:
            foreign[path] = f"refused: {exc}"
    try:
        grant = fetch_grant(Path(msg["socket"]), msg["session"], bytes.fromhex(msg["key"]), GRANT_SHARED, 10.0)
    except (OSError, KvdError) as exc:  # GrantRefused is an OSError
        return {"refused": str(exc), "foreign": foreign}
    fd = grant.take(GRANT_INDEX)
    grant.close()
    if fd < 0:
        return {"index": False, "foreign": foreign}
    reader = IndexReader(fd)
    hits = reader.probe([bytes.fromhex(h) for h in msg["hashes"]])
    writes = {}
    for name, attempt in attempts(fd, os.fstat(fd).st_size).items():
        try:
            attempt()
            writes[name] = "ALLOWED"
        except OSError as exc:
            writes[name] = f"refused: {exc}"
    os.close(fd)
    return {"hits": hits, "label": reader.header.label.hex(), "writes": writes, "foreign": foreign}


# -- parent side ------------------------------------------------------------------------------------------------


class AgentError(RuntimeError):
    pass


class Agent:
    """One agent process (or, after `exec`, whatever it became); `request` sends a command and reads one line."""

    def __init__(self, proc: subprocess.Popen[str], log_path: Path | None = None) -> None:
        self.proc = proc
        self.log_path = log_path
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="kvd-test-agent-reader").start()
        self.hello = self.next_line(60.0)

    @classmethod
    def start(cls, uid: int = -1, gid: int = -1, *, env: dict[str, str], log_path: Path | None = None) -> Agent:
        """An agent of (uid, gid); uid -1: it stays root."""
        from tests.helpers.daemon import track

        stderr = log_path.open("ab") if log_path is not None else subprocess.DEVNULL
        try:
            proc = track(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.security.agent", f"--uid={uid}", f"--gid={gid}"],
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                )
            )
        finally:
            if log_path is not None:
                stderr.close()  # type: ignore[union-attr]
        agent = cls(proc, log_path)
        if agent.hello.get("event") != "agent":
            raise AgentError(f"agent did not start: {agent.hello}{agent._log_tail()}")
        return agent

    @classmethod
    def adopt(cls, proc: subprocess.Popen[str]) -> Agent:
        """Drive a process started elsewhere that speaks the same protocol (a holder); its first line is `hello`."""
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        if self.proc.stdout is None:
            return
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "; its log:\n" + self.log_path.read_text(errors="replace")[-3000:]

    def next_line(self, timeout: float = 30.0) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AgentError(f"agent {self.pid} did not answer within {timeout:.0f}s{self._log_tail()}") from None
        if line is None:
            raise AgentError(f"agent {self.pid} exited ({self.proc.poll()}){self._log_tail()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def send(self, cmd: str, **fields: Any) -> None:
        if self.proc.stdin is None:
            raise AgentError("agent has no stdin")
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()

    def request(self, cmd: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        self.send(cmd, **fields)
        return self.next_line(timeout)

    # -- commands ------------------------------------------------------------------------------------------------

    def credential_bytes(self, daemon_socket: Path) -> bytes:
        """What the credential socket sends this process: a token, or the daemon's refusal."""
        answer = self.request("token", socket=str(daemon_socket.with_name(daemon_socket.name + ".cred")))
        if "error" in answer:
            raise AgentError(answer["error"])
        return bytes.fromhex(answer["data"])

    def alloc(self, nbytes: int, addr: int = 0, fill: int = 0) -> int:
        answer = self.request("alloc", nbytes=nbytes, addr=addr, fill=fill)
        if "error" in answer:
            raise AgentError(answer["error"])
        return int(answer["addr"])

    def read(self, addr: int, nbytes: int) -> bytes:
        return bytes.fromhex(self.request("read", addr=addr, nbytes=nbytes)["data"])

    def write(self, addr: int, data: bytes) -> None:
        self.request("write", addr=addr, data=data.hex())

    def call(self, daemon_socket: Path, method: str, request: bytes, timeout: float = 10.0) -> tuple[str, str, bytes]:
        """(status code name, details, response bytes) of one raw unary call made by this process."""
        answer = self.request(
            "call", timeout=timeout + 10, socket=str(daemon_socket), method=method, request=request.hex(),
            timeout_s=timeout,
        )
        return answer["code"], answer["details"], bytes.fromhex(answer["response"])

    def watch(self, daemon_socket: Path, request: bytes, count: int, timeout: float = 5.0) -> tuple[str, list[bytes]]:
        answer = self.request(
            "watch", timeout=timeout + 10, socket=str(daemon_socket), request=request.hex(), count=count,
            timeout_s=timeout,
        )
        return answer["code"], [bytes.fromhex(n) for n in answer["notices"]]

    def exec(self, argv: Sequence[str]) -> dict[str, Any]:
        """execv in place; the first line of the new program."""
        self.send("exec", argv=list(argv))
        return self.next_line(60.0)

    def close(self) -> None:
        from tests.helpers.daemon import reap

        if self.proc.poll() is None:
            try:
                self.send("exit")
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            except (BrokenPipeError, ValueError, OSError):
                pass
        reap(self.proc, timeout=5.0)


if __name__ == "__main__":
    raise SystemExit(_child_main())
