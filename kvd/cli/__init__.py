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
from kvd.cli.arg_types import byte_size, log_level, port, positive_float

if TYPE_CHECKING:
    from kvd.config import KvdConfig

from kvd.cli.exit_codes import (
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_NOT_SERVING,
    EXIT_OK,
    EXIT_SERVING,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

DEFAULT_RPC_TIMEOUT_S = 2.0

# Unix-socket targets never need a proxy, and a stray http_proxy in an operator's shell must not be consulted.
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


# ---- parser -----------------------------------------------------------------------------------------------------


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `serve` and `config`: each one given overrides the environment and the file."""
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (default: $KVD_CONFIG)")
    p.add_argument("--socket", type=Path, metavar="PATH", help="gRPC Unix socket to listen on")
    p.add_argument(
        "--capacity",
        type=byte_size,
        metavar="SIZE",
        help="host pool size (host_pool.capacity_bytes: whole slabs, 64MiB each by default), e.g. 4GiB",
    )
    p.add_argument("--lease-ms", type=int, metavar="N", help="session lease in milliseconds")
    p.add_argument("--metrics-port", type=port, metavar="N", help="Prometheus endpoint port (0: any free port)")
    p.add_argument("--log-level", type=log_level, metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument("--log-json", action="store_true", default=None, help="log one JSON object per line")


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the subcommands that talk to a running daemon."""
    p.add_argument("--socket", type=Path, metavar="PATH", help="daemon socket (default: from the configuration)")
    p.add_argument("--config", type=Path, metavar="FILE", help="read the socket path from this config file")
    p.add_argument(
        "--timeout", type=positive_float, default=DEFAULT_RPC_TIMEOUT_S, metavar="S", help="RPC deadline in seconds"
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


def _config_error(exc: Exception) -> int:
    from kvd.config import describe_config_error

    print(f"kvd: configuration error: {describe_config_error(exc)}", file=sys.stderr)
    return EXIT_USAGE


def _checked_config(args: argparse.Namespace) -> KvdConfig | None:
    """The configuration serve would run with, or None after printing why it is invalid."""
    from pydantic import ValidationError

    try:
        return load_config(args)
    except (ValidationError, ValueError, OSError) as exc:
        _config_error(exc)
        return None


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
    pool = config.host_pool
    if pool.usable_bytes != pool.capacity_bytes:  # serve's pool logs the same when it starts
        from kvd.config import human_bytes

        print(
            f"kvd: note: host_pool.capacity_bytes {human_bytes(pool.capacity_bytes)} is not a whole number of "
            f"{human_bytes(pool.slab_bytes)} slabs; the pool will be {human_bytes(pool.usable_bytes)}",
            file=sys.stderr,
        )
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
        from kvd.cli.stats_report import format_stats

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
