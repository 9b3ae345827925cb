"""Driver-mapped KV memory without a GPU: the descriptor exchange on the credential socket, the daemon's checks of
a driver-mapped description, that no descriptor outlives a registration in the daemon, and the worker's planning
of mappings into ranges. (The mapping itself is tested on the GPU: tests/kvd/test_cuda_ipc.py.)"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator

import grpc
import pytest
from kvd_client.credentials import fetch_token
from kvd_client.errors import InvalidArgument
from kvd_client.fdpass import FDS_PER_MESSAGE, FdPassError, receive_fds, send_fds
from kvd_client.vmm import Mapping, find_mapping, plan_ranges
from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

from tests.helpers.daemon import Daemon, wait_for
from tests.helpers.kvdata import CacheSpec
from tests.helpers.rpc import fingerprint, layout_pb, namespace_pb

SPEC = CacheSpec()
MiB = 1 << 20


def _open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def pipes() -> Iterator[list[int]]:
    """Read ends of pipes whose write ends stay here, so a received descriptor can be proven to be the same pipe."""
    ends = [os.pipe() for _ in range(2 * FDS_PER_MESSAGE + 17)]
    yield [r for r, _ in ends]
    for r, w in ends:
        os.close(r)
        os.close(w)


def _exchange(fds: list[int]) -> list[int]:
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(10)
        b.settimeout(10)
        sender = threading.Thread(target=send_fds, args=(a, fds))
        sender.start()
        received = receive_fds(b)
        sender.join(10)
    return received


def test_descriptors_cross_in_batches(pipes: list[int]) -> None:
    received = _exchange(pipes)
    try:
        assert len(received) == len(pipes)
        assert all(os.path.samestat(os.fstat(x), os.fstat(y)) for x, y in zip(received, pipes, strict=True))
    finally:
        for fd in received:
            os.close(fd)


def test_a_worker_with_nothing_to_pass_just_closes() -> None:
    a, b = socket.socketpair()
    with b:
        a.close()
        assert receive_fds(b) == []


@pytest.mark.parametrize("header", [(b"KVFX", 1, 1), (b"KVFD", 2, 2), (b"KVFD", 1, 0)])
def test_a_malformed_exchange_keeps_no_descriptor(pipes: list[int], header: tuple[bytes, int, int]) -> None:
    before = _open_fds()
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        payload = struct.pack("<4sII", *header)
        a.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", pipes[0]))])
        a.close()
        with pytest.raises(FdPassError):
            receive_fds(b)
    assert _open_fds() == before  # the socket pair is gone, and nothing received is left open


# -- against the daemon ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with Daemon() as d:
        yield d


def _vmm_request(token: bytes, chunks: list[tuple[int, int, int]], nbytes: int) -> kvd_pb2.RegisterSessionRequest:
    layer = SPEC.num_blocks * SPEC.block_bytes_per_layer
    return kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb("m-vmm", fingerprint(SPEC)),
        layout=layout_pb(SPEC),
        pid=os.getpid(),
        credential_token=token,
        cuda=kvd_pb2.CudaMemory(
            device_uuid="GPU-00000000-0000-0000-0000-000000000000",
            allocations=[
                kvd_pb2.CudaAllocation(
                    nbytes=nbytes,
                    vmm_chunks=[kvd_pb2.CudaVmmChunk(offset=o, nbytes=n, fd_index=i) for o, n, i in chunks],
                )
            ],
            layers=[kvd_pb2.CudaLayer(allocation=0, offset=i * layer, nbytes=layer) for i in range(SPEC.num_layers)],
        ),
    )


def _register(
    daemon: Daemon, pipes: list[int], chunks: list[tuple[int, int, int]], nbytes: int
) -> tuple[grpc.StatusCode, str]:
    stub: kvd_pb2_grpc.KvdStub = daemon.stub()
    token, _ = fetch_token(daemon.socket, 10.0, pipes[:3])
    try:
        stub.RegisterSession(_vmm_request(token, chunks, nbytes), timeout=10)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("chunks", "nbytes", "why"),
    [
        ([(0, 2 * MiB, 0), (4 * MiB, 2 * MiB, 1)], 6 * MiB, "without gaps"),
        ([(0, 4 * MiB, 0), (2 * MiB, 2 * MiB, 1)], 4 * MiB, "without gaps"),
        ([(0, 2 * MiB, 0)], 4 * MiB, "cover"),
        ([(0, 2 * MiB, 7)], 2 * MiB, "was not passed"),
    ],
)
def test_driver_mapped_description_is_checked(
    daemon: Daemon, pipes: list[int], chunks: list[tuple[int, int, int]], nbytes: int, why: str
) -> None:
    code, details = _register(daemon, pipes, chunks, nbytes)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert why in details


def test_no_descriptor_outlives_a_registration(daemon: Daemon, pipes: list[int]) -> None:
    baseline = _open_fds(daemon.pid)
    for _ in range(5):
        # Well-formed, but this daemon sees no GPU: refused, and the passed descriptors must be closed all the same.
        code, _ = _register(daemon, pipes, [(0, 2 * MiB, 0), (2 * MiB, 2 * MiB, 1)], 4 * MiB)
        assert code != grpc.StatusCode.OK
        code, _ = _register(daemon, pipes, [(0, 2 * MiB, 9)], 2 * MiB)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    wait_for(lambda: _open_fds(daemon.pid) <= baseline, timeout=10, what="the daemon's descriptors back to baseline")
    assert daemon.running


# -- the worker's planning (pure) ------------------------------------------------------------------------------


G = 2 * MiB


def _handles(layout: dict[int, int]) -> object:
    """handle_at over granule -> handle (absent: unmapped)."""
    return lambda va: layout.get(va)


def test_find_mapping_walks_to_the_allocation_edges() -> None:
    # Allocation 7 mapped over granules 10..14, allocation 8 right after it.
    layout = {g * G: 7 for g in range(10, 15)} | {g * G: 8 for g in range(15, 17)}
    assert find_mapping(12 * G + 100, G, _handles(layout)) == Mapping(10 * G, 5 * G, 7)  # type: ignore[arg-type]
    assert find_mapping(16 * G, G, _handles(layout)) == Mapping(15 * G, 2 * G, 8)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        find_mapping(3 * G, G, _handles(layout))  # type: ignore[arg-type]


def test_plan_joins_mappings_a_tensor_crosses() -> None:
    a, b, c, d = Mapping(0, 4 * G, 1), Mapping(4 * G, 4 * G, 2), Mapping(8 * G, 2 * G, 3), Mapping(20 * G, G, 4)
    tensors = [(G, 5 * G), (8 * G, G), (20 * G, 100)]
    ranges = plan_ranges(tensors, [d, b, c, a])
    assert [(r.start, r.end, [m.handle for m in r.mappings]) for r in ranges] == [
        (0, 8 * G, [1, 2]),  # the first tensor crosses from a into b
        (8 * G, 10 * G, [3]),  # adjacent, but no tensor crosses: its own range
        (20 * G, 21 * G, [4]),
    ]
    with pytest.raises(InvalidArgument):
        plan_ranges([(0, 11 * G)], [a, b, c])  # c ends at 10 granules: the tensor is not covered
