"""kvd's connector driven by the real scheduler of every supported vLLM release, on CPU, against a real daemon.

The installed vLLM is the CPU build of 0.32; 0.33 and 0.34 ship as CUDA wheels only, so `make test` fetches their
Python sources (tests/client/vllm_releases.py) and each runs here from them, with the CPU torch of this
environment. For each release, tests/client/vllm_release_driver.py steps vLLM's own Scheduler with a fake model
that writes checkable KV: lookups, async loads (every loaded block is compared byte for byte with what the model
would have written), saves, finished requests, preemption and resumption (the path 0.34 changed). The releases run
in order against one daemon, so each later release must load blocks an earlier one saved: engines of different
vLLM releases share blocks when the bytes are the same.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import Daemon

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "vllm_release_driver.py"
REPO = HERE.parents[1]
RELEASES = ["0.32 (installed)", "0.33.0", "0.34.0"]

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def releases_dir() -> Path:
    """Where `make test` put the fetched releases: next to the environment running the tests."""
    return Path(os.environ.get("KVD_VLLM_RELEASES") or Path(sys.prefix) / "vllm-releases")


def release_path(release: str) -> str:
    """The PYTHONPATH entry that makes `release` the importable vLLM ("" for the installed one)."""
    if "installed" in release:
        return ""
    path = releases_dir() / release
    if not (path / "vllm" / "__init__.py").exists():
        error = releases_dir() / f"{release}.error"
        why = error.read_text().strip() if error.exists() else "not fetched"
        pytest.skip(f"vLLM {release} is not available here ({why}); `make test` fetches it into {releases_dir()}")
    return str(path)


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    daemon = Daemon(capacity_bytes=256 << 20)
    daemon.start()
    yield daemon
    daemon.close()


@pytest.fixture(scope="module")
def reports() -> dict[str, dict[str, Any]]:
    return {}


def run_driver(release: str, model: Path, daemon: Daemon, out: Path) -> dict[str, Any]:
    paths = [p for p in (release_path(release), str(REPO), str(REPO / "client")) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    cmd = [sys.executable, str(DRIVER), "--model", str(model), "--socket", str(daemon.socket), "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"driver failed on vLLM {release}:\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("release", RELEASES)
def test_real_scheduler_of_each_release(
    release: str, tiny_model: Path, shared_daemon: Daemon, reports: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    report = run_driver(release, tiny_model, shared_daemon, tmp_path / "report.json")
    assert report["version"].startswith(release.split()[0]), report["version"]
    # Every method the connector overrides has this release's signature; every abstract one is implemented.
    assert report["api_mismatches"] == []
    assert report["daemon_ready"]
    # The small cache made vLLM preempt and resume requests; loads happened and every loaded block was right.
    assert report["preempted"] > 0
    assert report["loaded_blocks"][1] > 0
    assert report["checked_blocks"] > 0
    assert report["mismatches"] == []
    for earlier, other in reports.items():
        # Same bytes, same namespace: this release found the blocks the earlier one saved.
        assert report["fingerprint"] == other["fingerprint"], f"{release} and {earlier} would not share blocks"
    if reports:
        assert report["loaded_blocks"][0] > 0, "the first run found nothing an earlier release saved"
    reports[release] = report
