"""In-step loads into a GPU cache through a real daemon: the worker's current stream waits on each layer's progress
counter (never the host, never another stream), and what the stream reads after the last wait is the stored bytes;
a missing block fails exactly that block. The daemon copies layer by layer and its stream stores each layer's counter
right after that layer's bytes: a large load releases layer 0 while later layers are still being copied, and what
the stream reads right after each layer's wait is already that layer's stored bytes. Needs a CUDA GPU (run on the
device); skipped elsewhere."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from kvd_client import KvdClient  # noqa: E402
from kvd_client.cuda import current_stream  # noqa: E402
from kvd_client.cuda_progress import StreamProgress  # noqa: E402
from kvd_client.progress import STATUS_FAILED, STATUS_OK  # noqa: E402

from tests.helpers.clients import Completions  # noqa: E402
from tests.helpers.daemon import Daemon, wait_for  # noqa: E402
from tests.helpers.kvdata import block_hash  # noqa: E402
from tests.kvd.cuda_common import SPEC, make_gpu_caches, mismatched_blocks, write_blocks  # noqa: E402

MiB = 1 << 20


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality: the blocks hold random bits, so some bf16 values are NaN, and torch.equal (NaN != NaN)
    calls identical tensors different: a check for equal bytes would always fail, one for different bytes never."""
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def warm_up_kernels(tensors: list[torch.Tensor], region: slice) -> None:
    """Launch once, before any stream wait is queued, the kernels the test queues after its waits. With CUDA's lazy
    module loading (the default), a kernel's first launch may wait for the whole context to go idle, the queued
    waits included: the launch would then stall until the load has ended, and no overlap could be seen."""
    for tensor in tensors:
        tensor[:, region].clone()
    torch.cuda.synchronize()


@pytest.fixture(scope="module")
def daemon():
    with Daemon(capacity_bytes=256 * MiB, slab_bytes=4 * MiB, lease_ms=5000) as d:
        yield d


def test_the_stream_waits_per_layer_and_reads_the_loaded_bytes(gpu_worker) -> None:
    client, caches, page, waits = gpu_worker
    saved = _save(client, caches, "cuda-in-step", 32)
    done = Completions(client)
    stream_before = torch.cuda.current_stream()
    targets = [(100 + k, h) for k, (_, h) in enumerate(saved)]
    warm_up_kernels(list(caches.values()), slice(100, 132))
    for tensor in caches.values():
        tensor[:, 100:132].zero_()  # queued on the current stream: the load's ready event comes after it
    load = page.begin(layers=SPEC.num_layers)
    assert load is not None
    op = client.load(targets, in_step=load)
    copies = []
    for layer, tensor in enumerate(caches.values()):
        waits.wait(load, layer)  # this layer's attention would read the blocks now
        copies.append(tensor[:, 100:132].clone())  # queued after the wait
    assert torch.cuda.current_stream() == stream_before, "kvd changed the current stream"
    torch.cuda.synchronize()
    assert page.finished(load) and page.status(load) == STATUS_OK
    for layer, tensor in enumerate(caches.values()):
        assert same_bytes(copies[layer], tensor[:, 100:132]), f"layer {layer} was read before it was loaded"
    assert mismatched_blocks(caches, targets) == []
    assert done.wait(op, timeout=30).ok
    page.end(load)

    absent = block_hash(999, "cuda-in-step")
    load = page.begin(layers=SPEC.num_layers)
    assert load is not None
    op = client.load([(140, saved[0][1]), (141, absent)], in_step=load)
    for layer in range(SPEC.num_layers):
        waits.wait(load, layer)
    deadline = time.monotonic() + 30
    while not page.finished(load) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert page.status(load) == STATUS_FAILED
    completion = done.wait(op, timeout=30)
    assert not completion.ok and completion.failed_hashes == {absent}


BIG = 128  # blocks of the large load: 8 MiB per layer, so layer 0 is in place well before the last one


@pytest.fixture
def gpu_worker(daemon: Daemon):
    """A registered client on zeroed GPU caches, its progress page and the page's stream waits."""
    caches, _backing = make_gpu_caches(offset_elements=4096)
    client = KvdClient(daemon.socket, model_id="cuda-in-step-layers")
    client.register_kv_caches(caches, block_dim=1, block_size_tokens=SPEC.block_size)
    client.start()
    try:
        assert client.wait_ready(30)
        page = wait_for(lambda: client.index.page, 10, what="the progress page")
        waits = StreamProgress(page, current_stream)
        yield client, caches, page, waits
        torch.cuda.synchronize()
        waits.close()
    finally:
        client.close()


def _save(client: KvdClient, caches: dict, tag: str, count: int) -> list[tuple[int, bytes]]:
    saved = [(i, block_hash(i, tag)) for i in range(count)]
    write_blocks(caches, saved)
    torch.cuda.synchronize()
    assert Completions(client).wait(client.save(saved), timeout=60).ok
    return saved


def test_layer_0_is_released_with_its_bytes_while_later_layers_are_still_copied(gpu_worker) -> None:
    client, caches, page, waits = gpu_worker
    saved = _save(client, caches, "cuda-in-step-big", BIG)
    targets = [(BIG + k, h) for k, (_, h) in enumerate(saved)]
    region = slice(BIG, 2 * BIG)
    tensors = list(caches.values())
    warm_up_kernels(tensors, region)
    for tensor in tensors:
        tensor[:, region].zero_()
    load = page.begin(layers=SPEC.num_layers)
    assert load is not None
    op = client.load(targets, in_step=load)
    early: list[torch.Tensor] = []
    last_at_layer_0 = None
    for layer, tensor in enumerate(tensors):
        waits.wait(load, layer)
        early.append(tensor[:, region].clone())  # this layer's attention reads it now: it must be in place
        if layer == 0:
            last_at_layer_0 = tensors[-1][:, region].clone()  # the last layer, as it is when layer 0 is released
    torch.cuda.synchronize()
    assert page.finished(load) and page.status(load) == STATUS_OK
    assert mismatched_blocks(caches, targets) == []
    for layer, tensor in enumerate(tensors):
        assert same_bytes(early[layer], tensor[:, region]), f"layer {layer} was released before its bytes"
    assert last_at_layer_0 is not None
    assert not same_bytes(last_at_layer_0, tensors[-1][:, region]), (
        "the last layer was already in place when layer 0 was released: the load is not layer by layer"
    )
    assert Completions(client).wait(op, timeout=30).ok
    page.end(load)


def test_a_missing_later_block_fails_alone_and_every_counter_is_stored(gpu_worker) -> None:
    client, caches, page, waits = gpu_worker
    saved = _save(client, caches, "cuda-in-step-gap", 64)
    absent = block_hash(10_000, "cuda-in-step-gap")
    present = [(100 + k, h) for k, (_, h) in enumerate(saved)]
    for tensor in caches.values():
        tensor[:, 100:165].zero_()
    load = page.begin(layers=SPEC.num_layers)
    assert load is not None
    op = client.load([*present, (164, absent)], in_step=load)
    for layer in range(SPEC.num_layers):
        waits.wait(load, layer)  # none of these may hang: the final counter satisfies every one
    torch.cuda.synchronize()
    wait_for(lambda: page.finished(load), 30, what="the load's final counter")
    assert page.counter(load) == load.final
    assert page.status(load) == STATUS_FAILED
    completion = Completions(client).wait(op, timeout=30)
    assert not completion.ok and completion.failed_hashes == {absent}
    assert mismatched_blocks(caches, present) == [], "the blocks that were stored must be loaded anyway"
    for tensor in caches.values():
        assert not tensor[:, 164].any(), "the missing block's place was written"
    page.end(load)
