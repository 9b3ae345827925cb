"""Utilities for tests and benchmarks that run the real daemon and real worker processes (no mocks of kvd's parts).

- `daemon`: start `python -m kvd serve` on a temporary socket, wait for SERVING, kill / restart / stop it.
- `kvdata`: vLLM-shaped CPU KV caches and deterministic block contents to compare loaded bytes against.
- `rpc`: raw-stub helpers (register sessions by hand, collect Watch notices) for tests of the wire contract.
- `worker`: a worker process (KvdClient + CPU KV cache) driven over JSON lines, and its parent-side handle.
"""
