"""Attacks on the completion queue (docs/security.md): it is a capability of its session's own process only, the
worker gets it read-only and sealed, and the daemon never reads it: a worker that scribbles over all of it (header
included) or closes its wake pipe changes neither where nor what the daemon writes, and no other session notices."""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import threading

import pytest
import torch
from kvd_client import KvdClient
from kvd_client.completions import BODY, BODY_AT, HEADER, PAGE, SAVE, SLOT_BYTES, TAG, slot_at
from kvd_client.fdpass import GRANT_COMPLETION_WAKE, GRANT_COMPLETIONS, GRANT_QUEUE

from tests.helpers.clients import Completions
from tests.helpers.daemon import SERVING, Daemon
from tests.helpers.kvdata import BLOCK_DIM, CacheSpec, block_hash, fill, make_caches, mismatches
from tests.helpers.ring import grant, refusal_status
from tests.helpers.rpc import RawSession, lookup_only_request, transfer
from tests.security.conftest import CPU_SESSION_MODEL

NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION = 5, 7, 9


def test_a_queue_is_granted_only_with_the_key_to_a_memory_session(
    daemon: Daemon, cpu_session: tuple[RawSession, dict[str, torch.Tensor], CacheSpec]
) -> None:
    session = cpu_session[0]
    key = session.response.session_key
    assert refusal_status(daemon.socket, session.id, b"\0" * len(key), GRANT_QUEUE) == PERMISSION_DENIED
    assert refusal_status(daemon.socket, "no-such-session", key, GRANT_QUEUE) == NOT_FOUND
    lookup_only = daemon.stub().RegisterSession(lookup_only_request(daemon.socket, CPU_SESSION_MODEL, "fp"), timeout=5)
    assert refusal_status(daemon.socket, lookup_only.session_id, lookup_only.session_key, GRANT_QUEUE) == (
        FAILED_PRECONDITION
    )
    assert refusal_status(daemon.socket, session.id, key, GRANT_QUEUE) == 0


def test_the_queue_is_sealed_private_and_read_only(
    daemon: Daemon, cpu_session: tuple[RawSession, dict[str, torch.Tensor], CacheSpec]
) -> None:
    session = cpu_session[0]
    granted = grant(daemon.socket, session.id, session.response.session_key, GRANT_QUEUE)
    memfd, wake = granted.take(GRANT_COMPLETIONS), granted.take(GRANT_COMPLETION_WAKE)
    try:
        assert os.fstat(memfd).st_mode & 0o777 == 0o600
        seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(OSError):
            os.ftruncate(memfd, 0)
        with pytest.raises(PermissionError):  # the descriptor it got is read-only
            mmap.mmap(memfd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError):
            os.write(wake, b"x")  # the read end only
    finally:
        os.close(memfd)
        os.close(wake)


def _scribble(view: mmap.mmap, stop: threading.Event) -> None:
    """Garbage over every byte, the header first, until told to stop (a worker attacking its own queue)."""
    noise = os.urandom(len(view))
    while not stop.is_set():
        HEADER.pack_into(view, 0, b"GARBAGE!", 99, 7, 1)
        view[PAGE:] = noise[PAGE:]


def test_scribbling_over_the_queue_changes_nothing_the_daemon_does(
    daemon: Daemon, cpu_session: tuple[RawSession, dict[str, torch.Tensor], CacheSpec]
) -> None:
    session, caches, spec = cpu_session
    granted = grant(daemon.socket, session.id, session.response.session_key, GRANT_QUEUE)
    memfd, wake = granted.take(GRANT_COMPLETIONS), granted.take(GRANT_COMPLETION_WAKE)
    slots = HEADER.unpack_from(os.pread(memfd, HEADER.size, 0))[3]
    # The same file, writable: this test runs as the daemon's uid (a worker of another uid could not even do this).
    writable = os.open(f"/proc/self/fd/{memfd}", os.O_RDWR)
    view = mmap.mmap(writable, os.fstat(writable).st_size)
    os.close(writable)
    os.close(wake)  # and nobody reads the wake pipe any more: the daemon's writes to it fail, and it serves on
    stop = threading.Event()
    scribbler = threading.Thread(target=_scribble, args=(view, stop), daemon=True)
    other = KvdClient(daemon.socket, model_id="m-cq-other", timeout_s=2.0)
    other_caches = make_caches(spec)
    other.register_kv_caches(other_caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
    try:
        with other:
            assert other.wait_ready(20) and other.delivery.has_queue
            done = Completions(other)
            for round_ in range(10):
                # While garbage goes over the whole queue, another session's completions come through its own.
                stop.clear()
                scribbler = threading.Thread(target=_scribble, args=(view, stop), daemon=True)
                scribbler.start()
                other_pairs = [(i, block_hash(i, f"other{round_}")) for i in range(4)]
                fill(other_caches, spec, other_pairs)
                assert done.wait(other.save(other_pairs)).ok
                moved = [(40 + k, h) for k, (_, h) in enumerate(other_pairs)]
                assert done.wait(other.load(moved)).ok
                assert mismatches(other_caches, spec, moved) == []
                stop.set()
                scribbler.join()
                # The garbage stays; the daemon's next record still goes where its own geometry says, whole.
                pairs = [(i, block_hash(i, f"cq{round_}")) for i in range(8)]
                fill(caches, spec, pairs)
                tag = 1000 + round_
                assert session.stub.Save(transfer(session.response, pairs, tag), timeout=5).operation_id
                at = slot_at(tag, slots)
                _wait_for_tag(view, at, tag)
                kind, status, _, _, nbytes, *_ = BODY.unpack_from(view, at + BODY_AT)
                assert (kind, status, nbytes) == (SAVE, 1, len(pairs) * spec.block_bytes)
                assert session.lookup([h for _, h in pairs]) == len(pairs)
            assert other.delivery.taken == 20
    finally:
        stop.set()
        scribbler.join()
        view.close()
        os.close(memfd)
    assert daemon.health() == SERVING
    assert "Traceback" not in daemon.log_text()


def _wait_for_tag(view: mmap.mmap, at: int, tag: int) -> None:
    """Until the record of `tag` is in its slot (polled: the wake pipe was closed on purpose)."""
    for _ in range(1000):
        if TAG.unpack_from(view, at)[0] == tag:
            return
        select.select([], [], [], 0.01)
    raise TimeoutError(f"no record for tag {tag} at {at} (slot of {SLOT_BYTES} bytes)")
