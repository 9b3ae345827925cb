"""The `kvd` command's argument types: each turns one flag's text into a value or an argparse error that says what
it expected."""

from __future__ import annotations

import argparse


def byte_size(text: str) -> int:
    """Sizes like 4GiB, 512MiB, 1.5 GiB or 4294967296 to bytes. (4GB is 4*10^9: use the binary suffixes.)"""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1073741824)") from exc


def port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port (0 picks a free one): {text!r}")
    return int(text)


def log_level(text: str) -> str:
    from kvd.logs import parse_level

    try:
        parse_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text.upper()


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value
