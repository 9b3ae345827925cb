"""A worker process for tests: CPU KV caches shaped like vLLM's plus a real KvdClient, driven over JSON lines.

Child side (`python -m tests.helpers.worker --socket PATH --model-id M ...`): builds zeroed caches, registers them
with KvdClient, prints `{"event": "ready", ...}` (or `"not_ready"`), then answers one JSON line per command read
from stdin. Block lists travel as `[[block_index, "hash hex"], ...]`.

    fill {blocks}                      write the deterministic contents of each hash at its index
    save {blocks, timeout_s} / load    run the operation, wait for its completion: {ok, failed, error, nbytes, wall_s}
    verify {blocks}                    {mismatched: [hash hex]} against the deterministic contents
    nonzero {exclude}                  {indices: [...]}: blocks holding anything but zeros
    lookup {hashes}                    {hit_blocks} or {error, message}
    churn {tag, seconds, batch,        save fresh blocks (hashes of `tag`) back to back, `pause_s` apart, until
           pause_s, stop}              `seconds` pass or the file `stop` exists: {saves, saved_blocks}
    probe_load {tag, trials, seconds,  save a fresh `length`-block sequence, then 8 times look an older one up and
                length}                at once load what the lookup found, verify it; until `trials` or `seconds`:
                                       {trials, hit_blocks, failed_blocks, unreported, wrong_bytes, foreign}
    info / wait_ready {timeout_s}      {ready, session_id, boot_id, registrations, pid, block_bytes, has_ring, rings,
                                       by_ring, by_rpc}
    exit                               close the client (unregisters) and exit 0
    vanish                             exit at once without unregistering (os._exit)

Parent side: `WorkerProcess` starts one and sends commands (`request`) with deadlines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.helpers.daemon import child_env, reap, track
from tests.helpers.kvdata import CacheSpec

Pairs = list[list[Any]]


def pairs_json(pairs: Iterable[tuple[int, bytes]]) -> Pairs:
    return [[int(i), h.hex()] for i, h in pairs]


def _pairs(blocks: Pairs) -> list[tuple[int, bytes]]:
    return [(int(i), bytes.fromhex(h)) for i, h in blocks]


# -- child side -------------------------------------------------------------------------------------------------

TALLY = ("trials", "hit_blocks", "failed_blocks", "unreported", "wrong_bytes", "foreign")
PROBES_PER_SAVE = 8


def _tally_load(tally: dict[str, int], result: dict[str, Any], requested: list[bytes]) -> set[bytes]:
    """Count a load that followed a lookup: the blocks it failed (each must be one it was asked for, else
    `foreign`; a load without a completion counts all as `unreported`). Returns them."""
    failed = {bytes.fromhex(h) for h in result.get("failed", [])}
    if result.get("timeout"):
        tally["unreported"] += len(requested)
        failed = set(requested)
    tally["failed_blocks"] += len(failed)
    tally["foreign"] += len(failed - set(requested))
    return failed


def _child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--worker-name", default="")
    parser.add_argument("--ready-timeout", type=float, default=20.0)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-blocks", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--tp-rank", type=int, default=0)
    parser.add_argument("--tp-world-size", type=int, default=1)
    # Tensor-parallel ranks hold different shards under the same block hash: with a salt, this worker's block
    # contents are those of (hash + salt), so a test can tell whose bytes it loaded.
    parser.add_argument("--content-salt", default="")
    parser.add_argument("--no-ring", action="store_true", help="saves and loads by RPC only (no submission ring)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="worker %(levelname)s %(name)s: %(message)s")

    from kvd_client import KvdClient

    from tests.helpers.kvdata import BLOCK_DIM, block_hash, fill, make_caches, mismatches, nonzero_blocks

    spec = CacheSpec(args.num_layers, args.num_blocks, args.block_size, args.kv_heads, args.head_dim)
    caches = make_caches(spec)
    client = KvdClient(
        args.socket,
        model_id=args.model_id,
        worker_name=args.worker_name or f"worker-{os.getpid()}",
        tp_rank=args.tp_rank,
        tp_world_size=args.tp_world_size,
        submission_ring=not args.no_ring,
    )
    salt = args.content_salt.encode()

    def content_pairs(blocks: Pairs) -> list[tuple[int, bytes]]:
        return [(i, h + salt) for i, h in _pairs(blocks)]

    client.register_kv_caches(caches, block_dim=BLOCK_DIM, block_size_tokens=spec.block_size)
    client.start()

    def info() -> dict[str, Any]:
        return {
            "ready": client.ready,
            "session_id": client.session_id,
            "boot_id": client.boot_id,
            "registrations": client.registrations,
            "pid": os.getpid(),
            "block_bytes": client.block_bytes,
            "session_key": client._session.key.hex(),  # tests of who may use the session
            "index_mapped": client.index.mapped,
            "index_answered": client.index.answered,
            "has_ring": client.submissions.has_ring,
            "rings": client.submissions.rings,  # rings granted, one per session that got one
            "by_ring": client.submissions.ring_count,
            "by_rpc": client.submissions.rpc_count,
        }

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def run(kind: str, blocks: Pairs, timeout: float) -> dict[str, Any]:
        pairs = _pairs(blocks)
        started = time.perf_counter()
        op = client.save(pairs) if kind == "save" else client.load(pairs)
        got = client.wait([op], timeout_s=timeout)  # blocks on a condition, no polling
        if not got:
            return {"timeout": True}
        c = got[0]
        wall_s = time.perf_counter() - started  # as the worker sees it: enqueue to completion collected
        return {
            "wall_s": wall_s,
            "ok": c.ok,
            "failed": sorted(h.hex() for h in c.failed_hashes),
            "error": c.error,
            "nbytes": c.nbytes,
            "duration_s": c.duration_s,
            "stages": c.stages.as_dict() if c.stages is not None else None,
        }

    def churn(tag: str, seconds: float, batch: int, pause_s: float, stop: str) -> dict[str, Any]:
        deadline, saves, n = time.monotonic() + seconds, 0, 0
        while time.monotonic() < deadline and not (stop and os.path.exists(stop)):
            blocks = [[i, block_hash(n + i, tag).hex()] for i in range(batch)]
            fill(caches, spec, content_pairs(blocks))
            run("save", blocks, 30.0)
            saves, n = saves + 1, n + batch
            time.sleep(pause_s)
        return {"saves": saves, "saved_blocks": n}

    def probe_load(tag: str, trials: int, seconds: float, length: int) -> dict[str, Any]:
        """Lookups followed at once by loads, on sequences of varying age under a churning pool."""
        rng, tally = random.Random(os.getpid()), dict.fromkeys(TALLY, 0)
        deadline, k, scratch = time.monotonic() + seconds, 0, spec.num_blocks - length
        while tally["trials"] < trials and time.monotonic() < deadline:
            seq = [[i, block_hash(k * length + i, tag).hex()] for i in range(length)]
            fill(caches, spec, content_pairs(seq))
            run("save", seq, 30.0)
            for _ in range(PROBES_PER_SAVE):
                old = rng.randrange(max(0, k - 64), k + 1)
                hashes = [block_hash(old * length + i, tag) for i in range(length)]
                hit = client.lookup(hashes).result(timeout=10).hit_blocks
                if hit:
                    loaded = [[scratch + i, hashes[i].hex()] for i in range(hit)]
                    failed = _tally_load(tally, run("load", loaded, 30.0), hashes[:hit])
                    wrong = {h[: len(h) - len(salt)] for h in mismatches(caches, spec, content_pairs(loaded))}
                    tally["wrong_bytes"] += len(wrong - failed)  # a block not reported failed must be right
                tally["trials"] += 1
                tally["hit_blocks"] += hit
            k += 1
        return tally

    reply({"event": "ready" if client.wait_ready(args.ready_timeout) else "not_ready", **info()})
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "fill":
            fill(caches, spec, content_pairs(msg["blocks"]))
            reply({"ok": True})
        elif cmd in ("save", "load"):
            reply(run(cmd, msg["blocks"], float(msg.get("timeout_s", 10.0))))
        elif cmd == "verify":
            bad = mismatches(caches, spec, content_pairs(msg["blocks"]))
            reply({"mismatched": [h[: len(h) - len(salt)].hex() for h in bad]})
        elif cmd == "nonzero":
            reply({"indices": nonzero_blocks(caches, msg.get("exclude", []))})
        elif cmd == "lookup":
            try:
                result = client.lookup([bytes.fromhex(h) for h in msg["hashes"]]).result(timeout=10)
                reply({"hit_blocks": result.hit_blocks})
            except Exception as exc:
                reply({"error": type(exc).__name__, "message": str(exc)})
        elif cmd == "churn":
            reply(churn(msg["tag"], msg["seconds"], msg["batch"], msg.get("pause_s", 0.0), msg.get("stop", "")))
        elif cmd == "probe_load":
            reply(probe_load(msg["tag"], msg["trials"], msg["seconds"], msg["length"]))
        elif cmd == "info":
            reply(info())
        elif cmd == "wait_ready":
            client.wait_ready(float(msg.get("timeout_s", 10.0)))
            reply(info())
        elif cmd == "vanish":
            os._exit(0)  # no unregister, no cleanup: like a worker that crashed
        elif cmd == "exit":
            client.close()
            reply({"bye": True})
            return 0
        else:
            reply({"error": "unknown command", "message": cmd})
    client.close()
    return 0


# -- parent side ------------------------------------------------------------------------------------------------


class WorkerError(RuntimeError):
    pass


class WorkerProcess:
    """One worker process; `request` sends a command and waits for its reply line."""

    def __init__(
        self,
        socket: Path,
        spec: CacheSpec,
        model_id: str,
        *,
        name: str = "",
        ready_timeout: float = 20.0,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.spec = spec
        self.log_path = log_path
        stderr = log_path.open("ab") if log_path is not None else subprocess.DEVNULL
        try:
            self.proc = track(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.helpers.worker",
                        f"--socket={socket}",
                        f"--model-id={model_id}",
                        f"--worker-name={name}",
                        f"--ready-timeout={ready_timeout}",
                        *spec.to_args(),
                        *extra_args,
                    ],
                    env=child_env(),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                )
            )
        finally:
            if log_path is not None:
                stderr.close()  # type: ignore[union-attr]
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True, name="kvd-test-worker-reader")
        self._reader.start()
        self._hello: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:
            return
        for line in stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise WorkerError(f"worker {self.pid} did not answer within {timeout:.1f}s{self._log_tail()}") from None
        if line is None:
            raise WorkerError(f"worker {self.pid} exited ({self.proc.poll()}){self._log_tail()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def _log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return "; its log:\n" + self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def hello(self, timeout: float = 60.0) -> dict[str, Any]:
        """The first line: {"event": "ready" | "not_ready", ...info}. Waits for it once."""
        if self._hello is None:
            self._hello = self._next(timeout)
        return self._hello

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        hello = self.hello(timeout)
        if hello.get("event") != "ready":
            raise WorkerError(f"worker {self.pid} did not register: {hello}{self._log_tail()}")
        return hello

    def request(self, cmd: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        self.hello(timeout)
        stdin = self.proc.stdin
        if stdin is None:
            raise WorkerError("worker has no stdin")
        stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        stdin.flush()
        return self._next(timeout)

    def fill(self, pairs: Iterable[tuple[int, bytes]]) -> None:
        self.request("fill", blocks=pairs_json(pairs))

    def save(self, pairs: Iterable[tuple[int, bytes]], timeout: float = 10.0) -> dict[str, Any]:
        return self.request("save", timeout=timeout + 5, blocks=pairs_json(pairs), timeout_s=timeout)

    def load(self, pairs: Iterable[tuple[int, bytes]], timeout: float = 10.0) -> dict[str, Any]:
        return self.request("load", timeout=timeout + 5, blocks=pairs_json(pairs), timeout_s=timeout)

    def verify(self, pairs: Iterable[tuple[int, bytes]]) -> list[bytes]:
        return [bytes.fromhex(h) for h in self.request("verify", blocks=pairs_json(pairs))["mismatched"]]

    def nonzero(self, exclude: Iterable[int] = ()) -> list[int]:
        return list(self.request("nonzero", exclude=list(exclude))["indices"])

    def lookup(self, hashes: Iterable[bytes]) -> dict[str, Any]:
        return self.request("lookup", hashes=[h.hex() for h in hashes])

    def kill(self) -> int:
        self.proc.kill()
        return reap(self.proc)

    def close(self, timeout: float = 10.0) -> int:
        """Ask it to exit (it unregisters); SIGKILL if it does not."""
        self.ask_exit()
        return reap(self.proc, timeout=timeout)

    def ask_exit(self) -> None:
        """Ask it to exit without waiting (stop many workers in parallel, then `close` each)."""
        if self.proc.poll() is None and self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    raise SystemExit(_child_main())
