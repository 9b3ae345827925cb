"""A second GPU worker process for the CUDA tests (CUDA refuses to open an IPC handle in the process that made it,
and a real deployment has one process per worker anyway).

    python -m tests.kvd.cuda_worker SOCKET save KIND N SALT               -> saves blocks 0..N of SALT
    python -m tests.kvd.cuda_worker SOCKET load FIRST N SALT [KIND]       -> loads them at FIRST.. and checks them
    python -m tests.kvd.cuda_worker SOCKET hold KIND MIB                  -> registers, prints "ready", sleeps

KIND is the memory the KV cache lives in: `malloc` (torch's caching allocator; with PYTORCH_CUDA_ALLOC_CONF=
expandable_segments:True in the environment that is driver-mapped memory too), or `cumem` (cuMemCreate'd
allocations mapped side by side, as vLLM's extensible KV cache makes them). save and load print one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from kvd_client import KvdClient
from kvd_client.cuda_vmm import is_driver_mapped

from tests.helpers.kvdata import block_hash
from tests.kvd.cuda_common import SPEC, make_gpu_caches, make_vmm_caches, mismatched_blocks, write_blocks


def wait_done(client: KvdClient, op: int, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in client.poll_finished():
            if c.op_id == op:
                return c
        time.sleep(0.0005)
    raise TimeoutError("operation did not finish")


def caches_of(kind: str, offset_elements: int, mib: int = 0) -> tuple[dict[str, torch.Tensor], Any]:
    if kind == "cumem":
        return make_vmm_caches(offset_elements, chunk_mib=(mib,) if mib else (22, 20, 24))
    if mib:
        extra = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
        caches, backing = make_gpu_caches(offset_elements)
        return caches, (backing, extra)
    return make_gpu_caches(offset_elements)


def connect(socket: str, caches: dict[str, torch.Tensor], name: str) -> KvdClient:
    client = KvdClient(socket, model_id="cuda-test", worker_name=name)
    client.register_kv_caches(caches, block_dim=1, block_size_tokens=SPEC.block_size)
    client.start()
    if not client.wait_ready(30):
        raise SystemExit(json.dumps({"ok": False, "error": "not ready"}))
    return client


def save(socket: str, kind: str, n: int, salt: str) -> dict[str, Any]:
    caches, _memory = caches_of(kind, offset_elements=768)
    client = connect(socket, caches, f"save-{kind}")
    pairs = [(i, block_hash(i, salt)) for i in range(n)]
    write_blocks(caches, pairs)
    done = wait_done(client, client.save(pairs))
    mapped = is_driver_mapped(next(iter(caches.values())).data_ptr())
    client.close()
    return {"ok": done.ok, "driver_mapped": mapped, "error": done.error}


def load(socket: str, kind: str, first: int, n: int, salt: str) -> dict[str, Any]:
    caches, _memory = caches_of(kind, offset_elements=4096)
    client = connect(socket, caches, f"load-{kind}")
    hashes = [block_hash(i, salt) for i in range(n)]
    hit = client.lookup(hashes).result(10).hit_blocks
    pairs = [(first + i, h) for i, h in enumerate(hashes)]
    done = wait_done(client, client.load(pairs))
    client.wait_loaded(done)
    bad = mismatched_blocks(caches, pairs)
    untouched = int(sum(int(t[:, :first].count_nonzero()) for t in caches.values()))
    client.close()
    return {"ok": done.ok and not bad, "hit": hit, "bad": len(bad), "untouched_nonzero": untouched, "error": done.error}


def main() -> int:
    socket, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "save":
        result = save(socket, args[0], int(args[1]), args[2])
    elif mode == "load":
        kind = args[3] if len(args) > 3 else "malloc"
        result = load(socket, kind, int(args[0]), int(args[1]), args[2])
    elif mode == "hold":
        caches, _memory = caches_of(args[0], offset_elements=0, mib=int(args[1]))
        connect(socket, caches, f"hold-{args[0]}")
        print("ready", flush=True)
        time.sleep(120)
        return 0
    else:
        result = {"ok": False, "error": f"unknown mode {mode}"}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    torch.cuda.init()
    sys.exit(main())
