"""Fixtures of the security tests: a daemon set up for workers of other users, agents of other uids, a setuid copy
of the interpreter and a root-only secret."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import DaemonFactory
from tests.helpers.daemon import Daemon, child_env
from tests.helpers.kvdata import CacheSpec, make_caches
from tests.helpers.rpc import RawSession, cpu_register_request
from tests.security.agent import Agent
from tests.security.kit import NOBODY, OTHER_USERS_ENV

AgentFactory = Callable[..., Agent]
CPU_SESSION_MODEL = "m-cpu-session"  # the model of cpu_session's namespace
HOLDER = Path(__file__).with_name("holder.py")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every uid may enter (a daemon's own temporary directory is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="kvd-sec-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def other_users_daemon_factory(shared_dir: Path, daemon_factory: DaemonFactory) -> Callable[..., Daemon]:
    """`make(env={...})`: a daemon in the documented set-up for workers of other users (socket 0666, allowed_uids),
    on a socket every uid can reach; `env` adds to or overrides that set-up."""
    count = 0

    def make(env: dict[str, str] | None = None, **kwargs: Any) -> Daemon:
        nonlocal count
        count += 1
        workdir = shared_dir / f"d{count}"
        workdir.mkdir(mode=0o755)
        workdir.chmod(0o755)
        return daemon_factory(workdir=workdir, env={**OTHER_USERS_ENV, **(env or {})}, **kwargs)

    return make


@pytest.fixture
def other_users_daemon(other_users_daemon_factory: Callable[..., Daemon]) -> Daemon:
    return other_users_daemon_factory()


@pytest.fixture
def agents(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AgentFactory]:
    """`agents(uid)`: agent processes of `uid` (root only), closed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start processes of other uids")
    made: list[Agent] = []

    def make(uid: int = NOBODY, gid: int | None = None) -> Agent:
        log_path = tmp_path / f"agent{len(made)}.log"
        agent = Agent.start(uid, uid if gid is None else gid, env=child_env(), log_path=log_path)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()
    failed = any(getattr(getattr(request.node, f"_kvd_report_{w}", None), "failed", False) for w in ("setup", "call"))
    if failed:
        for log in sorted(tmp_path.glob("agent*.log")):
            print(f"---- {log.name} ----\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def setuid_python(shared_dir: Path) -> Path:
    """A setuid-root copy of this interpreter, in a directory every uid may enter; skip where setuid does not work
    (a nosuid mount, a container without the capability)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a setuid program")
    path = shared_dir / "python-suid"
    shutil.copy2(os.path.realpath(sys.executable), path)
    os.chown(path, 0, 0)
    path.chmod(0o4755)
    probe = subprocess.run(
        [str(path), "-I", "-c", "import os; print(os.geteuid())"],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "0":
        pytest.skip(f"a setuid copy of the interpreter does not run as root here: {probe.stderr.strip()[-300:]}")
    return path


@pytest.fixture
def secret(shared_dir: Path) -> tuple[Path, bytes]:
    """A root-only file (0600) of random bytes: (path, contents)."""
    value = b"ROOT-ONLY-SECRET" + secrets.token_bytes(4096 * 4 - 16)
    path = shared_dir / "secret"
    path.write_bytes(value)
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return path, value


@pytest.fixture
def holder_argv(setuid_python: Path, secret: tuple[Path, bytes]) -> Callable[[int, int], list[str]]:
    """`holder_argv(addr, nbytes)`: the argv an agent execs to become a setuid-root program holding the secret."""

    def argv(addr: int, nbytes: int) -> list[str]:
        return [str(setuid_python), "-I", str(HOLDER), str(secret[0]), str(addr), str(nbytes)]

    return argv


@pytest.fixture
def cpu_session(daemon: Daemon) -> Iterator[tuple[RawSession, dict[str, torch.Tensor], CacheSpec]]:
    """A CPU memory session registered by raw RPC (this process's caches), for attacks on what it is granted."""
    spec = CacheSpec()
    caches = make_caches(spec)
    stub = daemon.stub()
    response = stub.RegisterSession(cpu_register_request(daemon.socket, spec, caches, CPU_SESSION_MODEL), timeout=5)
    with RawSession(stub, response) as session:
        yield session, caches, spec
