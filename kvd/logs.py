"""Logging setup: plain text for a terminal, or one JSON object per line for journald / Kubernetes log shippers."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from kvd.config import LogConfig

# Attributes every LogRecord has; anything else on a record came from `extra=` and is worth shipping as a field.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...extra, "exc"}` per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an `extra` value that is not JSON (a Path, an enum) must not lose the whole line.
        return json.dumps(entry, default=str, ensure_ascii=False)


def parse_level(level: str) -> int:
    """A level name (any case) or number to a logging level; ValueError for anything else."""
    text = level.strip().upper()
    if text.isdigit():
        return int(text)
    mapping = logging.getLevelNamesMapping()
    if text not in mapping:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(sorted(mapping))}")
    return mapping[text]


def setup_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one stderr handler in the configured format and level.

    Calling it again (tests, a reload) reconfigures rather than stacking handlers."""
    level = parse_level(config.level)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if config.json_format else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)  # not closed: it may belong to someone else (a test harness) who still uses it
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


class Throttled:
    """One logger's repeating warnings, at most one record per key per `interval_s`.

    A fault that repeats (a full disk refusing every write, a store answering every call with an error) must not
    flood the log: the first occurrence is logged at once, later ones with the same key are counted, and the next
    record logged for that key says how many were held back. State changes (degraded, recovered) are logged by
    their owner once per change and need no throttling."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: Any = None) -> bool:
        """Log `msg % args` unless `key` was logged less than `interval_s` ago; True when it was logged."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg = f"{msg} (and {held} more like it in the last {now - last:.0f} s)"  # type: ignore[operator]
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def exception(self, key: str, msg: str, *args: object) -> bool:
        """An error with the traceback of the exception being handled (the first of each burst only)."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=True)

    def held_back(self) -> int:
        """Records suppressed and not yet reported."""
        return sum(self._held.values())
