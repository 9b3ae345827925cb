"""Attack 1 of issue #12: make the daemon (root) read or write memory of a process the client does not own.

A process of an unprivileged uid takes a credential token, then becomes something else under the same pid: a
setuid-root program (exec in place), or gone, its pid taken by a root process. A second process of that uid redeems
the token, registers a CPU session over the new image's memory, and saves (reads) and loads (writes) through it. The
daemon must refuse, at registration and at every copy: it never touches memory the token holder could not.

Runs as root (it starts processes of other uids and makes a setuid program); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon, child_env, reap, track
from tests.helpers.kvdata import block_hash
from tests.security.agent import Agent
from tests.security.conftest import HOLDER, AgentFactory
from tests.security.kit import (
    ADDR,
    NOBODY,
    AgentSession,
    raw_cpu_request,
    register,
    requires_root,
    token_of,
)

pytestmark = requires_root

NBLOCKS = 4
BLOCK = 4096
NBYTES = NBLOCKS * BLOCK
PWNED = b"P" * NBYTES


@dataclass
class Outcome:
    """What the attacker got: the hijacked session's registration, every byte it could read back, the copies'
    outcomes, and the target's buffer as the target itself sees it afterwards."""

    registration: str
    stolen: bytes = b""
    copies: tuple[str, ...] = ()
    target_after: bytes = b""


def _own_session(attacker: Agent, daemon: Daemon, model: str) -> tuple[AgentSession, int]:
    """A legitimate session over a buffer of the attacker's own: where stolen bytes land, and planted ones start."""
    own = attacker.alloc(NBYTES)
    request = raw_cpu_request(token_of(attacker, daemon.socket), own, NBLOCKS, BLOCK, model)
    status, session = register(attacker, daemon.socket, request)
    assert session is not None, f"the attacker's own session: {status}"
    return session, own


def _use(hijacked: AgentSession, attacker: Agent, daemon: Daemon, model: str) -> tuple[bytes, tuple[str, ...]]:
    """Read the target through the hijacked session (save, then load into the attacker's own memory), then write
    PWNED into it (load). The bytes read back and each hijacked copy's outcome."""
    steal = list(enumerate(block_hash(i, f"steal-{model}") for i in range(NBLOCKS)))
    pwn = list(enumerate(block_hash(i, f"pwn-{model}") for i in range(NBLOCKS)))
    own, own_addr = _own_session(attacker, daemon, model)
    save_status, save_notice = hijacked.transfer("Save", steal)
    own.transfer("Load", steal)
    stolen = attacker.read(own_addr, NBYTES)
    attacker.write(own_addr, PWNED)
    own.transfer("Save", pwn)
    load_status, load_notice = hijacked.transfer("Load", pwn)
    copies = tuple(
        status if notice is None else ("ok" if notice.ok else f"failed: {notice.error}")
        for status, notice in ((save_status, save_notice), (load_status, load_notice))
    )
    return stolen, copies


def _read_holder(holder: Agent) -> bytes:
    return bytes.fromhex(holder.request("read")["data"])


def _assert_untouched(outcome: Outcome, secret: bytes) -> None:
    harm = []
    if b"ROOT-ONLY-SECRET" in outcome.stolen:
        harm.append("the attacker read the root-only secret through the daemon")
    if outcome.target_after != secret:
        harm.append(f"the daemon wrote into the privileged process ({outcome.target_after.count(b'P')} bytes of P)")
    harm += [f"a copy with the privileged process ran: {c}" for c in outcome.copies if c.startswith("ok")]
    assert not harm, f"registration {outcome.registration}: " + "; ".join(harm)


def test_token_of_a_process_that_then_execs_a_setuid_program_is_refused(
    other_users_daemon: Daemon, agents: AgentFactory, holder_argv: Callable[[int, int], list[str]],
    secret: tuple[Path, bytes],
) -> None:
    daemon = other_users_daemon
    taker, attacker = agents(NOBODY), agents(NOBODY)
    token = token_of(taker, daemon.socket)
    hello = taker.exec(holder_argv(ADDR, NBYTES))  # the token's pid is now a setuid-root program
    assert hello.get("event") == "holder" and hello["ids"][0][1] == 0, hello

    status, hijacked = register(attacker, daemon.socket, raw_cpu_request(token, ADDR, NBLOCKS, BLOCK, "m-exec"))
    outcome = Outcome(registration=status)
    if hijacked is not None:
        outcome.stolen, outcome.copies = _use(hijacked, attacker, daemon, "m-exec")
    outcome.target_after = _read_holder(taker)

    _assert_untouched(outcome, secret[1])
    assert status.startswith("PERMISSION_DENIED"), status
    assert daemon.running and daemon.health() == 1


def test_session_stops_copying_when_its_process_execs_a_setuid_program(
    other_users_daemon: Daemon, agents: AgentFactory, holder_argv: Callable[[int, int], list[str]],
    secret: tuple[Path, bytes],
) -> None:
    """Registered while the process was the attacker's own; the exec comes after, under a live session."""
    daemon = other_users_daemon
    taker, attacker = agents(NOBODY), agents(NOBODY)
    taker.alloc(NBYTES, addr=ADDR)  # the region exists (and probes fine) in the image the session registers
    token = token_of(taker, daemon.socket)
    status, hijacked = register(attacker, daemon.socket, raw_cpu_request(token, ADDR, NBLOCKS, BLOCK, "m-later"))
    assert hijacked is not None, f"registering over the attacker's own process must work: {status}"
    hello = taker.exec(holder_argv(ADDR, NBYTES))
    assert hello.get("event") == "holder" and hello["ids"][0][1] == 0, hello

    outcome = Outcome(registration=status)
    outcome.stolen, outcome.copies = _use(hijacked, attacker, daemon, "m-later")
    outcome.target_after = _read_holder(taker)

    _assert_untouched(outcome, secret[1])
    assert daemon.running and daemon.health() == 1


def test_token_of_a_process_whose_credentials_changed_is_refused(
    other_users_daemon: Daemon, agents: AgentFactory
) -> None:
    """A root process takes a token, then becomes uid NOBODY (no exec): the token no longer describes it."""
    daemon = other_users_daemon
    changer = agents(-1)  # stays root for now
    addr = changer.alloc(NBYTES, fill=0x55)
    token = token_of(changer, daemon.socket)
    answer = changer.request("drop", uid=NOBODY, gid=NOBODY)
    assert answer.get("ids") == [[NOBODY] * 3, [NOBODY] * 3], answer
    status, _ = register(agents(NOBODY), daemon.socket, raw_cpu_request(token, addr, NBLOCKS, BLOCK, "m-creds"))
    assert status.startswith("PERMISSION_DENIED"), status


@contextlib.contextmanager
def _root_holder_at_pid(pid: int, secret_path: Path, tries: int = 200) -> Iterator[Agent | None]:
    """A root process holding the secret, started so that it gets `pid` (the kernel's ns_last_pid): None if other
    processes on this machine kept taking that pid."""
    for _ in range(tries):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        proc = track(
            subprocess.Popen(
                [sys.executable, "-I", str(HOLDER), str(secret_path), str(ADDR), str(NBYTES)],
                env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
        )
        if proc.pid == pid:
            holder = Agent.adopt(proc)
            try:
                yield holder
            finally:
                holder.close()
            return
        proc.kill()
        reap(proc)
    yield None


def test_token_does_not_follow_its_pid_to_another_process(
    other_users_daemon: Daemon, agents: AgentFactory, secret: tuple[Path, bytes]
) -> None:
    """The token holder exits; a root process gets its pid; the token must not reach it."""
    daemon = other_users_daemon
    taker, attacker = agents(NOBODY), agents(NOBODY)
    token = token_of(taker, daemon.socket)
    pid = taker.pid
    taker.close()  # exits and is reaped: the pid is free
    with _root_holder_at_pid(pid, secret[0]) as holder:
        if holder is None:
            pytest.skip(f"could not get pid {pid} again (a busy machine)")
        assert holder.hello.get("event") == "holder", holder.hello
        status, hijacked = register(attacker, daemon.socket, raw_cpu_request(token, ADDR, NBLOCKS, BLOCK, "m-reuse"))
        outcome = Outcome(registration=status)
        if hijacked is not None:
            outcome.stolen, outcome.copies = _use(hijacked, attacker, daemon, "m-reuse")
        outcome.target_after = _read_holder(holder)
    _assert_untouched(outcome, secret[1])
    assert status.startswith("PERMISSION_DENIED"), status
