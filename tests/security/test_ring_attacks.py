"""Attacks on the submission ring (docs/security.md): it is a capability of its session's own process only, and a
client that writes garbage into its ring, lies with the doorbell's count, or races the daemon's reads only gets its
own records refused; the daemon never reads past the mapping, never trusts a length, and serves on."""

from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kvd_client.ring import LOAD, SAVE

from kvd.service.sessions import MAX_QUEUED_REFUSALS
from tests.helpers.daemon import SERVING, Daemon, child_env, wait_for
from tests.helpers.kvdata import CacheSpec, block_hash, fill, make_caches, mismatches
from tests.helpers.ring import RawRing, refusal_status
from tests.helpers.rpc import RawSession, Watcher, cpu_register_request, lookup_only_request
from tests.security.conftest import CPU_SESSION_MODEL
from tests.security.kit import NOBODY, requires_root

INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION = 3, 5, 7, 9


@pytest.fixture
def ring(daemon: Daemon, cpu_session: tuple[RawSession, dict[str, torch.Tensor], CacheSpec]) -> Iterator[RawRing]:
    session = cpu_session[0]
    raw = RawRing.of(daemon.socket, session.id, session.response.session_key)
    yield raw
    raw.close()


def test_a_ring_is_granted_only_with_the_key_to_the_sessions_own_process(
    daemon: Daemon, cpu_session: tuple[RawSession, dict[str, torch.Tensor], CacheSpec]
) -> None:
    session = cpu_session[0]
    key = session.response.session_key
    assert refusal_status(daemon.socket, session.id, b"\0" * len(key)) == PERMISSION_DENIED
    assert refusal_status(daemon.socket, session.id, b"") == PERMISSION_DENIED
    assert refusal_status(daemon.socket, "no-such-session", key) == NOT_FOUND
    # Another process holding the stolen id and key: not the session's process.
    script = (
        "import json, sys; from pathlib import Path; from tests.helpers.ring import refusal_status;"
        "a = json.loads(sys.stdin.read()); print(refusal_status(Path(a[0]), a[1], bytes.fromhex(a[2])))"
    )
    thief = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([str(daemon.socket), session.id, key.hex()]),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert thief.stdout.strip() == str(PERMISSION_DENIED), thief.stderr[-2000:]
    lookup_only = daemon.stub().RegisterSession(lookup_only_request(daemon.socket, CPU_SESSION_MODEL, "fp"), timeout=5)
    assert refusal_status(daemon.socket, lookup_only.session_id, lookup_only.session_key) == FAILED_PRECONDITION
    assert refusal_status(daemon.socket, session.id, key) == 0  # its own process, its key
    assert daemon.stats().ring_records == 0  # none of that submitted anything


def test_the_ring_is_sealed_and_private(ring: RawRing) -> None:
    assert os.fstat(ring.memfd).st_mode & 0o777 == 0o600
    size = os.fstat(ring.memfd).st_size
    for bad in (size // 2, size * 2):
        with pytest.raises(PermissionError):
            os.ftruncate(ring.memfd, bad)  # the daemon's mapping can never be cut short under its reads
    seals = fcntl.fcntl(ring.memfd, fcntl.F_GET_SEALS)
    assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) == (
        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    )


@requires_root
def test_another_uid_cannot_open_a_ring_it_was_not_given(ring: RawRing) -> None:
    path = f"/proc/{os.getpid()}/fd/{ring.memfd}"
    child = os.fork()
    if child == 0:  # only system calls until _exit: this process has gRPC's threads
        code = 1
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            os.close(os.open(path, os.O_RDWR))
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 13  # EACCES: neither the ring nor its descriptor is theirs


def _refused(session: RawSession, tag: int) -> int:
    notice = session.watcher.wait_tag(tag)
    assert not notice.ok and notice.operation_id == 0
    return int(notice.refused_status)


def _serving_after(
    daemon: Daemon, ring: RawRing, session: RawSession, caches: dict[str, torch.Tensor], spec: CacheSpec
) -> None:
    """The daemon answers, and a correct record on the same ring still saves and loads exact bytes."""
    assert daemon.health() == SERVING
    pairs = [(i, block_hash(i, f"after{ring.head}")) for i in range(4)]
    fill(caches, spec, pairs)
    ring.write(SAVE, 9001, pairs)
    ring.ring()
    assert session.watcher.wait_tag(9001).ok
    moved = [(40 + i, h) for i, h in pairs]
    ring.write(LOAD, 9002, moved)
    ring.ring()
    assert session.watcher.wait_tag(9002).ok
    assert mismatches(caches, spec, moved) == []


def test_scribbled_records_are_refused_one_by_one(
    daemon: Daemon, cpu_session: tuple[RawSession, dict[str, torch.Tensor], CacheSpec], ring: RawRing
) -> None:
    session, caches, spec = cpu_session
    rng = random.Random(18)
    for seq in range(ring.slots):
        ring.scribble(seq, rng.randbytes(ring.slot_bytes))
    ring.head = ring.slots
    for seq in range(ring.slots):  # garbage is not the record its slot should hold: each read ends at the first
        ring.ring(ring.slots - seq)
        wait_for(lambda seq=seq: ring.tail == seq + 1, 10, what=f"slot {seq} taken")
    wait_for(lambda: daemon.stats().ring_refused == ring.slots, 10, what="every record refused")
    _serving_after(daemon, ring, session, caches, spec)


def test_huge_counts_and_lengths_are_bounded(
    daemon: Daemon, cpu_session: tuple[RawSession, dict[str, torch.Tensor], CacheSpec], ring: RawRing
) -> None:
    session, caches, spec = cpu_session
    pairs = [(1, block_hash(1, "huge"))]
    lies: list[dict[str, object]] = [
        {"count": 0xFFFFFFFF},
        {"count": 10_000},
        {"count": 0},
        {"hash_len": 255},
        {"hash_len": 0},
        {"event_len": 0xFFFF},
        {"magic": b"XXXX"},
        {"record_seq": 10**9},
    ]
    for tag, lie in enumerate(lies, start=1):
        ring.write(SAVE, tag, pairs, **lie)  # type: ignore[arg-type]
        ring.ring()
        assert _refused(session, tag) == INVALID_ARGUMENT, lie
    ring.write(7, 50, pairs)  # a kind that does not exist
    ring.ring()
    assert _refused(session, 50) == INVALID_ARGUMENT
    # The doorbell's count is the client's word too: past what was written, one slot of no record ends the read.
    before, refused = ring.tail, daemon.stats().ring_refused
    ring.ring(65536)  # a pipe's worth
    wait_for(lambda: ring.tail > before, 10, what="the lie read")
    time.sleep(0.2)
    assert ring.tail == before + 1 and daemon.stats().ring_refused == refused + 1
    ring.head = ring.tail
    _serving_after(daemon, ring, session, caches, spec)


def _ring_for_the_lost(daemon: Daemon, ring: RawRing) -> bool:
    """Ring once for each published record whose doorbell byte the daemon dropped, and never more: a record whose
    sequence number was scribbled ends the daemon's read and drops what else the doorbell holds, so those records wait
    for more doorbells; an extra byte would make the daemon take a slot of no record (refused, its sequence number
    spent), so that the tail could never meet the head. Exact only once the daemon holds no byte unhandled: none
    unread in the pipe, and none read but not yet handled. The second is proven by a Stats answer after the first:
    the doorbell is read and handled in one callback on the daemon's event loop, which also answers Stats, and
    nothing rings meanwhile (this thread is the only one that rings). False, for wait_for: look again."""
    if ring.unread():
        return False  # the daemon has yet to read these; the records they count are not lost
    daemon.stats()
    lost = ring.head - ring.tail
    if lost > 0:
        ring.ring(lost)
    return False


def test_a_writer_racing_the_reader_hurts_only_itself(
    daemon: Daemon, cpu_session: tuple[RawSession, dict[str, torch.Tensor], CacheSpec], ring: RawRing
) -> None:
    session, caches, spec = cpu_session
    stop = threading.Event()

    def scribble() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            seq = rng.randrange(ring.slots)
            at = rng.randrange(ring.slot_bytes - 8)
            ring.scribble(seq, b"\0" * at + rng.randbytes(8))  # flip a word somewhere in a slot

    pairs = [(i, block_hash(i, "race")) for i in range(8)]
    fill(caches, spec, pairs)
    racer = threading.Thread(target=scribble, daemon=True)
    racer.start()
    records = 300
    try:
        for tag in range(1, records + 1):
            wait_for(lambda: ring.head - ring.tail < ring.slots or _ring_for_the_lost(daemon, ring), 10, what="a slot")
            ring.write(SAVE if tag % 2 else LOAD, tag, pairs if tag % 2 else [(32 + i, h) for i, h in pairs])
            ring.ring()
    finally:
        stop.set()
        racer.join()
    # Ringing for what is left catches up; every record is then taken and answered (done, or refused: its tag may be
    # scribbled too), and the daemon is unharmed.
    wait_for(lambda: ring.tail == ring.head == records or _ring_for_the_lost(daemon, ring), 10, what="every record")
    assert daemon.stats().ring_records == records
    _serving_after(daemon, ring, session, caches, spec)


def test_a_ring_outlived_by_its_session_reaches_nothing(
    daemon: Daemon, cpu_session: tuple[RawSession, dict[str, torch.Tensor], CacheSpec], ring: RawRing
) -> None:
    session = cpu_session[0]
    session.close()  # unregistered: the daemon dropped its end of the ring
    ring.write(SAVE, 1, [(1, block_hash(1, "late"))])
    with pytest.raises(BrokenPipeError):
        ring.ring()  # nobody reads the doorbell any more
    time.sleep(0.3)
    stats = daemon.stats()
    assert stats.ring_records == 0 and not stats.sessions
    assert daemon.health() == SERVING
    assert Path(f"/proc/{daemon.pid}/maps").read_text().count("kvd-ring") == 0
    assert refusal_status(daemon.socket, session.id, session.response.session_key) == NOT_FOUND


def test_refusals_a_client_never_reads_cost_the_daemon_a_bounded_queue(daemon: Daemon) -> None:
    """A client that floods its ring with malformed records and never reads its Watch stream: every record is
    refused and counted, but at most MAX_QUEUED_REFUSALS notices (of no block list each) wait for it."""
    spec = CacheSpec()
    caches = make_caches(spec)
    stub = daemon.stub()
    response = stub.RegisterSession(cpu_register_request(daemon.socket, spec, caches, "m-flood"), timeout=5)
    ring = RawRing.of(daemon.socket, response.session_id, response.session_key)
    pairs = [(1, block_hash(1, "flood"))]
    total = MAX_QUEUED_REFUSALS + 100
    try:
        while ring.head < total:
            batch = min(ring.slots, total - ring.head)
            for _ in range(batch):
                ring.write(7, ring.head + 1, pairs)  # published in sequence, but of a kind that does not exist
            ring.ring(batch)
            wait_for(lambda: ring.tail == ring.head, 10, what="the batch taken")
        assert daemon.stats().ring_refused == total
        watcher = Watcher(stub, response)
        try:
            wait_for(lambda: len(watcher._by_tag) >= MAX_QUEUED_REFUSALS, 20, what="the queued refusals")
            time.sleep(0.3)
            assert len(watcher._by_tag) == MAX_QUEUED_REFUSALS
        finally:
            watcher.close()
        assert daemon.health() == SERVING
    finally:
        ring.close()


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_the_doorbell_gives_its_worker_nothing_over_the_daemons_reads(
    daemon: Daemon, cpu_session: tuple[RawSession, dict[str, torch.Tensor], CacheSpec], ring: RawRing
) -> None:
    """The worker holds the doorbell's write end only: it cannot drain what the daemon reads, and the flags it sets
    are its own end's (an eventfd's would be the daemon's too: a blocking read on the event loop). Hanging it up
    leaves the daemon idle, and the session serving by RPC."""
    session, caches, spec = cpu_session
    with pytest.raises(OSError):
        os.read(ring.doorbell, 1)
    fcntl.fcntl(ring.doorbell, fcntl.F_SETFL, fcntl.fcntl(ring.doorbell, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    _serving_after(daemon, ring, session, caches, spec)
    os.close(ring.doorbell)
    ring.doorbell = -1
    before = _cpu_ticks(daemon.pid)
    time.sleep(0.5)
    assert _cpu_ticks(daemon.pid) - before < 25  # a daemon spinning on the hung-up pipe would burn ~50 ticks
    pairs = [(50, block_hash(50, "hung-up"))]
    fill(caches, spec, pairs)
    assert session.save(pairs).ok
