"""The protocol fuzzer (tests/security/fuzzer.py) against a real daemon, longer than CI runs it.

Starts a daemon (`python -m kvd serve`, 64 MiB pool) on a temporary socket, sends `--cases` seeded cases (valid
requests, field and byte mutations, random bytes, methods that do not exist), and prints one JSON object: the answers
per method and status, every finding (an answer outside the method's documented statuses), the health checks that
failed, and the daemon's RSS and open fds at the start, peak and end next to the band they must return to.

    python bench/fuzz.py [--cases 10000] [--seed 12]

Exit status 0 when there is no finding and the daemon came back to its band, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers and tests.security

from tests.helpers.daemon import Daemon, MiB
from tests.security.fuzzer import Fuzzer, Target, band_problems

RSS_SLACK = 32 * MiB
FD_SLACK = 8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    with Daemon(capacity_bytes=64 * MiB, slab_bytes=1 * MiB, lease_ms=600) as daemon:
        target = Target(daemon.socket, daemon.pid)
        try:
            report = Fuzzer(target, args.seed).run(args.cases)
        finally:
            target.close()
        problems = band_problems(report, RSS_SLACK, FD_SLACK)
        alive = daemon.running and daemon.health() == 1
        tracebacks = daemon.log_text().count("Traceback")
        log_lines = len(daemon.log_text().splitlines())
    summary = {
        **report.summary(),
        "daemon_alive_and_serving": alive,
        "band": {"rss_slack_mib": RSS_SLACK / MiB, "fd_slack": FD_SLACK, "problems": problems},
        "daemon_log": {"lines": log_lines, "tracebacks": tracebacks},
    }
    print(json.dumps(summary, indent=2))
    return 0 if alive and not report.findings and not problems and not tracebacks else 1


if __name__ == "__main__":
    raise SystemExit(main())
