"""The published index is per tenant: a process of another uid (another tenant) sees only its own tenant's index,
never the blocks of a root worker in the same model and layout, cannot get another session's index without its key
and its process, cannot open another process's index descriptor, and cannot write the index it was given.

Runs as root (processes of two uids); skipped otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvd_client.index import group_key, label_of
from kvd_client.wire.kvd.v1 import kvd_pb2

from tests.conftest import WorkerFactory
from tests.helpers.daemon import Daemon, wait_for
from tests.helpers.kvdata import CacheSpec, block_hash
from tests.helpers.rpc import fingerprint, layout_pb, namespace_pb
from tests.security.conftest import AgentFactory
from tests.security.kit import NOBODY, register, requires_root, token_of

pytestmark = requires_root

MODEL = "m-index-tenants"
PREFIX = [(i, block_hash(i, "index-tenant")) for i in range(4)]


def _index_descriptors(pid: int) -> list[str]:
    """/proc/<pid>/fd paths of the process's kvd index memfds."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith("/memfd:kvd-index"):
                out.append(path)
        except OSError:
            continue
    return out


def test_a_tenant_sees_and_maps_only_its_own_index(
    other_users_daemon: Daemon, worker_factory: WorkerFactory, agents: AgentFactory, spec: CacheSpec
) -> None:
    daemon = other_users_daemon
    victim = worker_factory(daemon.socket, spec, MODEL, name="victim")  # root: another tenant than NOBODY
    info = victim.wait_ready()
    victim.fill(PREFIX)
    assert victim.save(PREFIX)["ok"]
    hashes = [h.hex() for _, h in PREFIX]
    wait_for(lambda: victim.request("info")["index_mapped"], 10, what="the victim's index")
    victim_fds = _index_descriptors(victim.pid)
    assert victim_fds, "the victim maps no index: nothing to attack"

    # The attacker's own memory session in the same model and layout: its tenant gets an index of its own.
    attacker = agents(NOBODY)
    nbytes = spec.num_blocks * spec.block_bytes_per_layer
    regions = [kvd_pb2.CpuRegion(address=attacker.alloc(nbytes), nbytes=nbytes) for _ in spec.layer_names]
    request = kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb(MODEL, fingerprint(spec)),
        layout=layout_pb(spec),
        credential_token=token_of(attacker, daemon.socket),
        cpu=kvd_pb2.CpuMemory(layers=regions),
        worker_name="attacker",
    )
    status, session = register(attacker, daemon.socket, request)
    assert session is not None, status
    own = attacker.request(
        "shared", socket=str(daemon.socket), session=session.ref.id, key=session.ref.key.hex(), hashes=hashes,
        foreign=victim_fds,
    )  # fmt: skip
    assert "refused" not in own, own
    assert own["hits"] == 0, "another tenant's index showed the victim's cached prefix"
    assert own["label"] == label_of(group_key(f"uid:{NOBODY}", MODEL, fingerprint(spec), 1)).hex()
    assert all(v.startswith("refused") for v in own["writes"].values()), own["writes"]
    assert all(v.startswith("refused") for v in own["foreign"].values()), own["foreign"]

    # The victim's session: the attacker has neither its key nor its process.
    victim_key = bytes.fromhex(info["session_key"])
    for key in (b"", victim_key):
        stolen = attacker.request(
            "shared", socket=str(daemon.socket), session=info["session_id"], key=key.hex(), hashes=hashes
        )
        assert "refused" in stolen, f"another tenant got the victim's shared memory: {stolen}"
    # And the victim's own view is intact.
    assert victim.lookup([h for _, h in PREFIX]) == {"hit_blocks": len(PREFIX)}
    assert Path(daemon.socket).exists()
