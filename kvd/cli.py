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
from typing import TYPE_CHECKING, Any, NoReturn

from kvd import __version__

if TYPE_CHECKING:
    from kvd.config import KvdConfig

# Exit codes, one meaning each across the subcommands (docs/operations.md has the table). Probes only care about zero
# / non-zero; humans, scripts and systemd's RestartPreventExitStatus= about why.
EXIT_OK = 0
EXIT_SERVING = EXIT_OK
EXIT_NOT_SERVING = 1  # the daemon answered, but it is not SERVING (starting, draining, unknown service) or erred
EXIT_UNREACHABLE = 2  # no socket, nobody listening, or no answer in time
EXIT_FAILURE = 3  # serve could not start or stopped on an error (memory, a port in use, a live socket...)
EXIT_USAGE = 64  # a bad flag, value or configuration file (sysexits' EX_USAGE): retrying the same command won't help
EXIT_INTERRUPTED = 130  # a second SIGINT/SIGTERM while draining: stopped without finishing the drain

EXIT_CODES = f"""exit codes:
  {EXIT_OK:<4} success (health: SERVING)
  {EXIT_NOT_SERVING:<4} the daemon answered, but is not SERVING or answered with an error
  {EXIT_UNREACHABLE:<4} unreachable: no socket, nobody listening, or no answer in time
  {EXIT_FAILURE:<4} serve could not start, or stopped on an error
  {EXIT_USAGE:<4} a bad flag, value or configuration file
  {EXIT_INTERRUPTED:<4} serve stopped by a second signal without finishing its drain"""

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
    p.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (off by default)")
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


class _Parser(argparse.ArgumentParser):
    """argparse with kvd's usage exit code; the subcommand parsers are of this class too, so a bad flag after
    `kvd serve` shows serve's usage, not the top level's."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


COMMANDS = ("serve", "health", "stats", "config")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvd",
        description="Per-node KV-cache transfer daemon for LLM serving.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvd {__version__}")
    # Not `required`: main() tells a missing COMMAND from an unknown option itself (argparse would say "COMMAND is
    # required" for `kvd --bogus`).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the daemon (blocks until SIGTERM/SIGINT)",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_flags(serve)
    serve.set_defaults(func=cmd_serve, parser=serve)

    health = sub.add_parser(
        "health",
        help="gRPC health check: exit 0 if SERVING, 1 if not, 2 if unreachable",
        description="Exit 0 if the daemon is SERVING, 1 if it answers but is not (starting, draining), "
        f"2 if it cannot be reached, {EXIT_USAGE} for a bad flag or configuration.",
    )
    _add_client_flags(health)
    health.add_argument("--service", default="", metavar="NAME", help='service to check ("" = the whole daemon)')
    health.add_argument(
        "--live",
        action="store_true",
        help="exit 0 whenever the daemon answers, SERVING or not (liveness: a starting or draining daemon is alive)",
    )
    health.set_defaults(func=cmd_health, parser=health)

    stats = sub.add_parser("stats", help="print the daemon's sessions, tiers and counters")
    _add_client_flags(stats)
    stats.add_argument("--json", action="store_true", help="print the raw StatsResponse as JSON")
    stats.set_defaults(func=cmd_stats, parser=stats)

    config = sub.add_parser(
        "config",
        help="check the configuration serve would use and print it as JSON",
        description=f"Validate the configuration exactly as serve would and print it; exit {EXIT_USAGE} if invalid.",
    )
    _add_config_flags(config)
    config.add_argument("--get", metavar="KEY", help="print one setting, e.g. socket or host_pool.capacity_bytes")
    config.set_defaults(func=cmd_config, parser=config)
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


def render_config(config: KvdConfig, key: str | None = None) -> str:
    """The configuration as JSON, or with `key` (dotted: host_pool.capacity_bytes) that one value as a shell would
    want it (a string bare, anything else as JSON). A key that does not exist is a ValueError."""
    data: Any = config.model_dump(mode="json")
    # Octal, the way chmod and systemd spell it (the loader accepts this string back).
    data["socket_mode"] = f"0{config.socket_mode:o}"
    if key is None:
        return json.dumps(data, indent=2)
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            raise ValueError(f"no setting {key!r} (`kvd config` prints them all)")
        data = data[part]
    return data if isinstance(data, str) else json.dumps(data, indent=2)


def describe_config_error(exc: Exception) -> str:
    """One line: pydantic's report of every bad setting (where, what, the value given) without its URLs."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "configuration"
        what = "unknown setting" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        given = error["input"]
        parts.append(f"{where}: {what}" + ("" if isinstance(given, dict) else f" (given {str(given)!r})"))
    return "; ".join(parts)


def _config_error(exc: Exception) -> int:
    print(f"kvd: configuration error: {describe_config_error(exc)}", file=sys.stderr)
    return EXIT_USAGE


def _checked_config(args: argparse.Namespace) -> KvdConfig | None:
    """The configuration serve would run with, or None after printing why it is invalid."""
    from pydantic import ValidationError

    from kvd.config import human_bytes

    try:
        config = load_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        _config_error(exc)
        return None
    pool = config.host_pool
    if pool.usable_bytes != pool.capacity_bytes:
        print(
            f"kvd: note: host_pool.capacity_bytes {human_bytes(pool.capacity_bytes)} is not a whole number of "
            f"{human_bytes(pool.slab_bytes)} slabs; the pool will be {human_bytes(pool.usable_bytes)}",
            file=sys.stderr,
        )
    return config


# ---- subcommands ------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    config = _checked_config(args)
    if config is None:
        return EXIT_USAGE

    from kvd.logs import setup_logging

    setup_logging(config.log)
    from kvd.daemon import run_daemon

    try:
        return run_daemon(config)
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return EXIT_INTERRUPTED


def cmd_config(args: argparse.Namespace) -> int:
    config = _checked_config(args)
    if config is None:
        return EXIT_USAGE
    try:
        print(render_config(config, args.get))
    except ValueError as exc:
        return _config_error(exc)
    return EXIT_OK


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
    except Exception as exc:  # pydantic's ValidationError, a missing or malformed file
        return _config_error(exc)
    code, message = health_check(socket, args.service, args.timeout)
    if args.live and code == EXIT_NOT_SERVING:
        code = EXIT_SERVING
    print(message, file=sys.stdout if code == EXIT_SERVING else sys.stderr)
    return code


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

    from kvd.config import human_bytes

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
                human_bytes(t.capacity_bytes) if t.capacity_bytes else "-",
                human_bytes(t.used_bytes),
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
        f"  ({stats.load_hit_blocks}/{load_blocks} blocks asked for by Load; a miss is one no tier had then)",
        f"saves: {stats.saves_ok} ok, {stats.saves_failed} failed, {human_bytes(stats.bytes_saved)} saved",
        f"loads: {stats.loads_ok} ok, {stats.loads_failed} failed, {human_bytes(stats.bytes_loaded)} loaded",
    ]
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        socket = _resolve_socket(args)
    except Exception as exc:  # pydantic's ValidationError, a missing or malformed file
        return _config_error(exc)
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line; a usage error (exit EXIT_USAGE) names the parser it belongs to."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    owner: argparse.ArgumentParser = getattr(args, "parser", parser)
    if unknown:
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error(f"a COMMAND is required: one of {', '.join(COMMANDS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
