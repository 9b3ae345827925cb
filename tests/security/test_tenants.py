"""Attack 4 of issue #12: blocks were shared node-wide by (model, layout, TP), across users.

Another user could probe which prompt prefixes a worker had cached (Lookup answers), poison what it would load (the
first save of a hash wins, nothing verifies it), and lock its namespace to a bogus layout. Now the namespace includes
a tenant taken from the verified peer (its uid unless the operator maps several uids to one tenant on purpose).

Runs as root (processes of two uids); skipped otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from kvd_client.wire.kvd.v1 import kvd_pb2

from tests.conftest import WorkerFactory
from tests.helpers.daemon import Daemon
from tests.helpers.kvdata import CacheSpec, block_hash
from tests.helpers.rpc import fingerprint, layout_pb, namespace_pb
from tests.security.agent import Agent
from tests.security.conftest import AgentFactory
from tests.security.kit import (
    NOBODY,
    AgentSession,
    SessionRef,
    lookup_only_request,
    raw_cpu_request,
    register,
    requires_root,
    token_of,
)

pytestmark = requires_root

PREFIX = [(i, block_hash(i, "tenant-prefix")) for i in range(4)]


def _attacker_cpu_session(agent: Agent, daemon: Daemon, spec: CacheSpec, model: str, fill: int) -> AgentSession:
    """A CPU session over caches shaped like `spec` in the attacker's memory, every byte `fill`."""
    nbytes = spec.num_blocks * spec.block_bytes_per_layer
    regions = [kvd_pb2.CpuRegion(address=agent.alloc(nbytes, fill=fill), nbytes=nbytes) for _ in spec.layer_names]
    request = kvd_pb2.RegisterSessionRequest(
        namespace=namespace_pb(model, fingerprint(spec)),
        layout=layout_pb(spec),
        credential_token=token_of(agent, daemon.socket),
        cpu=kvd_pb2.CpuMemory(layers=regions),
        worker_name="attacker",
    )
    status, session = register(agent, daemon.socket, request)
    assert session is not None, f"the attacker's own session: {status}"
    return session


def test_lookup_does_not_answer_for_another_tenant(
    other_users_daemon: Daemon, worker_factory: WorkerFactory, agents: AgentFactory, spec: CacheSpec
) -> None:
    daemon = other_users_daemon
    victim = worker_factory(daemon.socket, spec, "m-probe", name="victim")  # root: another tenant than NOBODY
    victim.wait_ready()
    victim.fill(PREFIX)
    assert victim.save(PREFIX)["ok"]
    attacker = agents(NOBODY)
    status, session = register(
        attacker, daemon.socket, lookup_only_request(token_of(attacker, daemon.socket), "m-probe", fingerprint(spec))
    )
    assert session is not None, status
    status, hits = session.lookup([h for _, h in PREFIX])
    assert status == "OK", status
    assert hits == 0, f"uid {NOBODY} learned that another user's worker cached a {hits}-block prefix"


def test_save_does_not_poison_another_tenants_load(
    other_users_daemon: Daemon, worker_factory: WorkerFactory, agents: AgentFactory, spec: CacheSpec
) -> None:
    daemon = other_users_daemon
    target = PREFIX[0][1]
    attacker = _attacker_cpu_session(agents(NOBODY), daemon, spec, "m-poison", fill=0x41)
    status, notice = attacker.transfer("Save", [(0, target)])  # first, with garbage
    assert notice is not None and notice.ok, status

    victim = worker_factory(daemon.socket, spec, "m-poison", name="victim")
    victim.wait_ready()
    victim.fill([(0, target)])
    assert victim.save([(0, target)])["ok"]
    assert victim.load([(1, target)])["ok"]
    assert victim.verify([(1, target)]) == [], "the victim loaded another user's garbage for its own block"


def test_another_tenant_cannot_lock_a_namespace_to_its_layout(
    other_users_daemon: Daemon, worker_factory: WorkerFactory, agents: AgentFactory, spec: CacheSpec
) -> None:
    daemon = other_users_daemon
    attacker = agents(NOBODY)
    addr = attacker.alloc(4 * 4096)
    request = raw_cpu_request(token_of(attacker, daemon.socket), addr, 4, 4096, "m-lock")
    request.namespace.layout_fingerprint = fingerprint(spec)  # the victim's namespace, with a layout of its own
    status, squatter = register(attacker, daemon.socket, request)
    assert squatter is not None, status

    victim = worker_factory(daemon.socket, spec, "m-lock", name="victim", ready_timeout=5.0)
    hello = victim.hello()
    assert hello.get("event") == "ready", f"another user's session locked the victim out of its namespace: {hello}"



def test_uids_mapped_to_one_tenant_share_blocks_on_purpose(
    other_users_daemon_factory: Callable[..., Daemon], worker_factory: WorkerFactory, agents: AgentFactory,
    spec: CacheSpec,
) -> None:
    """The operator lists root and NOBODY in one tenant: now NOBODY sees (and may load) what root's worker stored."""
    daemon = other_users_daemon_factory(env={"KVD_TENANTS": json.dumps({"shared": [0, NOBODY]})})
    victim = worker_factory(daemon.socket, spec, "m-share", name="owner")
    victim.wait_ready()
    victim.fill(PREFIX)
    assert victim.save(PREFIX)["ok"]
    other = agents(NOBODY)
    request = lookup_only_request(token_of(other, daemon.socket), "m-share", fingerprint(spec))
    code, _, response = other.call(daemon.socket, "RegisterSession", request.SerializeToString())
    assert code == "OK"
    session = AgentSession(other, daemon.socket, SessionRef.of(response))
    assert kvd_pb2.RegisterSessionResponse.FromString(response).tenant == "shared"
    assert session.lookup([h for _, h in PREFIX]) == ("OK", len(PREFIX))
    assert {s.tenant for s in daemon.stats().sessions} == {"shared"}
