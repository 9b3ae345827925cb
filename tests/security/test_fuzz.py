"""The protocol fuzzer (tests/security/fuzzer.py) against a real daemon: 2,000 seeded cases in CI.

Every answer a documented status of its method (never UNKNOWN or INTERNAL), the daemon alive and SERVING throughout,
no traceback in its log, and its RSS and open fds back in their starting band once the fuzzer's sessions are gone.
`bench/fuzz.py` runs the same fuzzer longer (10,000 cases and more) and prints its figures.
"""

from __future__ import annotations

import os

from tests.helpers.daemon import Daemon
from tests.security.fuzzer import Fuzzer, Target, band_problems

CASES = int(os.environ.get("KVD_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("KVD_FUZZ_SEED", "12"))


def test_fuzzed_requests_get_documented_answers_and_cost_nothing_lasting(daemon: Daemon) -> None:
    target = Target(daemon.socket, daemon.pid)
    try:
        report = Fuzzer(target, SEED).run(CASES)
    finally:
        target.close()
    summary = report.summary()
    assert report.cases == CASES
    assert not report.findings, (
        f"{len(report.findings)} undocumented answers (seed {SEED}); by method: {summary['by_method']};"
        f" the first: {summary['first_findings'][:3]}"
    )
    assert daemon.running and daemon.health() == 1
    assert not band_problems(report), f"{band_problems(report)}; {summary}"
    assert "Traceback" not in daemon.log_text(), daemon.log_text()[-3000:]
