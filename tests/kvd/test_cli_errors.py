"""Operator mistakes at the command line: each is one line that says what is wrong, with a documented exit code,
and never a traceback. Every test runs the real `kvd` executable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvd.cli import EXIT_CODES, EXIT_OK, EXIT_USAGE
from tests.helpers.cli import clean_env, documented, one_line_error, run_kvd


def test_help_documents_every_exit_code() -> None:
    done = run_kvd("--help")
    assert done.returncode == EXIT_OK
    assert EXIT_CODES in done.stdout
    assert all(documented(code) for code in (0, 1, 2, 3, EXIT_USAGE, 130))


def test_an_unknown_option_is_named_not_a_missing_command() -> None:
    done = run_kvd("--bogus")
    line = one_line_error(done, EXIT_USAGE, "unrecognized arguments: --bogus")
    assert "required" not in line
    one_line_error(run_kvd(), EXIT_USAGE, "a COMMAND is required", "serve")


@pytest.mark.parametrize("command", ["serve", "config", "health", "stats"])
def test_a_subcommand_error_shows_that_subcommands_usage(command: str) -> None:
    done = run_kvd(command, "--bogus")
    one_line_error(done, EXIT_USAGE, f"kvd {command}: error: unrecognized arguments: --bogus")
    assert done.stderr.startswith(f"usage: kvd {command} ")


def test_a_bad_value_shows_the_subcommands_usage() -> None:
    done = run_kvd("serve", "--capacity", "lots")
    one_line_error(done, EXIT_USAGE, "--capacity", "'lots'")
    assert done.stderr.startswith("usage: kvd serve ")


# Each: (flags, environment, words the one error line must hold). serve must refuse exactly what config refuses,
# before it touches anything (no socket, no pool).
INVALID = [
    pytest.param([], {"KVD_METRICS__PORT": "70000"}, ["metrics.port", "65535", "70000"], id="metrics-port-range"),
    pytest.param(["--capacity", "1MiB"], {}, ["capacity_bytes 1MiB", "slab", "at least 64MiB"], id="below-a-slab"),
    pytest.param(["--socket", "/tmp/" + "s" * 100], {}, ["socket", "too long for a Unix socket"], id="socket-length"),
    pytest.param([], {"KVD_TCP": "127.0.0.1:7070"}, ["KVD_TCP", "tcp is gone"], id="tcp"),
    pytest.param([], {"KVD_SOCKET_MODE": "01777"}, ["socket_mode"], id="socket-mode"),
    pytest.param([], {"KVD_LEASE_MS": "soon"}, ["lease_ms", "'soon'"], id="not-a-number"),
]


@pytest.mark.parametrize(("flags", "env", "needles"), INVALID)
@pytest.mark.parametrize("command", ["config", "serve"])
def test_serve_and_config_refuse_the_same_configuration(
    command: str, flags: list[str], env: dict[str, str], needles: list[str], tmp_path: Path
) -> None:
    socket = [] if "--socket" in flags else ["--socket", str(tmp_path / "s.sock")]
    done = run_kvd(command, *socket, *flags, env=clean_env(**env))
    one_line_error(done, EXIT_USAGE, "configuration error", *needles)
    assert done.stdout == ""
    assert not (tmp_path / "s.sock").exists()


def test_a_config_file_error_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "kvd.toml"
    config.write_text('typo_key = 1\n[host_pool]\ncapacity_bytes = "x"\n')
    done = run_kvd("config", "--config", str(config))
    one_line_error(done, EXIT_USAGE, "typo_key: unknown setting", "host_pool.capacity_bytes")
    one_line_error(run_kvd("config", "--config", str(tmp_path / "nope.toml")), EXIT_USAGE, "does not exist")


def test_a_capacity_that_is_not_whole_slabs_says_what_the_pool_will_be() -> None:
    done = run_kvd("config", "--capacity", "100MiB")
    assert done.returncode == EXIT_OK, done.stderr
    assert "100MiB is not a whole number of 64MiB slabs; the pool will be 64MiB" in done.stderr
    assert json.loads(done.stdout)["host_pool"]["capacity_bytes"] == 100 << 20
    assert run_kvd("config", "--capacity", "1.5GiB").stderr == ""  # 24 slabs: nothing to say
