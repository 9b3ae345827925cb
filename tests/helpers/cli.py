"""Run the real `kvd` executable, as an operator would, and check how it fails.

The console script installed next to this interpreter is the one `make serve` and an operator run; `python -m kvd`
stands in where the package is not installed (it is the same entry point). PYTHONPATH carries through, so a
checkout's own `kvd` package is the one that runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from kvd.cli import EXIT_CODES


def kvd_command() -> list[str]:
    script = Path(sys.executable).parent / "kvd"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kvd"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any KVD_* an operator's shell may carry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
    env.update(extra)
    return env


def run_kvd(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*kvd_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else clean_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def documented(code: int) -> bool:
    """Whether `kvd --help` lists this exit code."""
    return any(line.split()[:1] == [str(code)] for line in EXIT_CODES.splitlines()[1:])


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Assert `kvd` failed with `code` (a documented one) and said so in one line naming each needle; that line.

    The line is the CLI's own (`kvd: ...`, `kvd serve: error: ...`) or, for a daemon that could not start, its one
    ERROR log line."""
    context = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == code, context
    assert documented(code), context
    assert "Traceback" not in done.stderr + done.stdout, context
    errors = [line for line in done.stderr.splitlines() if line.startswith("kvd") or " ERROR " in line]
    assert not re.search(r"^[EWF]\d{4} ", done.stderr, re.MULTILINE), context  # gRPC's own log lines
    assert len(errors) == 1, context
    for needle in needles:
        assert needle in errors[0], context
    return errors[0]


def grpcurl_path() -> str:
    """The grpcurl `make grpcurl` (and so `make test`) installs next to this interpreter, else one on PATH."""
    import shutil

    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.is_file() else shutil.which("grpcurl")
    if found is None:
        raise AssertionError("grpcurl is not installed: `make grpcurl` puts a static one in .venv/bin")
    return found
