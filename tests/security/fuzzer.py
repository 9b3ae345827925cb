"""A protocol fuzzer for kvd.v1.Kvd, run against a real daemon process (tests/security/test_fuzz.py, bench/fuzz.py).

It learns the service by server reflection (the methods and every field of their requests), keeps a lookup-only and
a CPU session of its own alive to aim at, and sends, case after case (seeded, reproducible):

- valid requests (templates) and templates with 1-3 field mutations: edge and random values, huge and empty strings,
  bytes and repeated fields, out-of-range enums, cleared or switched sub-messages (the memory oneof);
- templates mutated as bytes: truncated, bit-flipped, a field with the wrong wire type, a string that is not UTF-8,
  a length past the end, an over-long varint, groups nested past the parser's limit, a zero field number;
- random bytes to every method, and calls of methods that do not exist.

Every answer must be a documented status of that method (DOCUMENTED; never UNKNOWN or INTERNAL), the daemon must
stay alive and SERVING, and once the fuzzer's sessions are gone its RSS and open fds must return to their band.
"""

from __future__ import annotations

import collections
import ctypes
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool, message, message_factory
from google.protobuf.json_format import ParseDict
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.security.agent import credential_reply

SERVICE = "kvd.v1.Kvd"

# The statuses each method may answer (docs/security.md): anything else is a finding.
_ANY = frozenset({"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE"})
_SESSION = _ANY | {"NOT_FOUND", "PERMISSION_DENIED"}
DOCUMENTED: dict[str, frozenset[str]] = {
    "RegisterSession": _ANY | {"PERMISSION_DENIED", "ALREADY_EXISTS", "UNIMPLEMENTED"},
    "Heartbeat": _SESSION,
    "Unregister": _SESSION,
    "Lookup": _SESSION,
    "Save": _SESSION | {"FAILED_PRECONDITION"},
    "Load": _SESSION | {"FAILED_PRECONDITION"},
    "Watch": _SESSION,
    "Stats": _ANY,
}
UNKNOWN_METHOD = frozenset({"UNIMPLEMENTED"})

NBLOCKS, BLOCK_BYTES = 16, 4096
TOKEN_PLACEHOLDER = b"\x00kvd-fuzz-token-placeholder\x00\x00\x00\x00"
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 64 << 20)]


# -- the target ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    path: str
    request: type[message.Message]
    response: type[message.Message]
    streaming: bool


def discover(channel: grpc.Channel) -> dict[str, Method]:
    """kvd.v1.Kvd's methods and their message classes, from the daemon's reflection service."""
    database = ProtoReflectionDescriptorDatabase(channel)
    if SERVICE not in set(database.get_services()):
        raise RuntimeError(f"the daemon's reflection does not list {SERVICE}")
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE)
    return {
        m.name: Method(
            name=m.name,
            path=f"/{SERVICE}/{m.name}",
            request=message_factory.GetMessageClass(m.input_type),
            response=message_factory.GetMessageClass(m.output_type),
            streaming=m.server_streaming,
        )
        for m in service.methods
    }


def credential_bytes(socket_path: Path) -> bytes:
    return credential_reply(str(socket_path.with_name(socket_path.name + ".cred")))


@dataclass
class Sessions:
    """The fuzzer's own sessions: (id, key) of a lookup-only one and of a CPU one over `buffer`."""

    lookup: tuple[str, bytes] = ("", b"")
    cpu: tuple[str, bytes] = ("", b"")


class Target:
    """The daemon as the fuzzer sees it: its methods, a channel, valid templates and the fuzzer's sessions."""

    def __init__(self, socket_path: Path, daemon_pid: int) -> None:
        self.socket = socket_path
        self.pid = daemon_pid
        self.channel = grpc.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)
        self.methods = discover(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.buffer = (ctypes.c_uint8 * (NBLOCKS * BLOCK_BYTES))()
        self.sessions = Sessions()
        self.tokens_refused = 0

    def close(self) -> None:
        self.unregister_all()
        self.channel.close()

    def call(self, method: str, request: bytes, timeout: float = 10.0) -> tuple[str, str, bytes]:
        path = self.methods[method].path if method in self.methods else method
        try:
            response = self.channel.unary_unary(path)(request, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", b""
        return "OK", "", response

    def watch(self, request: bytes) -> tuple[str, str]:
        """Open a Watch: "OK" once the daemon accepted the stream (its headers came, the call goes on), else the
        status it ended with."""
        call = self.channel.unary_stream(self.methods["Watch"].path)(request, timeout=10.0)
        try:
            call.initial_metadata()
            deadline = time.monotonic() + 0.05
            while not call.done() and time.monotonic() < deadline:
                time.sleep(0.002)
            if not call.done():
                return "OK", ""
            return call.code().name, call.details() or ""
        finally:
            call.cancel()

    def serving(self) -> bool:
        try:
            status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        except grpc.RpcError:
            return False
        return bool(status == health_pb2.HealthCheckResponse.SERVING)

    def token(self) -> bytes:
        data = credential_bytes(self.socket)
        if len(data) != 32:
            self.tokens_refused += 1
            return b"refused-" + data[:24]
        return data

    # -- templates -----------------------------------------------------------------------------------------------

    def new(self, method: str, fields: dict[str, Any]) -> message.Message:
        return ParseDict(fields, self.methods[method].request())

    def register_template(self, kind: str, model: str) -> message.Message:
        body: dict[str, Any] = {
            "namespace": {"model_id": model, "layout_fingerprint": "fp-fuzz", "tp_world_size": 1},
            "pid": os.getpid(),
            "credential_token": _b64(TOKEN_PLACEHOLDER),
            "worker_name": f"fuzz-{kind}",
        }
        layer = {"name": "raw", "shape": [NBLOCKS, BLOCK_BYTES], "dtype": "DTYPE_UINT8", "block_dim": 0}
        if kind == "cpu":
            body["layout"] = {"layers": [layer], "block_size_tokens": 16}
            body["cpu"] = {"layers": [{"address": ctypes.addressof(self.buffer), "nbytes": NBLOCKS * BLOCK_BYTES}]}
        elif kind == "cuda":
            body["layout"] = {"layers": [layer], "block_size_tokens": 16}
            body["cuda"] = {
                "device_uuid": "GPU-00000000-0000-0000-0000-000000000000",
                "allocations": [{"ipc_handle": _b64(bytes(64)), "nbytes": NBLOCKS * BLOCK_BYTES}],
                "layers": [{"allocation": 0, "offset": 0, "nbytes": NBLOCKS * BLOCK_BYTES}],
            }
        return self.new("RegisterSession", body)

    def scoped_template(self, method: str, rng: random.Random) -> message.Message:
        """A valid request of a session-scoped method, aimed at one of the fuzzer's sessions."""
        use_cpu = method in ("Save", "Load") or rng.random() < 0.5
        session_id, key = self.sessions.cpu if use_cpu else self.sessions.lookup
        fields: dict[str, Any] = {"session_id": session_id}
        if method == "Lookup":
            fields["block_hashes"] = [_b64(rng.randbytes(32)) for _ in range(rng.randrange(1, 8))]
        elif method in ("Save", "Load"):
            indices = rng.sample(range(NBLOCKS), rng.randrange(1, 5))
            fields["blocks"] = [{"block_index": i, "block_hash": _b64(bytes([i]) * 32)} for i in indices]
            fields["client_tag"] = rng.randrange(1 << 32)
        msg = self.new(method, fields)
        if key and "session_key" in msg.DESCRIPTOR.fields_by_name:
            msg.session_key = key  # type: ignore[attr-defined]
        return msg

    def template(self, method: str, rng: random.Random) -> message.Message:
        if method == "RegisterSession":
            kind = rng.choice(["lookup", "cpu", "cpu", "cuda"])
            return self.register_template(kind, f"m-fuzz-{rng.randrange(4)}")
        if method == "Stats":
            return self.new("Stats", {})
        return self.scoped_template(method, rng)

    # -- the fuzzer's own sessions ------------------------------------------------------------------------------

    def register(self, kind: str) -> tuple[str, bytes]:
        request = self.register_template(kind, f"m-fuzz-own-{kind}")
        request.credential_token = self.token()  # type: ignore[attr-defined]
        code, details, response = self.call("RegisterSession", request.SerializeToString())
        if code != "OK":
            raise RuntimeError(f"the fuzzer's own {kind} session: {code} {details}")
        parsed = self.methods["RegisterSession"].response.FromString(response)
        return parsed.session_id, bytes(getattr(parsed, "session_key", b""))  # type: ignore[attr-defined]

    def ensure_sessions(self) -> None:
        """Re-register whichever of the fuzzer's sessions a case ended (an Unregister that went through)."""
        for kind in ("lookup", "cpu"):
            session_id, key = getattr(self.sessions, kind)
            if session_id:
                request = self.new("Heartbeat", {"session_id": session_id})
                if key and "session_key" in request.DESCRIPTOR.fields_by_name:
                    request.session_key = key  # type: ignore[attr-defined]
                if self.call("Heartbeat", request.SerializeToString())[0] == "OK":
                    continue
            setattr(self.sessions, kind, self.register(kind))

    def unregister(self, session_id: str, key: bytes) -> None:
        request = self.new("Unregister", {"session_id": session_id})
        if key and "session_key" in request.DESCRIPTOR.fields_by_name:
            request.session_key = key  # type: ignore[attr-defined]
        self.call("Unregister", request.SerializeToString())

    def unregister_all(self) -> None:
        for kind in ("lookup", "cpu"):
            session_id, key = getattr(self.sessions, kind)
            if session_id:
                self.unregister(session_id, key)
            setattr(self.sessions, kind, ("", b""))


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


# -- descriptor-aware mutations ------------------------------------------------------------------------------------

FD = descriptor.FieldDescriptor
_INT_RANGES = {
    FD.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FD.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FD.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    FD.TYPE_ENUM: (-(1 << 31), (1 << 31) - 1),
    FD.TYPE_UINT32: (0, (1 << 32) - 1),
    FD.TYPE_FIXED32: (0, (1 << 32) - 1),
    FD.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FD.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    FD.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FD.TYPE_UINT64: (0, (1 << 64) - 1),
    FD.TYPE_FIXED64: (0, (1 << 64) - 1),
}


def _scalar(fd: descriptor.FieldDescriptor, rng: random.Random, big: bool) -> Any:
    """A value for one scalar field: an edge, or random; `big` allows megabyte strings and bytes."""
    if fd.type == FD.TYPE_STRING:
        choices = ["", "a", "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 64))), "\x00",
                   "x" * 4096, "../../etc/passwd", "%s%n" * 8]
        if big:
            choices.append("x" * rng.choice([1 << 20, 5 << 20]))
        return rng.choice(choices)
    if fd.type == FD.TYPE_BYTES:
        choices = [b"", rng.randbytes(rng.randrange(1, 16)), rng.randbytes(32), rng.randbytes(64), rng.randbytes(65),
                   bytes(64), b"\xff" * 1000]
        if big:
            choices.append(rng.randbytes(rng.choice([1 << 20, 5 << 20])))
        return rng.choice(choices)
    if fd.type == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return rng.choice([0.0, -1.0, float("inf"), float("nan"), 1e308])
    low, high = _INT_RANGES[fd.type]
    edges = [0, 1, 2, 7, 63, 64, 65, 1 << 20, high, high - 1, low, (1 << 31) - 1]
    value = rng.choice(edges) if rng.random() < 0.7 else rng.randint(low, high)
    return max(low, min(high, value))


def _fields(msg: message.Message) -> list[descriptor.FieldDescriptor]:
    return list(msg.DESCRIPTOR.fields)


def mutate_field(msg: message.Message, rng: random.Random, depth: int = 0) -> str:
    """Change one field somewhere in `msg` (in place); what was done, for the report."""
    fields = _fields(msg)
    if not fields:
        return "(no fields)"
    fd = rng.choice(fields)
    name = fd.name
    big = rng.random() < 0.03
    if fd.is_repeated:
        container = getattr(msg, name)
        op = rng.choice(["clear", "add", "add", "many", "dup"] + (["huge"] if big else []))
        if op == "clear":
            msg.ClearField(name)
        elif fd.type == FD.TYPE_MESSAGE:
            count = {"add": 1, "many": rng.choice([2, 100, 5000]), "dup": 2, "huge": 200_000}[op]
            element = container.add()
            if rng.random() < 0.7 and depth < 3:
                mutate_field(element, rng, depth + 1)
            for _ in range(count - 1):
                container.add().CopyFrom(element)
        else:
            sizes = {"add": 1, "many": rng.choice([2, 100, 10_000]), "dup": 2, "huge": rng.choice([70_000, 500_000])}
            count = sizes[op]
            value = _scalar(fd, rng, big=False)
            container.extend([value] * count)
        return f"{name}:{op}"
    if fd.type == FD.TYPE_MESSAGE:
        if rng.random() < 0.25 or depth >= 3:
            msg.ClearField(name)
            return f"{name}:clear"
        return f"{name}." + mutate_field(getattr(msg, name), rng, depth + 1)
    setattr(msg, name, _scalar(fd, rng, big))
    return f"{name}:set"


# -- byte-level mutations ------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


_LEN_TYPES = {FD.TYPE_STRING, FD.TYPE_BYTES, FD.TYPE_MESSAGE}


def mutate_bytes(data: bytes, msg_descriptor: descriptor.Descriptor, rng: random.Random) -> tuple[bytes, str]:
    """A byte-level corruption of a serialised request; what was done."""
    fds = list(msg_descriptor.fields) or [None]
    fd = rng.choice(fds)
    number = fd.number if fd is not None else rng.randrange(1, 20)
    kind = rng.choice(["truncate", "flip", "insert", "wrong_type", "bad_utf8", "long_length", "overlong_varint",
                       "deep_groups", "field_zero", "random_field"])
    if kind == "truncate" and data:
        return data[: rng.randrange(len(data))], kind
    if kind == "flip" and data:
        out = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out), kind
    if kind == "insert":
        at = rng.randrange(len(data) + 1)
        return data[:at] + rng.randbytes(rng.randrange(1, 9)) + data[at:], kind
    if kind == "wrong_type":
        if fd is not None and fd.type in _LEN_TYPES:
            return data + _tag(number, rng.choice([0, 1, 5])) + rng.randbytes(8), kind
        return data + _tag(number, 2) + _varint(3) + b"abc", kind
    if kind == "bad_utf8":
        strings = [f for f in msg_descriptor.fields if f.type == FD.TYPE_STRING]
        target = rng.choice(strings).number if strings else number
        return data + _tag(target, 2) + _varint(2) + b"\xff\xfe", kind
    if kind == "long_length":
        return data + _tag(number, 2) + _varint(rng.choice([1 << 31, (1 << 32) + 5, 1 << 62])) + b"x", kind
    if kind == "overlong_varint":
        return data + _tag(number, 0) + b"\xff" * 10 + b"\x01", kind
    if kind == "deep_groups":
        depth = rng.choice([150, 1000])
        return data + _tag(99, 3) * depth + _tag(99, 4) * depth, kind
    if kind == "field_zero":
        return data + _tag(0, rng.randrange(6)) + b"\x01", kind
    return data + _tag(rng.randrange(1, 1 << 29), rng.choice([0, 1, 2, 5])) + rng.randbytes(8), "random_field"


# -- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Finding:
    case: int
    method: str
    mutation: str
    code: str
    details: str


@dataclass
class Report:
    seed: int
    cases: int = 0
    by_method: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    findings: list[Finding] = field(default_factory=list)
    health_failures: int = 0
    rss_idle: int = 0
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    fds_start: int = 0
    fds_end: int = 0
    seconds: float = 0.0
    tokens_refused: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "cases": self.cases,
            "seconds": round(self.seconds, 2),
            "cases_per_s": round(self.cases / self.seconds, 1) if self.seconds else 0.0,
            "by_kind": dict(self.by_kind),
            "by_method": {m: dict(c) for m, c in sorted(self.by_method.items())},
            "findings": len(self.findings),
            "first_findings": [f.__dict__ for f in self.findings[:20]],
            "health_failures": self.health_failures,
            "rss_mib": {
                "idle": _mib(self.rss_idle),
                "start": _mib(self.rss_start),
                "peak": _mib(self.rss_peak),
                "end": _mib(self.rss_end),
            },
            "fds": {"start": self.fds_start, "end": self.fds_end},
            "tokens_refused": self.tokens_refused,
        }


def _mib(n: int) -> float:
    return round(n / (1 << 20), 1)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Fuzzer:
    def __init__(self, target: Target, seed: int) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.report = Report(seed=seed)
        self._kinds: list[tuple[str, float, Callable[[], tuple[str, str, bytes]]]] = [
            ("valid", 0.08, self._valid),
            ("fields", 0.50, self._fields),
            ("bytes", 0.30, self._bytes),
            ("random", 0.10, self._random),
            ("no_such_method", 0.02, self._no_such_method),
        ]

    # Each case maker returns (method, mutation, request bytes).

    def _method(self) -> str:
        return self.rng.choice(sorted(self.target.methods))

    def _finish_register(self, msg: message.Message) -> bytes:
        """A fresh token only where the mutations left the placeholder: a token the daemon never sees would stay
        outstanding until it expires."""
        if getattr(msg, "credential_token", None) == TOKEN_PLACEHOLDER:
            msg.credential_token = self.target.token()  # type: ignore[attr-defined]
        return msg.SerializeToString()

    def _valid(self) -> tuple[str, str, bytes]:
        method = self._method()
        msg = self.target.template(method, self.rng)
        data = self._finish_register(msg) if method == "RegisterSession" else msg.SerializeToString()
        return method, "valid", data

    def _fields(self) -> tuple[str, str, bytes]:
        method = self._method()
        msg = self.target.template(method, self.rng)
        done = [mutate_field(msg, self.rng) for _ in range(self.rng.randrange(1, 4))]
        data = self._finish_register(msg) if method == "RegisterSession" else msg.SerializeToString()
        return method, ",".join(done), data

    def _bytes(self) -> tuple[str, str, bytes]:
        method = self._method()
        msg = self.target.template(method, self.rng)  # a registration keeps the placeholder: never redeemable
        data, kind = mutate_bytes(msg.SerializeToString(), msg.DESCRIPTOR, self.rng)
        return method, f"bytes:{kind}", data

    def _random(self) -> tuple[str, str, bytes]:
        size = self.rng.choice([0, 1, 2, 8, 64, 1024, 65536]) if self.rng.random() < 0.9 else 4 << 20
        return self._method(), f"random:{size}", self.rng.randbytes(size)

    def _no_such_method(self) -> tuple[str, str, bytes]:
        return f"/{SERVICE}/Fuzz{self.rng.randrange(1000)}", "no_such_method", self.rng.randbytes(8)

    def _pick(self) -> tuple[str, Callable[[], tuple[str, str, bytes]]]:
        x = self.rng.random()
        for name, weight, make in self._kinds:
            if x < weight:
                return name, make
            x -= weight
        return self._kinds[0][0], self._kinds[0][2]

    def case(self, number: int) -> None:
        kind, make = self._pick()
        method, mutation, data = make()
        if method in self.target.methods and self.target.methods[method].streaming:
            code, details = self.target.watch(data)
        else:
            code, details, response = self.target.call(method, data)
            if method == "RegisterSession" and code == "OK":
                parsed = self.target.methods[method].response.FromString(response)
                self.target.unregister(parsed.session_id, bytes(getattr(parsed, "session_key", b"")))  # type: ignore[attr-defined]
        allowed = DOCUMENTED.get(method, UNKNOWN_METHOD)
        self.report.cases += 1
        self.report.by_kind[kind] += 1
        self.report.by_method[method if method in DOCUMENTED else "(no such method)"][code] += 1
        if code not in allowed:
            self.report.findings.append(Finding(number, method, mutation, code, details[:300]))
        if method == "Unregister" and code == "OK":
            self.target.ensure_sessions()

    def run(self, cases: int, warmup: int = 1000, check_every: int = 250, settle_s: float = 2.0) -> Report:
        """`warmup` cases first (not counted), so the band starts from a daemon in use: its allocator has seen the
        largest requests once (the idle RSS is reported too)."""
        target, report = self.target, self.report
        report.rss_idle = rss_bytes(target.pid)
        target.ensure_sessions()
        for _ in range(warmup):
            self.case(-1)
        report.cases, report.findings = 0, []
        report.by_method.clear()
        report.by_kind.clear()
        report.rss_start, report.fds_start = rss_bytes(target.pid), open_fds(target.pid)
        report.rss_peak = report.rss_start
        started = time.monotonic()
        for number in range(cases):
            self.case(number)
            if number % check_every == check_every - 1:
                if not target.serving():
                    report.health_failures += 1
                report.rss_peak = max(report.rss_peak, rss_bytes(target.pid))
                target.ensure_sessions()
        report.seconds = time.monotonic() - started
        if not target.serving():
            report.health_failures += 1
        target.unregister_all()
        time.sleep(settle_s)
        report.rss_end, report.fds_end = rss_bytes(target.pid), open_fds(target.pid)
        report.tokens_refused = target.tokens_refused
        return report


def band_problems(report: Report, rss_slack: int = 32 << 20, fd_slack: int = 8) -> list[str]:
    """Whether the daemon came back to its starting band after the run."""
    problems = []
    if report.rss_end > report.rss_start + rss_slack:
        problems.append(f"RSS {_mib(report.rss_start)} MiB at the start, {_mib(report.rss_end)} MiB at the end")
    if report.fds_end > report.fds_start + fd_slack:
        problems.append(f"{report.fds_start} open fds at the start, {report.fds_end} at the end")
    if report.health_failures:
        problems.append(f"{report.health_failures} health checks were not SERVING")
    return problems
