"""In-step loads into a GPU cache through a real daemon: the worker's current stream waits on each layer's progress
counter (never the host, never another stream), and what the stream reads after the last wait is the stored bytes;
a missing block fails exactly that block. Needs a CUDA GPU (run on the device); skipped elsewhere."""

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


@pytest.fixture(scope="module")
def daemon():
    with Daemon(capacity_bytes=256 * MiB, slab_bytes=4 * MiB, lease_ms=5000) as d:
        yield d


def test_the_stream_waits_per_layer_and_reads_the_loaded_bytes(daemon: Daemon) -> None:
    caches, _backing = make_gpu_caches(offset_elements=4096)
    client = KvdClient(daemon.socket, model_id="cuda-in-step")
    client.register_kv_caches(caches, block_dim=1, block_size_tokens=SPEC.block_size)
    client.start()
    try:
        assert client.wait_ready(30)
        page = wait_for(lambda: client.index.page, 10, what="the progress page")
        waits = StreamProgress(page, current_stream)
        done = Completions(client)
        saved = [(i, block_hash(i, "cuda-in-step")) for i in range(32)]
        write_blocks(caches, saved)
        torch.cuda.synchronize()
        assert done.wait(client.save(saved), timeout=60).ok
        stream_before = torch.cuda.current_stream()
        targets = [(100 + k, h) for k, (_, h) in enumerate(saved)]
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
            assert torch.equal(copies[layer], tensor[:, 100:132]), f"layer {layer} was read before it was loaded"
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
        torch.cuda.synchronize()
        waits.close()
    finally:
        client.close()
