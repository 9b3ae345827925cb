"""What the security tests share: the documented set-up for workers of other users, raw requests an attacker would
send, and a session driven from an agent process (tests/security/agent.py) of another uid.

Every request here is built from the generated messages and sent as bytes, so the same code talks to a daemon of any
version; a field this wire does not have yet (a session key) is simply left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from kvd_client.wire.kvd.v1 import kvd_pb2

from tests.helpers.rpc import namespace_pb

NOBODY = 65534  # an unprivileged uid the daemon allows (allowed_uids)
OUTSIDER = 65533  # an unprivileged uid the daemon does not allow
ADDR = 0x3E0000000000  # where holders and attackers map their buffers (free under x86-64 ASLR in both)

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: processes of other uids, setuid programs")

# The documented set-up for workers of other users: the socket open to everyone, the uids listed.
OTHER_USERS_ENV = {"KVD_SOCKET_MODE": "0666", "KVD_ALLOWED_UIDS": f"[{NOBODY}]"}


@dataclass(frozen=True, slots=True)
class SessionRef:
    """What a client holds after RegisterSession: the id and, where the wire has one, the session key."""

    id: str
    key: bytes = b""

    @classmethod
    def of(cls, response: bytes | kvd_pb2.RegisterSessionResponse) -> SessionRef:
        if isinstance(response, bytes):
            response = kvd_pb2.RegisterSessionResponse.FromString(response)
        return cls(response.session_id, bytes(getattr(response, "session_key", b"")))


def _has_field(message: object, name: str) -> bool:
    return name in message.DESCRIPTOR.fields_by_name  # type: ignore[attr-defined]


def scoped(message: kvd_pb2.LookupRequest | kvd_pb2.TransferRequest | kvd_pb2.HeartbeatRequest
           | kvd_pb2.UnregisterRequest | kvd_pb2.WatchRequest, session: SessionRef) -> bytes:
    """`message` addressed to `session` (id, and key where the wire carries one), serialised."""
    message.session_id = session.id
    if session.key and _has_field(message, "session_key"):
        message.session_key = session.key  # type: ignore[union-attr]
    return message.SerializeToString()


def lookup(session: SessionRef, hashes: Sequence[bytes]) -> bytes:
    return scoped(kvd_pb2.LookupRequest(block_hashes=list(hashes)), session)


def transfer(session: SessionRef, pairs: Iterable[tuple[int, bytes]]) -> bytes:
    blocks = [kvd_pb2.BlockTransfer(block_index=i, block_hash=h) for i, h in pairs]
    return scoped(kvd_pb2.TransferRequest(blocks=blocks), session)


def raw_layout(nblocks: int, block_bytes: int) -> kvd_pb2.KvLayout:
    """One uint8 layer of `nblocks` blocks of `block_bytes` each: any buffer can be described this way."""
    layer = kvd_pb2.LayerLayout(name="raw", shape=[nblocks, block_bytes], dtype=kvd_pb2.DTYPE_UINT8, block_dim=0)
    return kvd_pb2.KvLayout(layers=[layer], block_size_tokens=16)


def raw_cpu_request(
    token: bytes, addr: int, nblocks: int, block_bytes: int, model_id: str, pid: int = 0
) -> kvd_pb2.RegisterSessionRequest:
    """A CPU session over `nblocks * block_bytes` bytes at `addr` of the token holder's memory."""
    return kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb(model_id, "fp-raw"),
        layout=raw_layout(nblocks, block_bytes),
        pid=pid,
        credential_token=token,
        cpu=kvd_pb2.CpuMemory(layers=[kvd_pb2.CpuRegion(address=addr, nbytes=nblocks * block_bytes)]),
        worker_name="attack",
    )


def lookup_only_request(token: bytes, model_id: str, layout_fingerprint: str) -> kvd_pb2.RegisterSessionRequest:
    return kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb(model_id, layout_fingerprint), credential_token=token, worker_name="attack-lookup"
    )


def cuda_request(
    token: bytes, block_bytes: int, nblocks: int = 4, model_id: str = "m-cuda"
) -> kvd_pb2.RegisterSessionRequest:
    """A CUDA session over one allocation (its IPC handle made up: nothing here needs a GPU to be refused)."""
    nbytes = nblocks * block_bytes
    return kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb(model_id, "fp-cuda"),
        layout=raw_layout(nblocks, block_bytes),
        credential_token=token,
        cuda=kvd_pb2.CudaMemory(
            device_uuid="GPU-00000000-0000-0000-0000-000000000000",
            allocations=[kvd_pb2.CudaAllocation(ipc_handle=bytes(64), nbytes=nbytes)],
            layers=[kvd_pb2.CudaLayer(allocation=0, offset=0, nbytes=nbytes)],
        ),
        worker_name="attack-cuda",
    )


def token_of(agent: object, socket: Path) -> bytes:
    """A credential token for `agent` (fails the test if the daemon refuses one)."""
    data: bytes = agent.credential_bytes(socket)  # type: ignore[attr-defined]
    if len(data) != 32:
        pytest.fail(f"the credential socket refused a token: {data[:200]!r}")
    return data


class AgentSession:
    """A session registered and driven by an agent process: every call goes out from that process's uid."""

    def __init__(self, agent: object, socket: Path, session: SessionRef) -> None:
        self.agent = agent
        self.socket = socket
        self.ref = session

    def call(self, method: str, request: bytes) -> tuple[str, str, bytes]:
        result: tuple[str, str, bytes] = self.agent.call(self.socket, method, request)  # type: ignore[attr-defined]
        return result

    def transfer(self, method: str, pairs: Iterable[tuple[int, bytes]]) -> tuple[str, kvd_pb2.CompletionNotice | None]:
        """Save or Load, then its completion notice: ("OK", notice), or (the refusal's code, None)."""
        code, details, _ = self.call(method, transfer(self.ref, pairs))
        if code != "OK":
            return f"{code}: {details}", None
        watch = scoped(kvd_pb2.WatchRequest(), self.ref)
        wcode, notices = self.agent.watch(self.socket, watch, count=1)  # type: ignore[attr-defined]
        if not notices:
            return f"watch {wcode}", None
        return "OK", kvd_pb2.CompletionNotice.FromString(notices[0])

    def lookup(self, hashes: Sequence[bytes]) -> tuple[str, int]:
        code, details, response = self.call("Lookup", lookup(self.ref, hashes))
        if code != "OK":
            return f"{code}: {details}", 0
        return "OK", kvd_pb2.LookupResponse.FromString(response).hit_blocks


def register(agent: object, socket: Path, request: kvd_pb2.RegisterSessionRequest) -> tuple[str, AgentSession | None]:
    """RegisterSession from `agent`: ("OK", its session) or ("CODE: details", None)."""
    code, details, response = agent.call(socket, "RegisterSession", request.SerializeToString())  # type: ignore[attr-defined]
    if code != "OK":
        return f"{code}: {details}", None
    return "OK", AgentSession(agent, socket, SessionRef.of(response))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raw_call(channel: grpc.Channel, method: str, request: bytes, timeout: float = 10.0) -> tuple[str, str, bytes]:
    """One unary kvd.v1.Kvd call with raw bytes from this process: (status code name, details, response)."""
    call = channel.unary_unary(f"/kvd.v1.Kvd/{method}")
    try:
        response = call(request, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", b""
    return "OK", "", response


def raw_watch(channel: grpc.Channel, request: bytes, timeout: float = 1.0) -> tuple[str, list[bytes]]:
    """A Watch from this process for `timeout` s: (how it ended, the notices it got). A stream that stays open
    ends as DEADLINE_EXCEEDED: the daemon accepted it."""
    notices: list[bytes] = []
    try:
        for notice in channel.unary_stream("/kvd.v1.Kvd/Watch")(request, timeout=timeout):
            notices.append(notice)
    except grpc.RpcError as exc:
        return exc.code().name, notices
    return "OK", notices
