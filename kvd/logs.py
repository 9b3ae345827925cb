"""Logging setup: plain text for a terminal, or one JSON object per line for journald / Kubernetes log shippers."""

from __future__ import annotations

import json
import logging
import sys
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
