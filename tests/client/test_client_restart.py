"""KvdClient against a daemon that dies, restarts, or is not there yet: operations in flight fail (every block
listed, so the caller recomputes), nothing ever blocks the caller, and the client registers again by itself."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
import torch
from kvd_client import KvdClient, Unavailable
from kvd_client.types import session_label
from kvd_client.wire.kvd.v1 import kvd_pb2

from tests.conftest import DaemonFactory
from tests.helpers.clients import Completions, end_session
from tests.helpers.daemon import Daemon, wait_for
from tests.helpers.kvdata import BLOCK_DIM, CacheSpec, block_hash, fill, make_caches, mismatches

FAST = 0.05  # "fails fast": well under any RPC timeout, and far from the client's 5 s default


def make_client(daemon: Daemon, spec: CacheSpec, caches: dict[str, torch.Tensor], model_id: str) -> KvdClient:
    client = KvdClient(daemon.socket, model_id=model_id, worker_name=model_id, timeout_s=2.0)
    client.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
    return client


def assert_saves_work(client: KvdClient, spec: CacheSpec, caches: dict[str, torch.Tensor], salt: str) -> None:
    done = Completions(client)
    pairs = [(i, block_hash(i, salt)) for i in range(8)]
    fill(caches, spec, pairs)
    completion = done.wait(client.save(pairs))
    assert completion.ok, completion
    assert client.lookup([h for _, h in pairs]).result(5).hit_blocks == len(pairs)
    moved = [(spec.num_blocks - 1 - i, h) for i, h in pairs]
    completion = done.wait(client.load(moved))
    assert completion.ok, completion
    assert mismatches(caches, spec, moved) == []


def test_daemon_killed_mid_operation_then_restarted(daemon: Daemon, spec: CacheSpec) -> None:
    caches = make_caches(spec)
    client = make_client(daemon, spec, caches, "m-restart")
    with client:
        assert client.wait_ready(20)
        assert client.registrations == 1
        first_boot, first_session = client.boot_id, client.session_id
        assert first_boot == daemon.stats().boot_id
        done = Completions(client)
        stored = [(i, block_hash(i, "before")) for i in range(4)]
        fill(caches, spec, stored)
        assert done.wait(client.save(stored)).ok

        # Freeze the daemon so the next operations are certainly in flight (sent, never answered) when it dies.
        daemon.signal(signal.SIGSTOP)
        save_pairs = [(i, block_hash(i, "in-flight")) for i in range(8, 16)]
        load_pairs = [(20 + k, h) for k, (_, h) in enumerate(stored)]
        ops = {client.save(save_pairs): save_pairs, client.load(load_pairs): load_pairs}
        time.sleep(0.1)
        assert all(done.done(op) is None for op in ops)  # nothing can complete while the daemon is stopped
        daemon.kill()

        for op, pairs in ops.items():
            completion = done.wait(op, timeout=10)
            assert not completion.ok
            assert completion.failed_hashes == frozenset(h for _, h in pairs)  # every block: recompute them all
            assert completion.error
        assert not client.ready

        # While it is down, nothing blocks: lookups fail fast, saves complete as failed at once.
        start = time.monotonic()
        with pytest.raises(Unavailable):
            client.lookup([stored[0][1]]).result(timeout=5)
        op = client.save(stored)
        completion = done.wait(op, timeout=FAST)
        assert not completion.ok and completion.failed_hashes == frozenset(h for _, h in stored)
        assert time.monotonic() - start < 1.0

        daemon.start()
        wait_for(lambda: client.ready and client.registrations == 2, timeout=20, what="re-registration")
        assert client.boot_id == daemon.stats().boot_id != first_boot
        assert client.session_id != first_session
        assert session_label(client.session_id) in daemon.session_labels()
        # The pool died with the daemon: what was stored is gone, and saving works again.
        assert client.lookup([stored[0][1]]).result(5).hit_blocks == 0
        assert_saves_work(client, spec, caches, "after-restart")


def test_daemon_restarted_gracefully(daemon: Daemon, spec: CacheSpec) -> None:
    caches = make_caches(spec)
    client = make_client(daemon, spec, caches, "m-graceful")
    with client:
        assert client.wait_ready(20)
        first_boot = client.boot_id
        new_boot = daemon.restart()  # SIGTERM, wait for exit 0, start again
        wait_for(lambda: client.ready and client.boot_id == new_boot, timeout=20, what="re-registration")
        assert client.boot_id != first_boot
        assert client.registrations == 2
        assert_saves_work(client, spec, caches, "graceful")
        assert len(daemon.stats().sessions) == 1  # the old session did not come back as a ghost


def test_daemon_absent_at_start_then_appears(daemon_factory: DaemonFactory, spec: CacheSpec) -> None:
    daemon = daemon_factory(start=False)
    caches = make_caches(spec)
    client = make_client(daemon, spec, caches, "m-absent")
    with client:
        done = Completions(client)
        pairs = [(i, block_hash(i, "absent")) for i in range(4)]
        start = time.monotonic()
        future = client.lookup([h for _, h in pairs])
        assert future.done()
        with pytest.raises(Unavailable):
            future.result(timeout=0)
        for op in (client.save(pairs), client.load(pairs)):
            completion = done.wait(op, timeout=FAST)
            assert not completion.ok
            assert completion.failed_hashes == frozenset(h for _, h in pairs)
        assert time.monotonic() - start < 0.5
        time.sleep(0.3)  # let the client fail to connect a few times first
        assert client.registrations == 0

        daemon.start()
        assert client.wait_ready(20), "the client did not register once the daemon appeared"
        assert client.registrations == 1
        assert client.boot_id == daemon.stats().boot_id
        assert_saves_work(client, spec, caches, "appeared")


def test_session_lost_while_daemon_lives(daemon: Daemon, spec: CacheSpec) -> None:
    """The daemon forgets the session (an operator, a lease expiry): the client notices and registers anew."""
    caches = make_caches(spec)
    client = make_client(daemon, spec, caches, "m-lost")
    with client:
        assert client.wait_ready(20)
        old = end_session(daemon, client)
        wait_for(lambda: client.ready and client.session_id not in ("", old), timeout=20, what="re-registration")
        assert client.registrations == 2
        assert client.boot_id == daemon.stats().boot_id  # same daemon
        assert daemon.session_labels() == {session_label(client.session_id)}
        assert_saves_work(client, spec, caches, "lost")


def test_close_unregisters(daemon: Daemon, spec: CacheSpec) -> None:
    caches = make_caches(spec)
    client = make_client(daemon, spec, caches, "m-close")
    client.start()
    assert client.wait_ready(20)
    assert session_label(client.session_id) in daemon.session_labels()
    client.close()
    assert daemon.session_labels() == set()
    # After close, operations fail at once instead of hanging.
    done = Completions(client)
    completion = done.wait(client.save([(0, b"h")]), timeout=FAST)
    assert not completion.ok


def test_client_outlives_daemon_and_closes_cleanly(daemon: Daemon, spec: CacheSpec) -> None:
    caches = make_caches(spec)
    client = make_client(daemon, spec, caches, "m-gone")
    client.start()
    assert client.wait_ready(20)
    daemon.kill()
    wait_for(lambda: not client.ready, timeout=10, what="the client to notice")
    start = time.monotonic()
    client.close()  # must not hang on a daemon that is gone
    assert time.monotonic() - start < 5


def test_many_clients_reregister_after_restart(daemon: Daemon, spec: CacheSpec) -> None:
    clients = []
    for k in range(4):
        caches = make_caches(spec)
        clients.append((make_client(daemon, spec, caches, f"m-many{k}"), caches))
    for client, _ in clients:
        client.start()
    try:
        for client, _ in clients:
            assert client.wait_ready(20)
        daemon.restart(hard=True)
        boot = daemon.stats().boot_id
        for client, _ in clients:
            wait_for(lambda c=client: c.ready and c.boot_id == boot, timeout=20, what="re-registration")
        assert len(daemon.stats().sessions) == len(clients)
        for k, (client, caches) in enumerate(clients):
            assert_saves_work(client, spec, caches, f"many{k}")
    finally:
        for client, _ in clients:
            client.close()


def test_raw_stub_sees_unavailable_without_daemon(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(start=False)
    with pytest.raises(grpc.RpcError) as err:
        daemon.stub().Stats(kvd_pb2.StatsRequest(), timeout=0.5)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_memory_released_and_registered_again(daemon: Daemon, spec: CacheSpec) -> None:
    """vLLM's sleep mode: the daemon lets go of the worker's memory (its session then has none), lookups keep
    working, transfers fail into recomputation; registering the memory again makes everything work again."""
    caches = make_caches(spec)
    client = make_client(daemon, spec, caches, "m-sleep")
    with client:
        assert client.wait_ready(20)
        assert_saves_work(client, spec, caches, "awake")
        transports = lambda: {s.worker_name: s.transport for s in daemon.stats().sessions}  # noqa: E731
        assert transports()["m-sleep"] == "cpu"

        client.release_memory()
        wait_for(lambda: transports().get("m-sleep") == "none" and client.ready, 10, what="a lookup-only session")
        stored = [block_hash(i, "awake") for i in range(8)]
        assert client.lookup(stored).result(5).hit_blocks == 8
        done = Completions(client)
        assert not done.wait(client.load([(0, stored[0])])).ok  # no memory to load into

        client.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
        wait_for(lambda: transports().get("m-sleep") == "cpu" and client.ready, 10, what="memory registered again")
        assert_saves_work(client, spec, caches, "woken")
