"""Run the real daemon (`python -m kvd serve`) as a subprocess on a temporary Unix socket.

    with Daemon(lease_ms=600) as daemon:      # started and SERVING
        stub = daemon.stub()
        daemon.kill()                          # SIGKILL, like a crash
        daemon.start()                         # same socket, new boot id
        assert daemon.terminate() == 0         # SIGTERM: drain, exit 0

Every process started here is also killed at interpreter exit, so a failing test never leaves a daemon behind.
Configuration travels as `KVD_*` environment variables (the daemon's own mechanism); the caller's `KVD_*` variables
are dropped so a developer's shell cannot change what a test runs against. One exception, read here and never passed
on: KVD_TEST_DAEMON_WRAPPER runs the daemon under a tool, e.g. `compute-sanitizer --log-file /tmp/cs.%p.log`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20

# Reconnect fast after a restart (gRPC's default backoff starts at 1 s and grows to 120 s).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
    ("grpc.enable_http_proxy", 0),
]

# A tool the daemon runs under (e.g. compute-sanitizer); such tools slow its start a lot.
WRAPPER = shlex.split(os.environ.get("KVD_TEST_DAEMON_WRAPPER", ""))
START_SLOWDOWN = 10.0 if WRAPPER else 1.0
# Settings every daemon of a run gets on top of its test's ("KVD_X=V KVD_Y=W"): to run a suite again in another mode
# (bench/run_on_gpu.sh: KVD_TESTS_AGAIN_WITH). A test's own settings win.
EXTRA_ENV = dict(kv.split("=", 1) for kv in shlex.split(os.environ.get("KVD_TEST_DAEMON_ENV", "")))

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_live: set[subprocess.Popen[Any]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        with contextlib.suppress(OSError):
            proc.kill()
            proc.wait(timeout=5)


def track(proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
    """Kill `proc` at interpreter exit unless it was reaped before (see `reap`)."""
    _live.add(proc)
    return proc


def reap(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """Wait for `proc`, SIGKILL it if it does not exit in time; its exit code (negative: killed by that signal)."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait(timeout=10)
    _live.discard(proc)
    return code


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: ours without KVD_*, the repo on PYTHONPATH (for tests.helpers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.01, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy (returned), or raise TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


class DaemonError(RuntimeError):
    pass


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), nearest first."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found.extend(int(c) for c in children)
        frontier.extend(int(c) for c in children)
    return found


class Daemon:
    """One daemon on `socket` (in a fresh temporary directory unless `workdir` is given)."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        capacity_bytes: int = 64 * MiB,
        slab_bytes: int = 1 * MiB,
        lease_ms: int = 600,
        env: Mapping[str, str] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self._own_dir = workdir is None
        # Short paths: a Unix socket path must fit in 108 bytes, and pytest's tmp_path can be longer than that.
        self.workdir = Path(tempfile.mkdtemp(prefix="kvd-")) if workdir is None else Path(workdir)
        self.socket = self.workdir / "kvd.sock"
        self.lease_ms = lease_ms
        self.env = {
            **EXTRA_ENV,
            "KVD_HOST_POOL__CAPACITY_BYTES": str(capacity_bytes),
            "KVD_HOST_POOL__SLAB_BYTES": str(slab_bytes),
            "KVD_LEASE_MS": str(lease_ms),
            "KVD_LOG__LEVEL": log_level,
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._channel: grpc.Channel | None = None
        self._log_path = self.workdir / "kvd.log"

    # -- paths and state -----------------------------------------------------------------------------------------

    @property
    def credential_socket(self) -> Path:
        return self.socket.with_name(self.socket.name + ".cred")

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DaemonError("the daemon is not running")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, wait: bool = True, timeout: float = 30.0) -> Daemon:
        """Start the daemon (it must not be running); by default wait until health says SERVING."""
        if self.running:
            raise DaemonError("the daemon is already running")
        self._close_channel()
        self.starts += 1
        with self._log_path.open("ab") as log:
            log.write(f"==== start {self.starts} ====\n".encode())
            log.flush()
            self.proc = track(
                subprocess.Popen(
                    [*WRAPPER, sys.executable, "-m", "kvd", "serve", "--socket", str(self.socket)],
                    env=child_env(self.env),
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a Ctrl-C at the terminal reaches pytest only; cleanup stops us
                )
            )
        if wait:
            self.wait_serving(timeout * START_SLOWDOWN)
        return self

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                code = self.proc.poll() if self.proc is not None else None
                raise DaemonError(f"the daemon exited with {code} before serving; its log:\n{self.log_text()}")
            if self.health(timeout=0.5) == SERVING:
                return
            if time.monotonic() > deadline:
                raise DaemonError(f"the daemon was not SERVING after {timeout:.0f}s; its log:\n{self.log_text()}")
            time.sleep(0.02)

    def kill(self) -> int:
        """SIGKILL (a crash: no drain, the socket file stays behind). Returns the exit status (-9)."""
        return self._signal(signal.SIGKILL, timeout=10.0)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: NOT_SERVING, drain, exit). Returns the exit code; SIGKILL after `timeout`."""
        return self._signal(signal.SIGTERM, timeout=timeout)

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` without waiting (e.g. SIGSTOP / SIGCONT)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def restart(self, *, hard: bool = False, timeout: float = 30.0) -> str:
        """Stop (SIGKILL if `hard`, else SIGTERM) and start again on the same socket; the new boot id."""
        if self.running:
            if hard:
                self.kill()
            else:
                self.terminate()
        self.start(timeout=timeout)
        return self.stats().boot_id

    def close(self) -> None:
        """Stop the daemon if it runs (SIGTERM, then SIGKILL) and remove the temporary directory."""
        self._close_channel()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                if self.proc.poll() is None:
                    os.kill(self.proc.pid, signal.SIGCONT)  # a SIGSTOPped daemon cannot act on SIGTERM
                    self._send(signal.SIGTERM)
            reap(self.proc, timeout=10.0 * START_SLOWDOWN)
            self._kill_wrapped()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _signal(self, sig: signal.Signals, timeout: float) -> int:
        if self.proc is None:
            raise DaemonError("the daemon was never started")
        self._close_channel()
        if self.proc.poll() is None:
            self._send(sig)
        status = reap(self.proc, timeout=timeout)
        self._kill_wrapped()
        return status

    def _send(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        if WRAPPER and sig != signal.SIGKILL:
            # The daemon itself must stop (and drain) so the tool around it can write its report.
            for pid in _descendants(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        else:
            self.proc.send_signal(sig)

    def _kill_wrapped(self) -> None:
        """Nothing started under a wrapper may outlive it (a SIGKILLed tool leaves its child running)."""
        if WRAPPER and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Daemon:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- talking to it -------------------------------------------------------------------------------------------

    def new_channel(self) -> grpc.Channel:
        """A fresh sync channel to the socket (the caller closes it)."""
        return grpc.insecure_channel(f"unix:{self.socket}", options=CHANNEL_OPTIONS)

    def channel(self) -> grpc.Channel:
        """A shared sync channel, replaced after every restart."""
        if self._channel is None:
            self._channel = self.new_channel()
        return self._channel

    def stub(self) -> kvd_pb2_grpc.KvdStub:
        return kvd_pb2_grpc.KvdStub(self.channel())

    def health_stub(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel())

    def health(self, service: str = "", timeout: float = 2.0) -> int | None:
        """The health status (SERVING, NOT_SERVING, ...), or None when nothing answers."""
        if not self.socket.exists():
            return None
        try:
            response = self.health_stub().Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
        return int(response.status)

    def stats(self, timeout: float = 5.0) -> kvd_pb2.StatsResponse:
        return self.stub().Stats(kvd_pb2.StatsRequest(), timeout=timeout)

    def session_labels(self) -> set[str]:
        """The sessions Stats lists, by label (Stats never shows ids): compare with `session_label(id)`."""
        return {s.session_id for s in self.stats().sessions}

    def host_tier(self) -> kvd_pb2.TierStats:
        for tier in self.stats().tiers:
            if tier.tier == kvd_pb2.TIER_HOST_MEMORY:
                return tier
        raise DaemonError("Stats lists no host-memory tier")

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
