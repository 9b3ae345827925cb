"""The daemon process itself: health, shutdown and drain, reflection, socket modes, and how sessions end."""

from __future__ import annotations

import os
import queue
import signal
import stat
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kvd_client.errors import Unavailable, from_rpc_error
from kvd_client.types import session_label
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

from tests.conftest import DaemonFactory, WorkerFactory
from tests.helpers.daemon import NOT_SERVING, SERVING, Daemon, MiB, wait_for
from tests.helpers.kvdata import CacheSpec, block_hash, fill, make_caches
from tests.helpers.rpc import (
    RawSession,
    cpu_register_request,
    fingerprint,
    lookup_hits,
    lookup_only_request,
    scoped,
    transfer,
)

# -- health and shutdown ----------------------------------------------------------------------------------------


class HealthWatch:
    """grpc.health.v1 Watch on a thread: every status the daemon sends, in order."""

    def __init__(self, daemon: Daemon, service: str = "") -> None:
        self.channel = daemon.new_channel()
        self.call = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=service))
        self.statuses: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.statuses.put(int(response.status))
        except grpc.RpcError:
            pass
        self.statuses.put(None)  # the stream ended (the daemon stopped listening)

    def next(self, timeout: float = 10.0) -> int | None:
        return self.statuses.get(timeout=timeout)

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


@pytest.mark.parametrize("service", ["", "kvd.v1.Kvd"])
def test_sigterm_turns_health_not_serving_and_exits_0(daemon: Daemon, service: str) -> None:
    watch = HealthWatch(daemon, service)
    try:
        assert watch.next() == SERVING
        daemon.signal(signal.SIGTERM)
        assert watch.next() == NOT_SERVING
    finally:
        watch.close()  # an open Watch stream would hold the daemon for its whole shutdown grace period
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=30) == 0
    # A clean stop removes both sockets, so the next start needs no stale-socket cleanup.
    assert not daemon.socket.exists()
    assert not daemon.credential_socket.exists()


def test_sigterm_drains_an_operation_in_flight(daemon_factory: DaemonFactory) -> None:
    """A save accepted before SIGTERM still completes, and its notice still arrives, while health is NOT_SERVING."""
    daemon = daemon_factory(capacity_bytes=64 * MiB, slab_bytes=1 * MiB)
    spec = CacheSpec(num_layers=2, num_blocks=256, block_size=16, kv_heads=8, head_dim=128)  # 32 MiB, 128 KiB blocks
    caches = make_caches(spec)
    pairs = [(i, block_hash(i, "drain")) for i in range(spec.num_blocks)]
    fill(caches, spec, pairs)
    stub = daemon.stub()
    session = RawSession(stub, stub.RegisterSession(cpu_register_request(daemon.socket, spec, caches, "m-drain")))
    watch = HealthWatch(daemon)
    try:
        assert watch.next() == SERVING
        accepted = stub.Save(transfer(session.response, pairs), timeout=5)
        daemon.signal(signal.SIGTERM)
        assert watch.next() == NOT_SERVING
        watch.close()
        notice = session.watcher.wait(accepted.operation_id, timeout=30)
        assert notice.ok, notice.error
        assert notice.bytes_moved == 32 * MiB
        session.watcher.ended.get(timeout=30)  # then the session closes and its Watch stream ends
        assert daemon.proc is not None and daemon.proc.wait(timeout=30) == 0
    finally:
        watch.close()
        session.watcher.close()


def test_draining_daemon_refuses_new_work(daemon: Daemon, spec: CacheSpec) -> None:
    """After SIGTERM (once health says so), a registration is refused as "retry later", never given a session."""
    probe = daemon.new_channel()
    health = health_pb2_grpc.HealthStub(probe)
    daemon.signal(signal.SIGTERM)

    def not_serving() -> bool:
        try:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status != SERVING
        except grpc.RpcError:
            return True  # already gone

    wait_for(not_serving, timeout=10, what="NOT_SERVING")
    with pytest.raises(grpc.RpcError) as err:
        request = lookup_only_request(None, "m-drain2", fingerprint(spec))  # the credential socket may be gone
        kvd_pb2_grpc.KvdStub(probe).RegisterSession(request, timeout=5)
    probe.close()
    # Refused while draining (UNAVAILABLE), cancelled by the stopping server, or nobody listening any more: the
    # client maps each of them to Unavailable, i.e. recompute now and retry later.
    assert type(from_rpc_error(err.value)) is Unavailable, err.value
    assert daemon.proc is not None and daemon.proc.wait(timeout=30) == 0


def test_restart_on_the_same_socket_after_kill(daemon: Daemon) -> None:
    first = daemon.stats().boot_id
    assert daemon.kill() == -signal.SIGKILL
    assert daemon.socket.exists()  # a crash leaves the socket file behind; the next start must cope
    daemon.start()
    assert daemon.stats().boot_id != first


def test_second_daemon_on_a_live_socket_refuses(daemon: Daemon) -> None:
    other = Daemon(daemon.workdir)
    try:
        other.start(wait=False)
        assert other.proc is not None
        assert other.proc.wait(timeout=30) != 0
    finally:
        other.close()
    assert daemon.health() == SERVING  # the first one was not disturbed


# -- reflection and sockets -------------------------------------------------------------------------------------


def test_reflection_lists_the_services(daemon: Daemon) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(daemon.channel())
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"kvd.v1.Kvd", "grpc.health.v1.Health"} <= names


def test_reflection_describes_the_kvd_service(daemon: Daemon) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(daemon.channel())
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvd.v1.Kvd")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert responses and responses[0].file_descriptor_response.file_descriptor_proto


def test_sockets_are_mode_0600(daemon: Daemon) -> None:
    for path in (daemon.socket, daemon.credential_socket):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))


# -- sessions end: process exit (pidfd) and lease expiry ---------------------------------------------------------


def test_kill_9_of_a_worker_frees_its_session(daemon: Daemon, worker_factory: WorkerFactory, spec: CacheSpec) -> None:
    keep = worker_factory(daemon.socket, spec, "m-reap", name="keep")
    doomed = worker_factory(daemon.socket, spec, "m-reap", name="doomed")
    keep_id = session_label(keep.wait_ready()["session_id"])
    doomed_id = session_label(doomed.wait_ready()["session_id"])
    pairs = [(i, block_hash(i, "reap")) for i in range(8)]
    doomed.fill(pairs)
    assert doomed.save(pairs)["ok"]
    assert daemon.session_labels() == {keep_id, doomed_id}

    killed_at = time.monotonic()
    doomed.kill()
    wait_for(lambda: daemon.session_labels() == {keep_id}, timeout=10, what="the killed worker's session to close")
    # The pidfd reaper closes it at once; the lease (600 ms) would be the upper bound without one.
    assert time.monotonic() - killed_at < 5
    # What it stored outlives it, and the other worker is unaffected.
    assert keep.lookup([h for _, h in pairs]) == {"hit_blocks": len(pairs)}
    assert session_label(keep.request("info")["session_id"]) == keep_id


def test_worker_exiting_without_unregistering_frees_its_session(
    daemon: Daemon, worker_factory: WorkerFactory, spec: CacheSpec
) -> None:
    w = worker_factory(daemon.socket, spec, "m-vanish")
    session_id = session_label(w.wait_ready()["session_id"])
    assert session_id in daemon.session_labels()
    w.proc.stdin.write('{"cmd": "vanish"}\n')  # type: ignore[union-attr]
    w.proc.stdin.flush()  # type: ignore[union-attr]
    assert w.proc.wait(timeout=10) == 0
    wait_for(lambda: session_id not in daemon.session_labels(), timeout=10, what="the session to close")


def test_a_silent_session_expires_after_its_lease(daemon: Daemon, spec: CacheSpec) -> None:
    """Its process lives on (this one) but stops heart-beating: only the lease ends the session."""
    stub = daemon.stub()
    response = stub.RegisterSession(lookup_only_request(daemon.socket, "m-lease", fingerprint(spec)), timeout=5)
    assert response.lease_ms == daemon.lease_ms
    registered_at = time.monotonic()
    label = session_label(response.session_id)
    session = next(s for s in daemon.stats().sessions if s.session_id == label)
    assert session.transport == "none"
    assert session.pid == os.getpid()

    # Heart-beating keeps it alive well past one lease...
    while time.monotonic() - registered_at < 2.5 * daemon.lease_ms / 1000:
        assert stub.Heartbeat(scoped(kvd_pb2.HeartbeatRequest, response), timeout=5).boot_id
        time.sleep(daemon.lease_ms / 1000 / 4)
    assert label in daemon.session_labels()

    # ...and once it stops, the session is gone within about a lease.
    last_beat = time.monotonic()
    wait_for(lambda: label not in daemon.session_labels(), timeout=10, what="the lease to expire")
    elapsed = time.monotonic() - last_beat
    assert elapsed >= 0.8 * daemon.lease_ms / 1000, elapsed  # not before the lease...
    assert elapsed < 5 * daemon.lease_ms / 1000, elapsed  # ...and not long after it (sweeps: lease / 4)
    with pytest.raises(grpc.RpcError) as err:
        stub.Heartbeat(scoped(kvd_pb2.HeartbeatRequest, response), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_lookups_renew_the_lease_too(daemon: Daemon, spec: CacheSpec) -> None:
    stub = daemon.stub()
    response = stub.RegisterSession(lookup_only_request(daemon.socket, "m-lease2", fingerprint(spec)), timeout=5)
    label = session_label(response.session_id)
    start = time.monotonic()
    while time.monotonic() - start < 2 * daemon.lease_ms / 1000:
        stub.Lookup(scoped(kvd_pb2.LookupRequest, response, block_hashes=[b"x"]), timeout=5)
        time.sleep(daemon.lease_ms / 1000 / 4)
    assert label in daemon.session_labels()
    stub.Unregister(scoped(kvd_pb2.UnregisterRequest, response), timeout=5)
    assert label not in daemon.session_labels()


def test_blocks_outlive_the_session_that_saved_them(daemon: Daemon, spec: CacheSpec) -> None:
    caches = make_caches(spec)
    pairs = [(i, block_hash(i, "outlive")) for i in range(4)]
    fill(caches, spec, pairs)
    stub = daemon.stub()
    with RawSession(stub, stub.RegisterSession(cpu_register_request(daemon.socket, spec, caches, "m-out"))) as s:
        assert s.save(pairs).ok
    assert lookup_hits(stub, daemon.socket, "m-out", fingerprint(spec), [h for _, h in pairs]) == 4
