"""What an operator runs to check on a daemon with several tiers: grpc.health.v1 List (through grpc and through a real
grpcurl), and the README's "Checking on it" block, run as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from tests.conftest import DaemonFactory
from tests.helpers.cli import clean_env, grpcurl_path
from tests.helpers.daemon import Daemon, wait_for
from tests.helpers.redis_servers import free_port
from tests.kvd.tiers.conftest import RedisServer

REPO = Path(__file__).resolve().parents[3]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def tiered(daemon_factory: DaemonFactory, redis_server: RedisServer, tmp_path: Path) -> Daemon:
    """A daemon with all three tiers: host memory, disk, Redis."""
    env = {"KVD_DISK__PATH": str(tmp_path / "disk"), "KVD_REDIS__URL": redis_server.url, "KVD_REDIS__TIMEOUT_MS": "300"}
    return daemon_factory(env=env)


def expected_services(daemon: Daemon) -> set[str]:
    tiers = [tier.name for tier in daemon.stats().tiers]
    assert len(tiers) == 3, tiers
    return {"", "kvd.v1.Kvd", *(f"kvd.v1.Kvd/tier/{name}" for name in tiers)}


def listed(daemon: Daemon) -> dict[str, int]:
    response = daemon.health_stub().List(health_pb2.HealthListRequest(), timeout=5)
    return {name: int(reply.status) for name, reply in response.statuses.items()}


def listed_when(daemon: Daemon, ready: Callable[[dict[str, int]], bool], what: str) -> dict[str, int]:
    """List's answer once `ready` holds for it (the daemon publishes tier health once a second)."""

    def check() -> dict[str, int] | None:
        statuses = listed(daemon)
        return statuses if ready(statuses) else None

    return wait_for(check, 15, what=what)


def test_health_list_names_the_daemon_and_every_tier(tiered: Daemon) -> None:
    want = expected_services(tiered)
    statuses = listed_when(tiered, lambda s: set(s) == want and set(s.values()) == {SERVING}, "every tier SERVING")
    for name, status in statuses.items():  # List agrees with Check, service by service
        assert tiered.health(name) == status, name


def test_health_list_shows_a_degraded_tier(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    # Nothing listens on the Redis port: that tier is NOT_SERVING, the daemon serves from the other two.
    env = {"KVD_DISK__PATH": str(tmp_path / "disk"), "KVD_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0"}
    daemon = daemon_factory(env=env)
    statuses = listed_when(daemon, lambda s: set(s) == expected_services(daemon), "every tier listed")
    assert statuses == {
        "": SERVING,
        "kvd.v1.Kvd": SERVING,
        "kvd.v1.Kvd/tier/host": SERVING,
        "kvd.v1.Kvd/tier/disk": SERVING,
        "kvd.v1.Kvd/tier/redis": NOT_SERVING,
    }


def grpcurl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [grpcurl_path(), "-plaintext", "-unix", str(daemon.socket), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_grpcurl_lists_services_and_every_tiers_health(tiered: Daemon) -> None:
    services = grpcurl(tiered, "list")
    assert services.returncode == 0, services.stderr
    assert {"kvd.v1.Kvd", "grpc.health.v1.Health"} <= set(services.stdout.split())

    want = expected_services(tiered)
    listed_when(tiered, lambda s: set(s) == want and set(s.values()) == {SERVING}, "every tier SERVING")
    done = grpcurl(tiered, "grpc.health.v1.Health/List")
    assert done.returncode == 0, done.stderr
    statuses = json.loads(done.stdout)["statuses"]
    assert set(statuses) == want
    assert {reply["status"] for reply in statuses.values()} == {"SERVING"}


def readme_checks() -> list[str]:
    """The command lines of the README's "Checking on it" block."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Checking on it") :]
    block = section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n") + 4)]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readmes_checks_run_as_written(tiered: Daemon) -> None:
    lines = readme_checks()
    # Two lines set up the operator's shell in the clone; here the interpreter's own bin directory stands in.
    setup = [line for line in lines if line.startswith((". .venv/bin/activate", "make grpcurl"))]
    assert len(setup) == 2, lines
    bindir = str(Path(sys.executable).parent)
    grpcurl_dir = str(Path(grpcurl_path()).parent)
    env = clean_env(KVD_SOCKET=str(tiered.socket), PATH=os.pathsep.join([bindir, grpcurl_dir, os.environ["PATH"]]))
    want = expected_services(tiered)
    listed_when(tiered, lambda s: set(s) == want, "every tier listed")
    outputs: list[str] = []
    shell = "set -e\n"
    for line in lines:
        if line not in setup:
            shell += f"{line}\necho '---- exit 0'\n"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, timeout=120, check=False)
    outputs = done.stdout.split("---- exit 0\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(outputs) == len(lines) - len(setup) + 1, done.stdout
    assert outputs[0].strip() == "SERVING"  # kvd health
    assert "kvd.v1.Kvd/tier/redis" in done.stdout  # Health/List
    assert "Traceback" not in done.stdout + done.stderr
