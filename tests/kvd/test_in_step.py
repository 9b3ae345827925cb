"""In-step loads through a real daemon on the CPU path: layers arrive in order and each wait returns only once its
layer's bytes are in place; a missing block fails the load exactly; a daemon killed with SIGKILL in the middle of
one neither hangs the waiting worker nor leaves its unfinished blocks looking loaded."""

from __future__ import annotations

import signal
import time

import torch
from kvd_client import KvdClient
from kvd_client.progress import STATUS_FAILED, STATUS_OK

from tests.conftest import DaemonFactory
from tests.helpers.clients import Completions
from tests.helpers.daemon import MiB, wait_for
from tests.helpers.kvdata import BLOCK_DIM, CacheSpec, block_content, block_hash, fill, make_caches


def layer_ok(caches: dict[str, torch.Tensor], spec: CacheSpec, layer: int, pairs: list[tuple[int, bytes]]) -> bool:
    tensor = list(caches.values())[layer].view(torch.int16)
    return all(torch.equal(tensor[:, i], block_content(h, layer, spec)) for i, h in pairs)


def client_for(socket: object, spec: CacheSpec, caches: dict[str, torch.Tensor], model: str) -> KvdClient:
    client = KvdClient(socket, model_id=model, worker_name="in-step", timeout_s=2.0)  # type: ignore[arg-type]
    client.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
    client.start()
    assert client.wait_ready(20)
    wait_for(lambda: client.index.page is not None, 10, what="the progress page")
    return client


def test_layers_arrive_in_order_and_each_wait_means_its_bytes(daemon_factory: DaemonFactory) -> None:
    spec = CacheSpec(num_layers=8, num_blocks=64, kv_heads=4, head_dim=64)
    daemon = daemon_factory(capacity_bytes=64 * MiB, slab_bytes=1 * MiB)
    caches = make_caches(spec)
    client = client_for(daemon.socket, spec, caches, "in-step")
    try:
        done = Completions(client)
        saved = [(i, block_hash(i, "in-step")) for i in range(16)]
        fill(caches, spec, saved)
        assert done.wait(client.save(saved)).ok
        page = client.index.page
        assert page is not None
        for round_ in range(3):  # the entry is reused without a reset
            targets = [(40 + k, h) for k, (_, h) in enumerate(saved)]
            fill(caches, spec, [(i, block_hash(999, "junk")) for i, _ in targets])
            load = page.begin(layers=spec.num_layers)
            assert load is not None
            op = client.load(targets, in_step=load)
            for layer in range(spec.num_layers):
                assert page.wait(load, layer, timeout_s=10), f"round {round_} layer {layer}"
                assert layer_ok(caches, spec, layer, targets), f"round {round_}: layer {layer} not in place"
            assert page.finished(load) and page.status(load) == STATUS_OK
            assert done.wait(op).ok
            page.end(load)
    finally:
        client.close()


def test_a_missing_block_fails_exactly_that_block(daemon_factory: DaemonFactory) -> None:
    spec = CacheSpec(num_layers=4)
    daemon = daemon_factory(capacity_bytes=16 * MiB, slab_bytes=1 * MiB)
    caches = make_caches(spec)
    client = client_for(daemon.socket, spec, caches, "in-step-missing")
    try:
        done = Completions(client)
        saved = [(i, block_hash(i, "present")) for i in range(4)]
        fill(caches, spec, saved)
        assert done.wait(client.save(saved)).ok
        absent = block_hash(0, "absent")
        page = client.index.page
        assert page is not None
        load = page.begin(layers=spec.num_layers)
        assert load is not None
        op = client.load([(20, saved[0][1]), (21, absent), (22, saved[1][1])], in_step=load)
        assert not page.wait(load, spec.num_layers - 1, timeout_s=10)  # released, but the load failed
        assert page.finished(load) and page.status(load) == STATUS_FAILED
        completion = done.wait(op)
        assert not completion.ok and completion.failed_hashes == {absent}
        assert layer_ok(caches, spec, 0, [(20, saved[0][1]), (22, saved[1][1])])
    finally:
        client.close()


def test_a_daemon_killed_mid_load_releases_the_waits_and_fails_the_load(daemon_factory: DaemonFactory) -> None:
    # 32 layers of 64 KiB per block, 96 blocks: 192 MiB, copied layer by layer in one thread (tens of ms).
    spec = CacheSpec(num_layers=32, num_blocks=200, kv_heads=8, head_dim=128)
    daemon = daemon_factory(capacity_bytes=256 * MiB, slab_bytes=4 * MiB, lease_ms=2000)
    caches = make_caches(spec)
    client = client_for(daemon.socket, spec, caches, "in-step-kill")
    try:
        done = Completions(client)
        saved = [(i, block_hash(i, "kill")) for i in range(96)]
        fill(caches, spec, saved[:1])
        assert done.wait(client.save(saved), timeout=60).ok
        page = client.index.page
        assert page is not None
        load = page.begin(layers=spec.num_layers)
        assert load is not None
        op = client.load([(100 + k, h) for k, (_, h) in enumerate(saved)], in_step=load)
        wait_for(lambda: page.ready(load, 1), 30, interval=0.0005, what="two layers in place")
        daemon.signal(signal.SIGKILL)
        killed_mid_load = not page.finished(load)
        start = time.monotonic()
        assert not page.wait(load, spec.num_layers - 1, timeout_s=30), "a wait outlived the daemon"
        assert time.monotonic() - start < 5 and page.daemon_gone
        page.release(load)  # what the connector does for every unfinished in-step load
        assert page.finished(load) and page.status(load) == STATUS_FAILED
        completion = done.wait(op, timeout=30)
        assert not completion.ok and len(completion.failed_hashes) == len(saved), "unfinished blocks looked loaded"
        assert killed_mid_load, "the load finished before the kill: the test proved nothing (make it bigger)"
    finally:
        client.close()
