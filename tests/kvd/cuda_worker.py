"""A second GPU worker process for the CUDA IPC tests (CUDA refuses to open an IPC handle in the process that made it,
and a real deployment has one process per worker anyway).

    python -m tests.kvd.cuda_worker SOCKET load FIRST_INDEX N SALT   -> loads blocks 0..N of SALT at FIRST_INDEX..
    python -m tests.kvd.cuda_worker SOCKET expandable N SALT         -> save + load with expandable_segments on

Prints one JSON line: {"ok": bool, ...}.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from kvd_client import KvdClient
from kvd_client.errors import InvalidArgument

from tests.helpers.kvdata import block_hash
from tests.kvd.cuda_common import SPEC, make_gpu_caches, mismatched_blocks, write_blocks


def wait_done(client: KvdClient, op: int, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in client.poll_finished():
            if c.op_id == op:
                return c
        time.sleep(0.0005)
    raise TimeoutError("operation did not finish")


def main() -> int:
    socket, mode = sys.argv[1], sys.argv[2]
    if mode == "load":
        first, n, salt = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        caches, _ = make_gpu_caches(offset_elements=4096)
        client = KvdClient(socket, model_id="cuda-test", worker_name="worker-b")
        client.register_kv_caches(caches, block_dim=1, block_size_tokens=SPEC.block_size)
        client.start()
        if not client.wait_ready(30):
            print(json.dumps({"ok": False, "error": "not ready"}))
            return 1
        hashes = [block_hash(i, salt) for i in range(n)]
        hit = client.lookup(hashes).result(10).hit_blocks
        pairs = [(first + i, h) for i, h in enumerate(hashes)]
        done = wait_done(client, client.load(pairs))
        client.wait_loaded(done)
        bad = mismatched_blocks(caches, pairs)
        untouched = int(sum(int(t[:, :first].count_nonzero()) for t in caches.values()))
        client.close()
        print(
            json.dumps(
                {
                    "ok": done.ok and not bad,
                    "hit": hit,
                    "bad": len(bad),
                    "untouched_nonzero": untouched,
                    "error": done.error,
                }
            )
        )
        return 0
    if mode == "expandable":
        n, salt = int(sys.argv[3]), sys.argv[4]
        caches, _ = make_gpu_caches(offset_elements=0)
        client = KvdClient(socket, model_id="cuda-expandable", worker_name="expandable")
        try:
            client.register_kv_caches(caches, block_dim=1, block_size_tokens=SPEC.block_size)
        except InvalidArgument as exc:
            print(
                json.dumps(
                    {
                        "ok": False,
                        "refused": True,
                        "error": exc.message,
                        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                    }
                )
            )
            return 0
        client.start()
        if not client.wait_ready(30):
            print(json.dumps({"ok": False, "refused": False, "error": "not ready"}))
            return 1
        pairs = [(i, block_hash(i, salt)) for i in range(n)]
        write_blocks(caches, pairs)
        saved = wait_done(client, client.save(pairs))
        back = [(n + i, h) for i, h in pairs]
        loaded = wait_done(client, client.load(back))
        client.wait_loaded(loaded)
        bad = mismatched_blocks(caches, back)
        client.close()
        print(
            json.dumps(
                {
                    "ok": saved.ok and loaded.ok and not bad,
                    "refused": False,
                    "bad": len(bad),
                    "error": saved.error or loaded.error,
                }
            )
        )
        return 0
    print(json.dumps({"ok": False, "error": f"unknown mode {mode}"}))
    return 2


if __name__ == "__main__":
    torch.cuda.init()
    sys.exit(main())
