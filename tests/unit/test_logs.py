"""kvd.logs.Throttled: a repeating warning is logged once per interval, and the next line says what was held back."""

from __future__ import annotations

import logging
import time

import pytest

from kvd.logs import Throttled


def test_repeats_are_held_back_and_then_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kvd.test.throttled")
    warn = Throttled(logging.getLogger("kvd.test.throttled"), interval_s=0.2)
    assert warn.warning("disk-full", "write dropped: %s", "ENOSPC")
    assert not any(warn.warning("disk-full", "write dropped: %s", "ENOSPC") for _ in range(500))
    assert warn.warning("other", "another kind is not held back by the first")
    assert [r.getMessage() for r in caplog.records] == [
        "write dropped: ENOSPC",
        "another kind is not held back by the first",
    ]
    assert warn.held_back() == 500
    time.sleep(0.25)
    assert warn.warning("disk-full", "write dropped: %s", "ENOSPC")
    assert caplog.records[-1].getMessage().startswith("write dropped: ENOSPC (and 500 more like it in the last")
    assert warn.held_back() == 0
