"""The vLLM connector: key hashing, connector behaviour against a fake and a real daemon, and end-to-end runs of
real vLLM (CPU, tiny random Llama) in separate processes.

The vLLM tests are marked `vllm` and skipped when vLLM is not importable. End-to-end runs take ~30 s each on two
cores; the model is generated once per session.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from kvd_client.hashing import BlockHasher, block_hashes, config_fingerprint, root_hash

HERE = Path(__file__).resolve().parent
WORKER = HERE / "vllm_worker.py"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")]
BLOCK = 32

# ---------------------------------------------------------------------------------------------------------------
# Hashing (no vLLM needed)
# ---------------------------------------------------------------------------------------------------------------

_HASH_SNIPPET = """
import sys
from kvd_client.hashing import block_hashes, config_fingerprint, root_hash
fp = config_fingerprint({"model": "m", "dtype": "bfloat16", "block_size": 4, "tp": 1})
root = root_hash(fp, lora_name="l", cache_salt="s")
print(fp, *(h.hex() for h in block_hashes(list(range(10)), 4, root)))
"""


def test_hashes_do_not_depend_on_pythonhashseed() -> None:
    outs = set()
    for seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", _HASH_SNIPPET], env=env, capture_output=True, text=True, check=True
        ).stdout
        outs.add(out)
    assert len(outs) == 1
    fields = outs.pop().split()
    assert len(fields) == 3  # the fingerprint and the keys of the two full blocks (the partial one has none)


def test_hashes_are_chained_and_block_aligned() -> None:
    root = root_hash(config_fingerprint({"model": "m"}))
    tokens = list(range(100, 100 + 4 * BLOCK + 5))
    hashes = block_hashes(tokens, BLOCK, root)
    assert len(hashes) == 4
    assert all(1 <= len(h) <= 64 for h in hashes)
    assert len(set(hashes)) == 4
    # A change in block 1 changes block 1 and every later block, not block 0.
    changed = list(tokens)
    changed[BLOCK + 3] += 1
    other = block_hashes(changed, BLOCK, root)
    assert other[0] == hashes[0]
    assert all(a != b for a, b in zip(other[1:], hashes[1:], strict=True))
    # Same block contents behind different prefixes: different keys (a key stands for its whole prefix).
    swapped = tokens[BLOCK : 2 * BLOCK] + tokens[:BLOCK]
    assert block_hashes(swapped, BLOCK, root)[1] != hashes[0]
    # A growing sequence hashed incrementally gives the same keys.
    hasher = BlockHasher(root, BLOCK)
    for end in (10, BLOCK, 3 * BLOCK + 1, len(tokens)):
        hasher.extend(tokens[:end])
    assert list(hasher.hashes) == hashes


def test_hashes_differ_by_model_layout_lora_and_salt() -> None:
    tokens = list(range(BLOCK))
    base = {"model": "llama", "dtype": "bfloat16", "block_size": BLOCK, "tp": 1, "kv_cache_layout": "NHD"}
    variants = [
        base,
        {**base, "model": "mistral"},
        {**base, "dtype": "float16"},
        {**base, "tp": 2},
        {**base, "kv_cache_layout": "HND"},
    ]
    fps = [config_fingerprint(v) for v in variants]
    assert len(set(fps)) == len(fps)
    keys = {block_hashes(tokens, BLOCK, root_hash(fp))[0] for fp in fps}
    fp = fps[0]
    keys.add(block_hashes(tokens, BLOCK, root_hash(fp, lora_name="adapter"))[0])
    keys.add(block_hashes(tokens, BLOCK, root_hash(fp, cache_salt="tenant-a"))[0])
    assert len(keys) == len(fps) + 2
    # Key order of the facts does not matter.
    assert config_fingerprint(dict(reversed(list(base.items())))) == fp


def test_extras_separate_equal_tokens() -> None:
    root = root_hash("fp")
    tokens = [7] * BLOCK
    assert block_hashes(tokens, BLOCK, root, extras=[b"mm|a|0;"]) != block_hashes(tokens, BLOCK, root)


# ---------------------------------------------------------------------------------------------------------------
# Shared fixtures
# ---------------------------------------------------------------------------------------------------------------


class Daemon:
    """A kvd daemon in a subprocess, on a socket that outlives restarts."""

    def __init__(self, socket: Path, log: Path) -> None:
        self.socket = socket
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvd", "serve", "--socket", str(self.socket), "--capacity", "256MiB"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            rc = subprocess.run(
                [sys.executable, "-m", "kvd", "health", "--socket", str(self.socket)], capture_output=True
            ).returncode
            if rc == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("kvd did not become healthy")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # A short path: AF_UNIX socket paths are limited to ~107 bytes, and pytest's tmp_path can be long.
    d = Path(tempfile.mkdtemp(prefix="kvd-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(sockdir: Path) -> Iterator[Daemon]:
    d = Daemon(sockdir / "kvd.sock", sockdir / "kvd.log")
    yield d
    d.stop()


# ---------------------------------------------------------------------------------------------------------------
# Connector unit tests (in-process vLLM config objects, no engine)
# ---------------------------------------------------------------------------------------------------------------


class FakeClient:
    """Stands in for KvdClient; lookups stay pending until the test resolves them."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.ready = True
        self.lookups: list[tuple[list[bytes], Future[Any]]] = []
        self.saves: list[tuple[int, list[tuple[int, bytes]]]] = []
        self.loads: list[tuple[int, list[tuple[int, bytes]]]] = []
        self.finished: list[Any] = []
        self.registered: dict[str, Any] = {}
        self.block_dim = -1
        self.registrations = 0
        self._ids = 0
        self.closed = False

    def register_kv_caches(self, kv_caches: Any, *, block_dim: int, block_size_tokens: int) -> None:
        self.registered, self.block_dim = dict(kv_caches), block_dim
        self.registrations += 1

    def release_memory(self) -> None:
        self.registered = {}

    def start(self) -> None:
        pass

    def lookup(self, block_hashes: Sequence[bytes]) -> Future[Any]:
        fut: Future[Any] = Future()
        self.lookups.append((list(block_hashes), fut))
        return fut

    def _op(self) -> int:
        self._ids += 1
        return self._ids

    def save(self, blocks: Sequence[tuple[int, bytes]], *, ready_event: bytes = b"") -> int:
        op = self._op()
        self.saves.append((op, list(blocks)))
        return op

    def load(self, blocks: Sequence[tuple[int, bytes]]) -> int:
        op = self._op()
        self.loads.append((op, list(blocks)))
        return op

    def poll_finished(self) -> list[Any]:
        out, self.finished = self.finished, []
        return out

    def wait_loaded(self, completion: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _vllm_config(model: Path, socket: str) -> Any:
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=str(model),
        skip_tokenizer_init=True,
        block_size=BLOCK,
        enforce_eager=True,
        max_model_len=2048,
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvdConnector",
            kv_connector_module_path="kvd_client.vllm.connector",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"socket": socket},
        ),
    )
    return args.create_engine_config()


def _kv_cache_config(num_blocks: int = 64) -> Any:
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    layers = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(layer_names=layers, kv_cache_spec=spec)],
    )


def _request(req_id: str, tokens: list[int]) -> Any:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(req_id, tokens, SamplingParams(max_tokens=4), None)


@pytest.fixture(scope="module")
def vllm_config(tiny_model: Path) -> Any:
    return _vllm_config(tiny_model, "/nonexistent/kvd.sock")


@pytest.fixture
def fake_clients(monkeypatch: pytest.MonkeyPatch) -> list[FakeClient]:
    from kvd_client.vllm import clients

    made: list[FakeClient] = []

    def factory(spec: Any) -> FakeClient:
        made.append(FakeClient(spec))
        return made[-1]

    monkeypatch.setattr(clients, "client_factory", factory)
    monkeypatch.setattr(clients, "_shared", {})
    return made


class _Blocks:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


def _scheduler_output(new: list[tuple[str, list[int], list[int], int, int]], finished: Sequence[str] = ()) -> Any:
    """A SchedulerOutput with new requests (req id, prompt, block ids, num computed, num scheduled)."""
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    new_reqs = [
        NewRequestData(
            req_id=rid,
            prompt_token_ids=prompt,
            mm_features=[],
            sampling_params=None,
            pooling_params=None,
            block_ids=(blocks,),
            num_computed_tokens=computed,
            lora_request=None,
        )
        for rid, prompt, blocks, computed, _ in new
    ]
    kwargs: dict[str, Any] = {
        "scheduled_new_reqs": new_reqs,
        "scheduled_cached_reqs": CachedRequestData.make_empty(),
        "num_scheduled_tokens": {rid: n for rid, _, _, _, n in new},
        "total_num_scheduled_tokens": sum(n for *_, n in new),
        "scheduled_spec_decode_tokens": {},
        "scheduled_encoder_inputs": {},
        "num_common_prefix_blocks": [0],
        "finished_req_ids": set(finished),
        "free_encoder_mm_hashes": [],
    }
    import dataclasses

    names = {f.name for f in dataclasses.fields(SchedulerOutput)}
    return SchedulerOutput(**{k: v for k, v in kwargs.items() if k in names})


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def test_lookup_pending_returns_none_then_the_hit(vllm_config: Any, fake_clients: list[FakeClient]) -> None:
    from kvd_client import LookupResult, Tier
    from kvd_client.vllm_connector import KvdConnector, KvdConnectorMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    conn = KvdConnector(vllm_config, KVConnectorRole.SCHEDULER, _kv_cache_config())
    (client,) = fake_clients
    tokens = list(range(3, 3 + 5 * BLOCK + 7))  # 5 full blocks and a tail
    req = _request("r1", tokens)

    # Pending: "ask again", without waiting, however often vLLM asks; one lookup only.
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    assert len(client.lookups) == 1
    hashes, fut = client.lookups[0]
    assert len(hashes) == 5
    # The keys are the documented chained hashes of the prompt's full blocks.
    root = root_hash(conn.fingerprint)
    assert hashes == block_hashes(tokens[: 5 * BLOCK], BLOCK, root)

    fut.set_result(LookupResult(hit_blocks=3, tiers=(Tier.DISK,) * 3))
    # A local hit of one block: kvd supplies blocks 1 and 2, from disk: loaded asynchronously.
    assert conn.get_num_new_matched_tokens(req, BLOCK) == (2 * BLOCK, True)
    conn.update_state_after_alloc(req, _Blocks([10, 11, 12, 13, 14, 15]), 2 * BLOCK)
    assert conn.get_external_cache_hit_sources(req, 2 * BLOCK) == {"disk": 2 * BLOCK}

    meta = conn.build_connector_meta(_scheduler_output([]))
    assert isinstance(meta, KvdConnectorMetadata)
    (load,) = meta.loads
    assert load.req_id == "r1" and load.block_ids == (11, 12) and load.block_hashes == tuple(hashes[1:3])
    assert not load.in_step
    assert pickle.loads(pickle.dumps(meta)) == meta

    # After the load, the request is scheduled: the blocks kvd lacks (3, 4) are saved once they are computed.
    meta = conn.build_connector_meta(
        _scheduler_output([("r1", tokens, [10, 11, 12, 13, 14, 15], 3 * BLOCK, 2 * BLOCK + 7)])
    )
    (save,) = meta.saves
    assert save.block_ids == (13, 14) and save.block_hashes == tuple(hashes[3:5])
    # Finishing keeps the blocks until the workers report the save done.
    assert conn.request_finished(req, [10, 11, 12, 13, 14, 15]) == (True, None)


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def test_lookup_failures_are_misses(vllm_config: Any, fake_clients: list[FakeClient]) -> None:
    from kvd_client import Unavailable
    from kvd_client.vllm_connector import KvdConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    conn = KvdConnector(vllm_config, KVConnectorRole.SCHEDULER, _kv_cache_config())
    (client,) = fake_clients
    tokens = list(range(3, 3 + 4 * BLOCK))

    client.ready = False  # no daemon: a miss at once, no lookup sent
    assert conn.get_num_new_matched_tokens(_request("a", tokens), 0) == (0, False)
    assert client.lookups == []

    client.ready = True
    req = _request("b", tokens)
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    client.lookups[0][1].set_exception(Unavailable("gone"))
    assert conn.get_num_new_matched_tokens(req, 0) == (0, False)

    # A full hit still leaves the last token to compute: the prompt is 4 blocks, at most 3 are loaded.
    req = _request("c", tokens)
    conn.get_num_new_matched_tokens(req, 0)
    from kvd_client import LookupResult, Tier

    client.lookups[-1][1].set_result(LookupResult(hit_blocks=3, tiers=(Tier.DISK,) * 3))
    assert conn.get_num_new_matched_tokens(req, 0) == (3 * BLOCK, True)
    assert len(client.lookups[-1][0]) == 3


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def test_worker_reports_completions_and_exact_load_errors(vllm_config: Any, fake_clients: list[FakeClient]) -> None:
    import torch
    from kvd_client import Completion, OpKind
    from kvd_client.vllm_connector import BlockOp, KvdConnector, KvdConnectorMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    conn = KvdConnector(vllm_config, KVConnectorRole.WORKER, _kv_cache_config(num_blocks=16))
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(16, 2, BLOCK, 64, dtype=torch.bfloat16) for i in range(2)}
    conn.register_kv_caches(caches)
    (client,) = fake_clients
    assert client.block_dim == 0 and set(client.registered) == set(caches)

    h = [bytes([i]) * 8 for i in range(6)]
    meta = KvdConnectorMetadata(
        loads=(BlockOp("L", (4, 5, 6), (h[0], h[1], h[2])),),
        saves=(BlockOp("S", (7, 8), (h[3], h[4])),),
    )
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)  # type: ignore[arg-type]
    conn.wait_for_layer_load("model.layers.0.self_attn.attn")
    conn.wait_for_save()
    conn.clear_connector_metadata()
    (load_op, _), (save_op, _) = client.loads[0], client.saves[0]

    # Nothing finished yet: nothing reported; "S" is finished by the scheduler but its save is in flight.
    assert conn.get_finished({"S"}) == (None, None)
    assert conn.get_block_ids_with_load_errors() == set()

    client.finished = [
        Completion(load_op, OpKind.LOAD, False, frozenset({h[1]}), error="gone"),
        Completion(save_op, OpKind.SAVE, True, frozenset(), nbytes=2 * 16384, duration_s=0.001),
    ]
    assert conn.get_finished(set()) == ({"S"}, {"L"})
    assert conn.get_block_ids_with_load_errors() == {5}  # exactly the block whose hash failed
    assert conn.get_block_ids_with_load_errors() == set()
    stats = conn.get_kv_connector_stats()
    assert stats is not None
    reduced = stats.reduce()
    assert reduced["load_failed_blocks"] == 1 and reduced["save_bytes"] == 2 * 16384 and reduced["saves"] == 1
    # Two steps; the second began with "S" finished and its save in flight (what keeps vLLM stepping).
    assert reduced["worker_steps"] == 2 and reduced["steps_with_saves_pending"] == 1
    conn.shutdown()
    assert client.closed


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def _scheduler_with_three_stored_blocks(tiny_model: Path, daemon: Daemon) -> tuple[Any, list[int]]:
    """A scheduler-side connector, and a request whose first three blocks a worker-like client stored."""
    import torch
    from kvd_client import KvdClient
    from kvd_client.vllm_connector import KvdConnector, layout_facts
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    config = _vllm_config(tiny_model, str(daemon.socket))
    tokens = list(range(5, 5 + 4 * BLOCK + 3))
    # A worker-like client stores the first three blocks under the connector's keys; then it goes away.
    fingerprint = config_fingerprint(layout_facts(config, _kv_cache_config()))
    hashes = block_hashes(tokens[: 4 * BLOCK], BLOCK, root_hash(fingerprint))
    cache = {f"model.layers.{i}.self_attn.attn": torch.ones(8, 2, BLOCK, 64, dtype=torch.bfloat16) for i in range(2)}
    saver = KvdClient(daemon.socket, model_id=str(tiny_model), layout_fingerprint=fingerprint)
    try:
        saver.register_kv_caches(cache, block_dim=0, block_size_tokens=BLOCK)
        saver.start()
        assert saver.wait_ready(30)
        op = saver.save([(i, hashes[i]) for i in range(3)])
        done = _wait_for(lambda: [c for c in saver.poll_finished() if c.op_id == op], 30)
        assert done and done[0].ok, done
    finally:
        saver.close()
    conn = KvdConnector(config, KVConnectorRole.SCHEDULER, _kv_cache_config())
    assert conn.fingerprint == fingerprint
    return conn, tokens


def test_real_daemon_lookup_is_answered_at_once_from_the_index(tiny_model: Path, daemon: Daemon) -> None:
    """With the daemon's shared index mapped, the connector's first call returns the stored prefix: no RPC, no
    "ask again", even while the daemon cannot answer anything (SIGSTOPped)."""
    daemon.start()
    conn, tokens = _scheduler_with_three_stored_blocks(tiny_model, daemon)
    try:
        client = conn._client
        assert client is not None
        assert _wait_for(lambda: client.ready and client.index.mapped, 30)
        daemon.pause()
        try:
            req = _request("r", tokens)
            conn.on_new_request(req)
            assert conn.get_num_new_matched_tokens(req, 0) == (3 * BLOCK, False)  # in host memory: in-step
        finally:
            daemon.resume()
        stats = conn._scheduler.stats.stats.data
        assert stats["lookups_local"] == 1 and stats["lookup_not_ready"] == 0
    finally:
        conn.shutdown()


def test_real_daemon_lookup_is_never_awaited(tiny_model: Path, daemon: Daemon) -> None:
    """Without a shared index (turned off), a lookup the daemon has not answered (it is SIGSTOPped) makes the
    connector say "ask again" at once, every time; once the daemon runs again the same call returns the prefix."""
    daemon.start(env={"KVD_INDEX__ENABLED": "false"})
    conn, tokens = _scheduler_with_three_stored_blocks(tiny_model, daemon)
    try:
        client = conn._client
        assert client is not None
        assert _wait_for(lambda: client.ready, 30)
        assert not client.index.mapped
        daemon.pause()
        try:
            req = _request("r", tokens)
            assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
            assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
        finally:
            daemon.resume()
        answer = _wait_for(lambda: conn.get_num_new_matched_tokens(req, 0)[0], 30)
        assert answer == 3 * BLOCK
        assert conn._scheduler.stats.stats.data["lookup_not_ready_local"] >= 2
    finally:
        conn.shutdown()


def _wait_for(fn: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------------
# End to end: real vLLM processes
# ---------------------------------------------------------------------------------------------------------------


def _prompts() -> list[list[int]]:
    """Four prompts sharing a 200-token prefix (two sharing a longer one), with distinct tails."""
    rng = random.Random(7)
    prefix = [rng.randrange(3, 512) for _ in range(200)]
    longer = prefix + [rng.randrange(3, 512) for _ in range(100)]
    tails = [[rng.randrange(3, 512) for _ in range(n)] for n in (40, 75, 21, 60)]
    return [prefix + tails[0], prefix + tails[1], longer + tails[2], longer + tails[3]]


def _run_vllm(
    model: Path, workdir: Path, phases: list[list[list[int]]], *, socket: Path | None, name: str, **opts: Any
) -> tuple[subprocess.Popen[bytes], Path]:
    prompts = workdir / f"{name}.prompts.json"
    prompts.write_text(json.dumps(phases))
    out = workdir / f"{name}.json"
    cmd = [sys.executable, str(WORKER), "run", "--model", str(model), "--prompts", str(prompts), "--out", str(out)]
    if socket is not None:
        cmd += ["--socket", str(socket)]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    # A different hash seed in every process: kvd keys must not care.
    env = {**os.environ, "PYTHONHASHSEED": str(random.randrange(1, 1 << 30)), "VLLM_CPU_CI_ENV": "1"}
    log = (workdir / f"{name}.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out


def _finish(proc: subprocess.Popen[bytes], out: Path, timeout_s: float = 300) -> dict[str, Any]:
    rc = proc.wait(timeout=timeout_s)
    log = Path(str(out).removesuffix(".json") + ".log")
    assert rc == 0, f"vLLM worker failed ({rc}):\n{log.read_text()[-4000:]}"
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def baseline(tiny_model: Path, e2e_dir: Path) -> list[list[int]]:
    """What vLLM generates without any connector."""
    proc, out = _run_vllm(tiny_model, e2e_dir, [_prompts()], socket=None, name="baseline")
    report = _finish(proc, out)
    return report["outputs"][0]  # type: ignore[no-any-return]


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def test_e2e_second_process_loads_from_kvd(
    tiny_model: Path, e2e_dir: Path, baseline: list[list[int]], daemon: Daemon
) -> None:
    daemon.start()
    a = _finish(*_run_vllm(tiny_model, e2e_dir, [_prompts()], socket=daemon.socket, name="a"))
    b = _finish(*_run_vllm(tiny_model, e2e_dir, [_prompts()], socket=daemon.socket, name="b"))
    assert a["outputs"][0] == baseline
    assert b["outputs"][0] == baseline
    assert b["external_hits"] > 0
    # Whichever prompt B admits first finds nothing in its local prefix cache, so kvd serves all of it but the
    # block holding its last token; later prompts may take their shared prefix from the local cache instead.
    assert b["external_hits"] >= min(((len(p) - 1) // BLOCK) * BLOCK for p in _prompts())


def _run_with_pauses(tiny_model: Path, e2e_dir: Path, socket: Path, name: str, actions: list[Any]) -> dict[str, Any]:
    """Run len(actions) + 1 phases of the same prompts; before phase i+1 call actions[i]()."""
    pause = e2e_dir / f"{name}.pause"
    phases = [_prompts()] * (len(actions) + 1)
    proc, out = _run_vllm(tiny_model, e2e_dir, phases, socket=socket, name=name, pause_file=pause, repeat_until_hit=40)
    try:
        for i, action in enumerate(actions, start=1):
            marker = Path(f"{pause}.{i}")
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert proc.poll() is None, (e2e_dir / f"{name}.log").read_text()[-4000:]
                assert time.monotonic() < deadline
                time.sleep(0.1)
            action()
            Path(f"{pause}.{i}.go").touch()
        return _finish(proc, out)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def test_e2e_daemon_killed_mid_run_then_restarted(
    tiny_model: Path, e2e_dir: Path, baseline: list[list[int]], daemon: Daemon
) -> None:
    daemon.start()
    report = _run_with_pauses(tiny_model, e2e_dir, daemon.socket, "killed", [daemon.kill, daemon.start])
    for outputs in report["outputs"]:
        assert outputs == baseline
    hits = report["hits_after_phase"]
    # Phase 2 ran with no daemon: no hits. Phase 3 ran after a restart (empty daemon): the client re-registered,
    # saved, and a repeat of the phase hit.
    assert hits[1] == hits[0]
    assert hits[2] > hits[1]


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def test_e2e_daemon_absent_at_start(tiny_model: Path, e2e_dir: Path, baseline: list[list[int]], daemon: Daemon) -> None:
    report = _run_with_pauses(tiny_model, e2e_dir, daemon.socket, "absent", [daemon.start])
    for outputs in report["outputs"]:
        assert outputs == baseline
    hits = report["hits_after_phase"]
    assert hits[0] == 0
    assert hits[1] > 0


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def test_lookup_starts_when_the_request_arrives(vllm_config: Any, fake_clients: list[FakeClient]) -> None:
    from kvd_client import LookupResult, Tier
    from kvd_client.vllm_connector import KvdConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    conn = KvdConnector(vllm_config, KVConnectorRole.SCHEDULER, _kv_cache_config())
    (client,) = fake_clients
    req = _request("early", list(range(3, 3 + 3 * BLOCK + 1)))
    conn.on_new_request(req)
    assert len(client.lookups) == 1
    client.lookups[0][1].set_result(LookupResult(hit_blocks=3, tiers=(Tier.HOST_MEMORY,) * 3))
    # Answered before the scheduler first asks: no "ask again" round, and no second lookup. Every block is in the
    # daemon's host memory: loaded inside the step that schedules the request (False: not asynchronously).
    assert conn.get_num_new_matched_tokens(req, 0) == (3 * BLOCK, False)
    assert len(client.lookups) == 1
    conn.update_state_after_alloc(req, _Blocks([20, 21, 22, 23]), 3 * BLOCK)
    (load,) = conn.build_connector_meta(_scheduler_output([])).loads
    assert load.in_step and load.block_ids == (20, 21, 22)


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def test_sleep_releases_the_memory_and_wake_up_registers_it_again(
    vllm_config: Any, fake_clients: list[FakeClient]
) -> None:
    import torch
    from kvd_client import Completion, OpKind
    from kvd_client.vllm.connector import KvdConnector
    from kvd_client.vllm.metadata import BlockOp, KvdConnectorMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    conn = KvdConnector(vllm_config, KVConnectorRole.WORKER, _kv_cache_config(num_blocks=16))
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(16, 2, BLOCK, 64, dtype=torch.bfloat16) for i in range(2)}
    conn.register_kv_caches(caches)
    (client,) = fake_clients
    h = [bytes([i]) * 8 for i in range(4)]
    conn.bind_connector_metadata(KvdConnectorMetadata(saves=(BlockOp("S", (1, 2), (h[0], h[1])),)))
    conn.wait_for_save()
    conn.clear_connector_metadata()
    (save_op, _) = client.saves[0]
    client.finished = [Completion(save_op, OpKind.SAVE, True, frozenset())]

    conn.unregister_kv_caches()  # the save in flight finished first; then the daemon lets go of the memory
    assert client.registered == {} and not client.finished
    conn.unregister_kv_caches()  # idempotent
    # Asleep: a load cannot happen; its blocks are reported failed at once (recomputed after wake-up).
    conn.bind_connector_metadata(KvdConnectorMetadata(loads=(BlockOp("L", (5, 6), (h[2], h[3])),)))
    conn.start_load_kv(None)  # type: ignore[arg-type]
    conn.clear_connector_metadata()
    assert client.loads == []
    assert conn.get_finished(set()) == (None, {"L"})
    assert conn.get_block_ids_with_load_errors() == {5, 6}

    conn.restore_kv_caches()
    assert client.registrations == 2 and set(client.registered) == set(caches)
    conn.restore_kv_caches()  # idempotent
    assert client.registrations == 2
    conn.shutdown()


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed")
def test_may_load_async_follows_the_lookup(vllm_config: Any, fake_clients: list[FakeClient]) -> None:
    from kvd_client import LookupResult, Tier
    from kvd_client.vllm.connector import KvdConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    conn = KvdConnector(vllm_config, KVConnectorRole.SCHEDULER, _kv_cache_config())
    (client,) = fake_clients
    tokens = list(range(3, 3 + 4 * BLOCK + 1))
    first = _request("first", tokens)
    conn.on_new_request(first)
    assert not conn.may_load_async(first)  # pending, and no lookup has hit yet
    client.lookups[0][1].set_result(LookupResult(hit_blocks=2, tiers=(Tier.HOST_MEMORY, Tier.DISK)))
    assert conn.may_load_async(first)  # answered: a hit, partly on disk
    assert conn.get_num_new_matched_tokens(first, 0) == (2 * BLOCK, True)
    host = _request("host", [t + 2 for t in tokens])
    conn.on_new_request(host)
    client.lookups[1][1].set_result(LookupResult(hit_blocks=2, tiers=(Tier.HOST_MEMORY,) * 2))
    assert not conn.may_load_async(host)  # a hit in host memory loads inside the step, not asynchronously
    miss = _request("miss", [t + 1 for t in tokens])
    conn.on_new_request(miss)
    client.lookups[2][1].set_result(LookupResult(hit_blocks=0, tiers=()))
    assert not conn.may_load_async(miss)
    assert not conn.may_load_async(_request("unknown", tokens))  # never seen: no lookup to go by
