"""The `kvd` command: serve, health, stats, config.

`kvd health` is what Kubernetes exec probes and container HEALTHCHECKs run every few seconds, so the heavy imports
(pydantic, the daemon itself) happen inside the subcommands that need them, and `health --socket PATH` loads no
configuration at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvd import __version__

if TYPE_CHECKING:
    from kvd.config import KvdConfig

# `kvd health` exit codes, modelled on grpc_health_probe: probes only care about zero / non-zero, humans and
# scripts about why.
EXIT_SERVING = 0
EXIT_NOT_SERVING = 1  # the daemon answered, but it is not SERVING (starting, draining, unknown service)
EXIT_UNREACHABLE = 2  # no socket, nobody listening, or no answer in time
EXIT_USAGE = 2  # a bad flag or configuration (argparse also exits 2)

DEFAULT_RPC_TIMEOUT_S = 2.0

# Unix-socket targets never need a proxy, and a stray http_proxy in an operator's shell must not be consulted.
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


# ---- argument types ---------------------------------------------------------------------------------------------


def _byte_size(text: str) -> int:
    """Sizes like 4GiB, 512MiB, 1.5 GiB or 4294967296 to bytes. (4GB is 4*10^9: use the binary suffixes.)"""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1073741824)") from exc


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port (0 picks a free one): {text!r}")
    return int(text)


def _log_level(text: str) -> str:
    from kvd.logs import parse_level

    try:
        parse_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text.upper()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


# ---- parser -----------------------------------------------------------------------------------------------------


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `serve` and `config`: each one given overrides the environment and the file."""
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (default: $KVD_CONFIG)")
    p.add_argument("--socket", type=Path, metavar="PATH", help="gRPC Unix socket to listen on")
    p.add_argument("--tcp", type=_host_port, metavar="HOST:PORT", help="also listen on TCP (off by default)")
    p.add_argument(
        "--capacity",
        type=_byte_size,
        metavar="SIZE",
        help="pinned host pool size (host_pool.capacity_bytes), e.g. 4GiB",
    )
    p.add_argument("--lease-ms", type=int, metavar="N", help="session lease in milliseconds")
    p.add_argument("--metrics-port", type=_port, metavar="N", help="Prometheus endpoint port (0: any free port)")
    p.add_argument("--log-level", type=_log_level, metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--log-json", action="store_true", default=None, help="log one JSON object per line")


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the subcommands that talk to a running daemon."""
    p.add_argument("--socket", type=Path, metavar="PATH", help="daemon socket (default: from the configuration)")
    p.add_argument("--config", type=Path, metavar="FILE", help="read the socket path from this config file")
    p.add_argument(
        "--timeout", type=_positive_float, default=DEFAULT_RPC_TIMEOUT_S, metavar="S", help="RPC deadline in seconds"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvd", description="Per-node KV-cache transfer daemon for LLM serving.")
    parser.add_argument("--version", action="version", version=f"kvd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon (blocks until SIGTERM/SIGINT)")
    _add_config_flags(serve)
    serve.set_defaults(func=cmd_serve)

    health = sub.add_parser(
        "health",
        help="gRPC health check: exit 0 if SERVING, 1 if not, 2 if unreachable",
        description="Exit 0 if the daemon is SERVING, 1 if it answers but is not (starting, draining), "
        "2 if it cannot be reached.",
    )
    _add_client_flags(health)
    health.add_argument("--service", default="", metavar="NAME", help='service to check ("" = the whole daemon)')
    health.add_argument(
        "--live",
        action="store_true",
        help="exit 0 whenever the daemon answers, SERVING or not (liveness: a starting or draining daemon is alive)",
    )
    health.set_defaults(func=cmd_health)

    stats = sub.add_parser("stats", help="print the daemon's sessions, tiers and counters")
    _add_client_flags(stats)
    stats.add_argument("--json", action="store_true", help="print the raw StatsResponse as JSON")
    stats.set_defaults(func=cmd_stats)

    config = sub.add_parser("config", help="print the effective configuration as JSON")
    _add_config_flags(config)
    config.set_defaults(func=cmd_config)
    return parser


# ---- configuration ----------------------------------------------------------------------------------------------


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags actually given, shaped as KvdConfig fields.

    pydantic-settings deep-merges init kwargs into the env and TOML sources, so a nested override such as
    `host_pool={"capacity_bytes": ...}` replaces just that one field and keeps the rest of the section."""
    overrides: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        *sections, leaf = path.split(".")
        target = overrides
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value

    put("socket", args.socket)
    put("tcp", args.tcp)
    put("lease_ms", args.lease_ms)
    put("host_pool.capacity_bytes", args.capacity)
    put("metrics.port", args.metrics_port)
    put("log.level", args.log_level)
    put("log.json_format", args.log_json)
    return overrides


def load_config(args: argparse.Namespace) -> KvdConfig:
    from kvd.config import KvdConfig

    return KvdConfig.load(args.config, **config_overrides(args))


# Where systemd's RuntimeDirectory and the Kubernetes manifests put the socket.
SYSTEM_SOCKET = Path("/run/kvd/kvd.sock")


def _resolve_socket(args: argparse.Namespace) -> Path:
    """The socket of the daemon to talk to: --socket, else the configured one (file, KVD_SOCKET).

    With nothing configured, the built-in default depends on whether *this* user may write /run/kvd, so an operator
    who is not the daemon's user would look in $XDG_RUNTIME_DIR; the system daemon's socket wins when it exists."""
    if args.socket is not None:
        return Path(args.socket)
    from kvd.config import KvdConfig

    config = KvdConfig.load(args.config)
    if (
        "socket" not in config.model_fields_set
        and _socket_problem(config.socket)
        and not _socket_problem(SYSTEM_SOCKET)
    ):
        return SYSTEM_SOCKET
    return config.socket


def _socket_problem(path: Path) -> str | None:
    """Why `path` cannot be a live socket we may open, or None. Cheap: one stat, no connect."""
    try:
        path.stat()
    except FileNotFoundError:
        return f"no socket at {path}"
    except PermissionError:
        return f"permission denied on {path} (join the daemon's group, e.g. kvd)"
    except OSError as exc:
        return f"cannot access {path}: {exc.strerror}"
    return None


def render_config(config: KvdConfig) -> str:
    data = config.model_dump(mode="json")
    # Octal, the way chmod and systemd spell it (the loader accepts this string back).
    data["socket_mode"] = f"0{config.socket_mode:o}"
    return json.dumps(data, indent=2)


def _config_error(exc: Exception) -> int:
    print(f"kvd: configuration error: {exc}", file=sys.stderr)
    return EXIT_USAGE


# ---- subcommands ------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        config = load_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        return _config_error(exc)

    from kvd.logs import setup_logging

    setup_logging(config.log)
    from kvd.daemon import run_daemon

    try:
        return run_daemon(config)
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130


def cmd_config(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        config = load_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        return _config_error(exc)
    print(render_config(config))
    return 0


def health_check(socket: Path, service: str = "", timeout: float = DEFAULT_RPC_TIMEOUT_S) -> tuple[int, str]:
    """One grpc.health.v1 Check over the Unix socket: (exit code, what to print)."""
    # Checked first so a daemon that is not running fails in microseconds rather than after a connect attempt.
    if problem := _socket_problem(socket):
        return EXIT_UNREACHABLE, f"unreachable: {problem}"

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{socket}", options=_CHANNEL_OPTIONS) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            if code is grpc.StatusCode.NOT_FOUND:
                return EXIT_NOT_SERVING, f"SERVICE_UNKNOWN: {service!r}"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return EXIT_UNREACHABLE, f"unreachable: {code.name}: {exc.details()}"
            # Something answered, but not as a kvd would (no health service, an error): not healthy.
            return EXIT_NOT_SERVING, f"error: {code.name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return (EXIT_SERVING if response.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SERVING), status


def cmd_health(args: argparse.Namespace) -> int:
    try:
        socket = _resolve_socket(args)
    except Exception as exc:  # pydantic's ValidationError, a missing file: either way there is nothing to reach
        print(f"kvd: configuration error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    code, message = health_check(socket, args.service, args.timeout)
    if args.live and code == EXIT_NOT_SERVING:
        code = EXIT_SERVING
    print(message, file=sys.stdout if code == EXIT_SERVING else sys.stderr)
    return code


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}{unit}"


def _rate(hit: int, total: int) -> str:
    return f"{100.0 * hit / total:.1f}%" if total else "-"


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d" if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [list(header), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def format_stats(stats: Any) -> str:
    """A kvd.v1.StatsResponse as an operator-readable report."""
    from kvd_client.wire.kvd.v1 import kvd_pb2

    lines = [f"kvd {stats.version or '?'}  boot {stats.boot_id or '?'}  up {_duration(stats.uptime_s)}", ""]

    lines.append(f"sessions: {len(stats.sessions)}")
    if stats.sessions:
        lines += _table(
            ["SESSION", "WORKER", "PID", "TRANSPORT", "MODEL", "TP", "SAVES", "LOADS", "IN-FLIGHT"],
            [
                [
                    s.session_id[:12],
                    s.worker_name or "-",
                    s.pid,
                    s.transport or "-",
                    s.namespace.model_id or "-",
                    f"{s.namespace.tp_rank}/{s.namespace.tp_world_size}",
                    s.saves,
                    s.loads,
                    s.in_flight,
                ]
                for s in stats.sessions
            ],
        )
    lines.append("")

    lines.append("tiers:")
    lines += _table(
        ["TIER", "NAME", "HEALTHY", "CAPACITY", "USED", "BLOCKS", "HITS", "MISSES", "HIT RATE", "EVICTED", "CORRUPT"],
        [
            [
                kvd_pb2.Tier.Name(t.tier).removeprefix("TIER_").lower() if t.tier in kvd_pb2.Tier.values() else t.tier,
                t.name or "-",
                "yes" if t.healthy else "NO",
                _human_bytes(t.capacity_bytes) if t.capacity_bytes else "-",
                _human_bytes(t.used_bytes),
                t.blocks,
                t.hits,
                t.misses,
                _rate(t.hits, t.hits + t.misses),
                t.evictions,
                t.corrupt,
            ]
            for t in stats.tiers
        ],
    )
    lines.append("")

    load_blocks = stats.load_hit_blocks + stats.load_miss_blocks
    lines += [
        f"lookup hit rate: {_rate(stats.lookup_hit_blocks, stats.lookup_blocks)}"
        f"  ({stats.lookup_hit_blocks}/{stats.lookup_blocks} blocks in {stats.lookups} lookups)",
        f"load hit rate:   {_rate(stats.load_hit_blocks, load_blocks)}"
        f"  ({stats.load_hit_blocks}/{load_blocks} blocks; a miss was promised by Lookup but gone by Load)",
        f"saves: {stats.saves_ok} ok, {stats.saves_failed} failed, {_human_bytes(stats.bytes_saved)} saved",
        f"loads: {stats.loads_ok} ok, {stats.loads_failed} failed, {_human_bytes(stats.bytes_loaded)} loaded",
    ]
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        socket = _resolve_socket(args)
    except Exception as exc:
        print(f"kvd: configuration error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if problem := _socket_problem(socket):
        print(f"kvd: unreachable: {problem}", file=sys.stderr)
        return EXIT_UNREACHABLE

    import grpc
    from google.protobuf.json_format import MessageToDict
    from kvd_client.wire.kvd.v1 import kvd_pb2, kvd_pb2_grpc

    with grpc.insecure_channel(f"unix:{socket}", options=_CHANNEL_OPTIONS) as channel:
        try:
            stats = kvd_pb2_grpc.KvdStub(channel).Stats(kvd_pb2.StatsRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            print(f"kvd: Stats failed: {code.name}: {exc.details()}", file=sys.stderr)
            unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            return EXIT_UNREACHABLE if unreachable else 1
    if args.json:
        doc = MessageToDict(
            stats,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,  # a zero counter is information, not noise
            unquote_int64_if_possible=True,  # proto3 JSON quotes uint64; scripts want numbers
        )
        print(json.dumps(doc, indent=2))
    else:
        print(format_stats(stats))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:
        # `kvd stats | head`: the reader left. Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
