"""The GPU path: CUDA IPC transport, the per-GPU engine, stream safety and ordering. Needs a CUDA GPU (run on the
device); skipped elsewhere."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from kvd_client import Completion, KvdClient, OperationStages  # noqa: E402

from tests.helpers.daemon import REPO_ROOT, Daemon, child_env  # noqa: E402
from tests.helpers.kvdata import block_content, block_hash  # noqa: E402
from tests.kvd.cuda_common import (  # noqa: E402
    SPEC,
    make_gpu_caches,
    make_vmm_caches,
    mismatched_blocks,
    write_blocks,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def daemon():
    with Daemon(
        capacity_bytes=256 * MiB,
        slab_bytes=4 * MiB,
        lease_ms=5000,
        env={"KVD_TRANSPORTS__CUDA_CHUNK_BYTES": str(8 * MiB), "KVD_TRANSPORTS__CUDA_STAGING_BYTES": str(64 * MiB)},
    ) as d:
        yield d


def _client(daemon: Daemon, caches, model_id: str, ring: bool = True) -> KvdClient:
    client = KvdClient(daemon.socket, model_id=model_id, submission_ring=ring)
    client.register_kv_caches(caches, block_dim=1, block_size_tokens=SPEC.block_size)
    client.start()
    assert client.wait_ready(30), daemon.log_text()
    return client


def _wait(client: KvdClient, op: int, timeout: float = 30.0) -> Completion:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in client.poll_finished():
            if c.op_id == op:
                return c
        time.sleep(0.0002)
    raise TimeoutError(f"operation {op} did not finish")


def _worker(daemon: Daemon, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kvd.cuda_worker", str(daemon.socket), *args],
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"worker printed no result (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "rpc"])
def test_save_in_one_process_load_in_another_bytes_identical(daemon: Daemon, ring: bool) -> None:
    """Saved through the submission ring (or by Save RPC), loaded in another process (through its ring)."""
    caches, _backing = make_gpu_caches(offset_elements=1000)  # layer 0 starts 2000 bytes into the allocation
    client = _client(daemon, caches, "cuda-test", ring)
    tag = "xproc-ring" if ring else "xproc-rpc"
    try:
        assert client.submissions.has_ring is ring
        pairs = [(i, block_hash(i, tag)) for i in range(40)]
        write_blocks(caches, pairs)
        done = _wait(client, client.save(pairs))
        assert done.ok, done.error
        assert done.nbytes == 40 * SPEC.block_bytes
        assert (client.submissions.ring_count, client.submissions.rpc_count) == ((1, 0) if ring else (0, 1))
        assert done.stages is not None
        # Every stage stamped, the engine's and its waiter's too; through the ring there is no hop to the loop.
        path = [done.stages.stamp(name) for name in OperationStages.ORDER if not (ring and name == "loop")]
        assert all(path) and path == sorted(path), done.stages
        assert client.lookup([h for _, h in pairs]).result(10).hit_blocks == 40
    finally:
        client.close()
    result = _worker(daemon, "load", "100", "40", tag)
    assert result == {"ok": True, "hit": 40, "bad": 0, "untouched_nonzero": 0, "error": ""}, result


class _StreamGuard:
    """vLLM keeps its own current stream in a module global, updated by a patched torch.cuda.set_stream. kvd must
    never call set_stream nor create a stream in the worker: either would fail here."""

    def __init__(self) -> None:
        self.violations: list[str] = []

    def __enter__(self) -> _StreamGuard:
        self._set_stream = torch.cuda.set_stream
        self._own_init = "__init__" in torch.cuda.Stream.__dict__
        self._stream_init = torch.cuda.Stream.__init__
        guard = self

        def set_stream(stream):  # type: ignore[no-untyped-def]
            guard.violations.append(f"torch.cuda.set_stream({stream})")
            raise AssertionError("kvd called torch.cuda.set_stream in the worker")

        def stream_init(self_, *args, **kwargs):  # type: ignore[no-untyped-def]
            # torch.cuda.current_stream() wraps the existing stream (stream_id given); only a *new* stream fails.
            if "stream_id" not in kwargs:
                guard.violations.append("torch.cuda.Stream() created")
                raise AssertionError("kvd created a CUDA stream in the worker")
            # Chain to what Stream() would run anyway; object.__init__ would reject the arguments __new__ took.
            if guard._stream_init is not object.__init__:
                guard._stream_init(self_, *args, **kwargs)

        torch.cuda.set_stream = set_stream
        torch.cuda.Stream.__init__ = stream_init
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_stream = self._set_stream
        if self._own_init:
            torch.cuda.Stream.__init__ = self._stream_init
        else:
            del torch.cuda.Stream.__init__  # back to the inherited one


@pytest.mark.parametrize("kind", ["malloc", "cumem"])
def test_stream_safety_and_ordering_under_a_model_like_loop(daemon: Daemon, kind: str) -> None:
    """A slow kernel on the model stream writes blocks right before each save: the saved bytes must be the kernel's
    output. A load into blocks the model stream is still writing must land after that write, and a read on the
    model stream right after the load must see the loaded bytes. The model thread's stream never changes. Both in
    cudaMalloc memory (CUDA IPC) and in cuMemCreate'd memory (passed by descriptor)."""
    caches, _backing = make_gpu_caches(offset_elements=512) if kind == "malloc" else make_vmm_caches(512)
    client = _client(daemon, caches, f"cuda-order-{kind}")
    rng = random.Random(7)
    model_stream = torch.cuda.current_stream()
    before = (model_stream.cuda_stream, torch.cuda.current_device())
    half = SPEC.num_blocks // 2
    try:
        with _StreamGuard() as guard:
            for it in range(12):
                # Chained hashes with a shared prefix: later iterations re-save the first blocks (deduplicated).
                n = rng.randint(4, 24)
                hashes = [block_hash(i, "prefix" if i < 3 else f"it{it}") for i in range(n)]
                src = rng.sample(range(half), n)
                dst = rng.sample(range(half, SPEC.num_blocks), n)
                contents = {
                    h: [block_content(h, layer, SPEC).cuda() for layer in range(SPEC.num_layers)] for h in hashes
                }
                torch.cuda.synchronize()
                torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time before the writes
                for i, h in zip(src, hashes, strict=True):
                    for layer, tensor in enumerate(caches.values()):
                        tensor.view(torch.int16)[:, i].copy_(contents[h][layer])
                saved = _wait(client, client.save(list(zip(src, hashes, strict=True))))
                assert saved.ok, saved.error
                # The model stream is still busy writing garbage into the destination blocks when the load is issued.
                torch.cuda._sleep(20_000_000)
                for tensor in caches.values():
                    tensor.view(torch.int16)[:, dst] = -1
                pairs = list(zip(dst, hashes, strict=True))
                loaded = _wait(client, client.load(pairs))
                assert loaded.ok, loaded.error
                client.wait_loaded(loaded)
                # Read on the model stream right away.
                got = [caches[name].view(torch.int16)[:, dst].clone() for name in caches]
                for layer, block in enumerate(got):
                    for k, h in enumerate(hashes):
                        assert torch.equal(block[:, k].cpu(), contents[h][layer].cpu()), (it, layer, k)
                assert (torch.cuda.current_stream().cuda_stream, torch.cuda.current_device()) == before
        assert guard.violations == []
    finally:
        client.close()


def test_load_of_missing_blocks_reports_exactly_those(daemon: Daemon) -> None:
    caches, _backing = make_gpu_caches(offset_elements=0)
    client = _client(daemon, caches, "cuda-missing")
    try:
        stored = [(i, block_hash(i, "stored")) for i in range(4)]
        write_blocks(caches, stored)
        assert _wait(client, client.save(stored)).ok
        missing = block_hash(99, "never-saved")
        pairs = [(10, stored[0][1]), (11, missing), (12, stored[2][1])]
        done = _wait(client, client.load(pairs))
        assert not done.ok
        assert done.failed_hashes == frozenset({missing})
        client.wait_loaded(done)
        assert mismatched_blocks(caches, [(10, stored[0][1]), (12, stored[2][1])]) == []
    finally:
        client.close()


EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def _mapped_ranges(daemon: Daemon) -> int:
    """How many driver-mapped ranges the daemon holds, from its last log line about them (-1: none yet)."""
    counts = re.findall(r"(\d+) ranges mapped", daemon.log_text())
    return int(counts[-1]) if counts else -1


@pytest.mark.parametrize("kind", ["expandable", "cumem"])
def test_driver_mapped_memory_saves_and_loads_across_processes(daemon: Daemon, kind: str) -> None:
    """Save from a worker whose KV cache is driver-mapped memory (PyTorch's expandable segments, or cuMemCreate'd
    allocations a layer spans two of, as vLLM's extensible KV cache makes them), load in another such worker and
    in a cudaMalloc one: byte-identical everywhere. Once they exit, the daemon maps none of their memory."""
    env = EXPANDABLE if kind == "expandable" else None
    memory = "malloc" if kind == "expandable" else "cumem"
    salt = f"vmm-{kind}"
    saved = _worker(daemon, "save", memory, "40", salt, env=env)
    assert saved == {"ok": True, "driver_mapped": True, "error": ""}, saved
    expected = {"ok": True, "hit": 40, "bad": 0, "untouched_nonzero": 0, "error": ""}
    assert _worker(daemon, "load", "100", "40", salt, memory, env=env) == expected
    assert _worker(daemon, "load", "60", "40", salt) == expected  # into cudaMalloc memory, by CUDA IPC
    assert "mapped" in daemon.log_text()
    deadline = time.monotonic() + 10
    while _mapped_ranges(daemon) != 0:
        assert time.monotonic() < deadline, "the daemon still maps a finished worker's memory"
        time.sleep(0.05)


def _ready_worker(*args: str) -> subprocess.Popen[str]:
    """A Python worker process started with `args`, once it printed "ready"."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=child_env(), stdout=subprocess.PIPE, text=True)
    if proc.stdout is None or proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise AssertionError(f"the worker did not get ready (rc {proc.wait(10)})")
    return proc


def test_worker_exit_leaves_no_mapping(daemon: Daemon) -> None:
    """A worker holding 1 GiB of cuMemCreate'd KV memory is killed: once its session is freed the GPU has that
    memory back. Had the daemon kept its mapping, the physical memory would stay allocated."""
    free_before = torch.cuda.mem_get_info()[0]
    proc = _ready_worker("-m", "tests.kvd.cuda_worker", str(daemon.socket), "hold", "cumem", "1024")
    try:
        assert _mapped_ranges(daemon) >= 1
        assert free_before - torch.cuda.mem_get_info()[0] >= 1 << 30
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 15
        while torch.cuda.mem_get_info()[0] < free_before - (64 << 20) or _mapped_ranges(daemon) != 0:
            assert time.monotonic() < deadline, (torch.cuda.mem_get_info()[0], free_before, _mapped_ranges(daemon))
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_driver_mapped_memory_without_a_shareable_handle_is_refused_clearly(daemon: Daemon) -> None:
    from kvd_client.errors import InvalidArgument

    caches, memory = make_vmm_caches(0, shareable=False)
    client = KvdClient(daemon.socket, model_id="cuda-unshareable")
    try:
        with pytest.raises(InvalidArgument, match="handle type"):
            client.register_kv_caches(caches, block_dim=1, block_size_tokens=SPEC.block_size)
    finally:
        client.close()
        memory.close()


def test_worker_crash_frees_its_session_and_mappings(daemon: Daemon) -> None:
    code = (
        "import sys, torch; from kvd_client import KvdClient; from tests.kvd.cuda_common import *\n"
        "caches, b = make_gpu_caches(0)\n"
        "c = KvdClient(sys.argv[1], model_id='cuda-crash'); c.register_kv_caches(caches, block_dim=1)\n"
        "c.start(); assert c.wait_ready(30); print('ready', flush=True); import time; time.sleep(60)\n"
    )
    proc = _ready_worker("-c", code, str(daemon.socket))
    try:
        names = lambda: {s.worker_name for s in daemon.stats().sessions}  # noqa: E731
        assert f"pid{proc.pid}" in names()
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while f"pid{proc.pid}" in names():
            assert time.monotonic() < deadline, "the crashed worker's session was not freed"
            time.sleep(0.05)
        assert "session" in daemon.log_text() and "worker process exited" in daemon.log_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.path.exists(daemon.socket)
