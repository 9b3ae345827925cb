"""Completions through the session's completion queue (kvd_client.completions) against a real daemon: successful
saves and loads arrive there with their own tags and stages, failures keep their block lists on the Watch stream,
slots are reused without a record lost, a client without a queue still gets everything, and a daemon that dies
mid-operation leaves no operation hanging."""

from __future__ import annotations

import signal
import time

import torch
from kvd_client import KvdClient

from tests.conftest import DaemonFactory
from tests.helpers.clients import Completions
from tests.helpers.daemon import Daemon, wait_for
from tests.helpers.kvdata import BLOCK_DIM, CacheSpec, block_hash, fill, make_caches, mismatches


def make_client(daemon: Daemon, spec: CacheSpec, caches: dict[str, torch.Tensor], **kwargs: bool) -> KvdClient:
    client = KvdClient(daemon.socket, model_id="m-queue", timeout_s=2.0, **kwargs)
    client.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
    return client


def test_successes_come_through_the_queue_with_their_tags(daemon: Daemon, spec: CacheSpec) -> None:
    caches = make_caches(spec)
    with make_client(daemon, spec, caches) as client:
        assert client.wait_ready(20)
        assert client.delivery.has_queue
        done = Completions(client)
        pairs = [(i, block_hash(i, "queue")) for i in range(16)]
        fill(caches, spec, pairs)
        save = client.save(pairs)
        completion = done.wait(save)
        assert completion.ok and completion.op_id == save and completion.failed_hashes == frozenset()
        assert completion.nbytes == len(pairs) * spec.block_bytes
        stages = completion.stages
        assert stages is not None and stages.daemon.queued_ns <= stages.daemon.sent_ns <= stages.notice_ns
        # Read your writes: the record goes out after the store committed the blocks.
        assert client.lookup([h for _, h in pairs]).result(5).hit_blocks == len(pairs)
        moved = [(spec.num_blocks - 1 - i, h) for i, h in pairs]
        load = client.load(moved)
        completion = done.wait(load)
        assert completion.ok and completion.op_id == load
        assert mismatches(caches, spec, moved) == []
        assert client.delivery.taken == 2


def test_failures_keep_their_blocks_and_slots_are_reused(daemon_factory: DaemonFactory, spec: CacheSpec) -> None:
    daemon = daemon_factory(env={"KVD_COMPLETION_SLOTS": "8"})  # a few slots: every one is reused many times
    caches = make_caches(spec)
    with make_client(daemon, spec, caches) as client:
        assert client.wait_ready(20)
        done = Completions(client)
        stored = [(i, block_hash(i, "reuse")) for i in range(4)]
        fill(caches, spec, stored)
        assert done.wait(client.save(stored)).ok
        missing = [(10, block_hash(99, "never saved"))]
        for round_ in range(20):
            ops = [client.load([(20 + k, h)]) for k, (_, h) in enumerate(stored)]  # in flight together
            failing = client.load(missing)
            for op in ops:
                assert done.wait(op).ok, round_
            failed = done.wait(failing)
            assert not failed.ok and failed.failed_hashes == frozenset(h for _, h in missing) and failed.error
        assert client.delivery.taken == 1 + 20 * len(stored)


def test_without_a_queue_everything_comes_on_the_watch_stream(daemon_factory: DaemonFactory, spec: CacheSpec) -> None:
    for daemon, kwargs in (
        (daemon_factory(env={"KVD_COMPLETION_SLOTS": "0"}), {}),  # the daemon grants none
        (daemon_factory(), {"completion_queue": False}),  # the client asks for none
    ):
        caches = make_caches(spec)
        with make_client(daemon, spec, caches, **kwargs) as client:
            assert client.wait_ready(20)
            assert not client.delivery.has_queue
            done = Completions(client)
            pairs = [(i, block_hash(i, "watch")) for i in range(4)]
            fill(caches, spec, pairs)
            assert done.wait(client.save(pairs)).ok
            assert done.wait(client.load([(30 + k, h) for k, (_, h) in enumerate(pairs)])).ok
            assert client.delivery.taken == 0


def test_a_daemon_dying_mid_operation_completes_every_operation(daemon: Daemon, spec: CacheSpec) -> None:
    caches = make_caches(spec)
    with make_client(daemon, spec, caches) as client:
        assert client.wait_ready(20)
        assert client.delivery.has_queue
        done = Completions(client)
        pairs = [(i, block_hash(i, "dying")) for i in range(16)]
        fill(caches, spec, pairs)
        assert done.wait(client.save(pairs)).ok
        daemon.signal(signal.SIGSTOP)  # what is submitted now is certainly in flight when it dies
        ops = [client.save([(i, block_hash(i, f"in-flight{k}"))]) for k in range(8) for i in range(2)]
        ops += [client.load([(40 + k, h)]) for k, (_, h) in enumerate(pairs)]
        time.sleep(0.1)
        daemon.kill()
        for op in ops:
            assert not done.wait(op, timeout=10).ok  # failed, never hanging
        daemon.start()
        wait_for(lambda: client.ready and client.registrations == 2, timeout=20, what="re-registration")
        assert client.delivery.has_queue  # the new session got a new queue
        taken = client.delivery.taken
        fill(caches, spec, pairs)
        assert done.wait(client.save(pairs)).ok
        assert client.delivery.taken == taken + 1
