"""deploy/systemd/kvd.service: systemd accepts it, and it carries the settings the daemon depends on."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from kvd.cli import EXIT_USAGE, build_parser
from kvd.config import KvdConfig

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "kvd.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; systemd allows repeating keys (DeviceAllow=, Environment=)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        sections[current][key.strip()].append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    values = service[key]
    assert len(values) == 1, f"{key}= set {len(values)} times"
    return values[0]


def test_readiness_and_lifecycle(service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"  # the daemon sends READY=1 once the pinned pool is up
    assert one(service, "Restart") == "on-failure"
    assert one(service, "RestartSec")
    assert one(service, "RestartPreventExitStatus") == str(EXIT_USAGE)  # a bad configuration: no restart loop
    drain_default = KvdConfig.model_fields["drain_timeout_s"].default
    assert int(one(service, "TimeoutStopSec")) > drain_default


def test_execstart_is_a_valid_kvd_serve_command(service: dict[str, list[str]]) -> None:
    argv = shlex.split(one(service, "ExecStart"))
    assert argv[:2] == ["/usr/bin/kvd", "serve"]
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    assert args.config == Path("/etc/kvd/kvd.toml")


def test_user_socket_and_directories(service: dict[str, list[str]]) -> None:
    assert (one(service, "User"), one(service, "Group")) == ("kvd", "kvd")
    assert "DynamicUser" not in service  # workers need a stable group to join
    assert one(service, "RuntimeDirectory") == "kvd"
    assert one(service, "RuntimeDirectoryMode") == "0750"
    assert one(service, "StateDirectory") == "kvd"
    assert "/var/lib/kvd" in one(service, "ReadWritePaths").split()
    env = dict(item.split("=", 1) for value in service["Environment"] for item in shlex.split(value))
    assert env["KVD_SOCKET_MODE"] == "0660"
    assert env["KVD_SOCKET"] == "/run/kvd/kvd.sock"


def test_hardening_and_gpu_access(service: dict[str, list[str]]) -> None:
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "no",  # CUDA JIT needs W+X pages
        "LimitMEMLOCK": "infinity",
    }.items():
        assert one(service, key) == value, key
    assert "PrivateDevices" not in service  # would hide the GPUs
    allowed = " ".join(service["DeviceAllow"])
    for device in ("char-nvidia*", "/dev/nvidiactl", "/dev/nvidia-uvm"):
        assert device in allowed


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists; /usr/bin/kvd need not on a dev machine, so check a copy that
    # runs this interpreter's `-m kvd` instead (the rest of the unit byte for byte).
    text = UNIT.read_text()
    original = "ExecStart=/usr/bin/kvd "
    assert text.count(original) == 1
    unit = tmp_path / "kvd.service"
    unit.write_text(text.replace(original, f"ExecStart={shlex.quote(sys.executable)} -m kvd "))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown keys and unparsable values are only warnings (exit 0): fail on any message about our unit.
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if "kvd.service" in line]
    assert done.returncode == 0, done.stderr
    assert complaints == []
