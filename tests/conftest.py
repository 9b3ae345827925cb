"""Shared fixtures: a real daemon on a temporary socket, and real worker processes (see tests/helpers)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# tests.helpers must be importable however pytest was started (and by the worker processes, via PYTHONPATH).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.helpers.daemon import Daemon  # noqa: E402
from tests.helpers.kvdata import CacheSpec  # noqa: E402
from tests.helpers.worker import WorkerProcess  # noqa: E402

DaemonFactory = Callable[..., Daemon]
WorkerFactory = Callable[..., WorkerProcess]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Remember each phase's outcome on the item, so fixtures can attach the daemon's log to a failure.
    report = yield
    setattr(item, f"_kvd_report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"_kvd_report_{when}", None), "failed", False) for when in ("setup", "call")
    )


@pytest.fixture
def daemon_factory(request: pytest.FixtureRequest) -> Iterator[DaemonFactory]:
    """`daemon_factory(**Daemon kwargs, start=True)`: as many daemons as a test needs, each stopped afterwards."""
    made: list[Daemon] = []

    def make(*, start: bool = True, **kwargs: Any) -> Daemon:
        daemon = Daemon(**kwargs)
        made.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    for daemon in made:
        if _failed(request):
            print(f"---- daemon log ({daemon.socket}) ----\n{daemon.log_text()}")
        daemon.close()


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> Daemon:
    """A SERVING daemon: 64 MiB pool of 1 MiB slabs, 600 ms lease."""
    return daemon_factory()


@pytest.fixture
def spec() -> CacheSpec:
    """2 layers of [2, 64, 16, 2, 32] bf16: 8 KiB blocks."""
    return CacheSpec()


@pytest.fixture
def worker_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkerFactory]:
    """`worker_factory(socket, spec, model_id, name=...)`: worker processes, killed afterwards if still alive."""
    made: list[WorkerProcess] = []

    def make(socket: Path, spec: CacheSpec, model_id: str, **kwargs: Any) -> WorkerProcess:
        kwargs.setdefault("log_path", tmp_path / f"worker{len(made)}.log")
        worker = WorkerProcess(socket, spec, model_id, **kwargs)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.ask_exit()  # all at once: each takes a while to unregister and exit
    for worker in made:
        worker.close(timeout=5)
        if _failed(request) and worker.log_path is not None and worker.log_path.exists():
            print(f"---- worker {worker.pid} log ----\n{worker.log_path.read_text(errors='replace')[-4000:]}")
