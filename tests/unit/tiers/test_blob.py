"""The blob format: round trip, and every kind of damage or mix-up is refused."""

from __future__ import annotations

import pytest

from kvd.tiers.base import HEADER_BYTES, BlobError, decode_blob, encode_blob

KEY = ("model|fp0|tp0/1", b"\x01\x02\x03\x04")
PAYLOAD = bytes(range(256)) * 64


def test_round_trip() -> None:
    blob = encode_blob(KEY, PAYLOAD)
    assert len(blob) == HEADER_BYTES + len(KEY[1]) + len(PAYLOAD)
    assert bytes(decode_blob(KEY, blob)) == PAYLOAD


@pytest.mark.parametrize("offset", [0, 4, 6, 8, 16, 24, 32, 40, 44, 100, -1])
def test_any_flipped_byte_is_refused(offset: int) -> None:
    blob = bytearray(encode_blob(KEY, PAYLOAD))
    blob[offset] ^= 0x40
    with pytest.raises(BlobError):
        decode_blob(KEY, blob)


def test_truncated_and_extended_are_refused() -> None:
    blob = encode_blob(KEY, PAYLOAD)
    for damaged in (blob[:-1], blob + b"\0", blob[: HEADER_BYTES - 1], b""):
        with pytest.raises(BlobError):
            decode_blob(KEY, damaged)


def test_another_key_or_layout_is_refused() -> None:
    blob = encode_blob(KEY, PAYLOAD)
    with pytest.raises(BlobError, match="namespace"):
        decode_blob(("model|fp1|tp0/1", KEY[1]), blob)  # same hash, another layout fingerprint
    with pytest.raises(BlobError, match="another block"):
        decode_blob((KEY[0], b"\x01\x02\x03\x05"), blob)
