"""In-step load progress: the daemon's writer (kvd.memory.progress) and the worker's page (kvd_client.progress),
in one process and across two, including a writer killed with SIGKILL in the middle of a load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvd_client.progress import MASK32, STATUS_FAILED, STATUS_OK, ProgressPage, counter_word, reached

from kvd.memory.progress import ProgressWriter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pair() -> Iterator[tuple[ProgressWriter, ProgressPage]]:
    writer = ProgressWriter(slots=4)
    page_fd, wake_fd = writer.client_fds()
    page = ProgressPage(page_fd, wake_fd=wake_fd)
    os.close(page_fd)
    yield writer, page
    page.close()
    writer.close()


def test_cyclic_compare() -> None:
    assert reached(5, 5) and reached(6, 5) and not reached(4, 5)
    assert reached(2, MASK32 - 1) and not reached(MASK32 - 1, 2)  # across the wrap


def test_layers_in_order_and_entries_reused_without_reset(pair: tuple[ProgressWriter, ProgressPage]) -> None:
    writer, page = pair
    seen_bases = set()
    for _ in range(10):  # more loads than entries: each entry carries on from where its last load ended
        loads = [page.begin(layers=3) for _ in range(4)]
        assert page.begin(layers=3) is None, "more loads than entries were handed out"
        for load in loads:
            assert load is not None
            seen_bases.add((load.slot, load.base))
            assert not page.ready(load, 0) and not page.wait(load, 0, timeout_s=0.01)
            writer.layer_done(load.slot, load.target(0))
            assert page.ready(load, 0) and not page.ready(load, 1)
            assert page.wait(load, 0, timeout_s=0.01)
            writer.finish(load.slot, load.final, ok=True)
            assert page.wait(load, 2, timeout_s=1) and page.status(load) == STATUS_OK and page.finished(load)
            page.end(load)
    assert len(seen_bases) == 40


def test_a_failed_load_releases_its_waits(pair: tuple[ProgressWriter, ProgressPage]) -> None:
    writer, page = pair
    load = page.begin(layers=4)
    assert load is not None
    writer.layer_done(load.slot, load.target(0))
    writer.finish(load.slot, load.final, ok=False)
    assert page.ready(load, 3), "a failed load must still release every wait"
    assert not page.wait(load, 3, timeout_s=1) and page.status(load) == STATUS_FAILED


def test_a_waiting_thread_wakes_on_each_layer(pair: tuple[ProgressWriter, ProgressPage]) -> None:
    writer, page = pair
    load = page.begin(layers=2)
    assert load is not None
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(page.wait(load, 1, timeout_s=10)))
    waiter.start()
    time.sleep(0.05)
    writer.layer_done(load.slot, load.target(0))
    time.sleep(0.05)
    assert waiter.is_alive(), "woke before its layer was in place"
    writer.layer_done(load.slot, load.target(1))
    waiter.join(timeout=5)
    assert results == [True]


def test_the_writer_killed_mid_load_releases_the_waiter() -> None:
    parent, child = socket.socketpair()
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.progress_writer", f"--fd={child.fileno()}"],
        pass_fds=[child.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    child.close()
    assert writer.stdin is not None and writer.stdout is not None
    try:
        _, (page_fd, wake_fd), _, _ = socket.recv_fds(parent, 16, 2)
        page = ProgressPage(page_fd, wake_fd=wake_fd, lease_fd=os.dup(parent.fileno()))
        os.close(page_fd)
        load = page.begin(layers=8)
        assert load is not None
        writer.stdin.write(f"layer {load.slot} {load.target(2)}\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "ok"
        assert page.wait(load, 2, timeout_s=5)
        threading.Timer(0.2, os.kill, (writer.pid, signal.SIGKILL)).start()
        start = time.monotonic()
        assert not page.wait(load, 7, timeout_s=30), "a wait outlived the daemon"
        assert time.monotonic() - start < 5 and page.daemon_gone
        page.release(load)
        assert page.finished(load) and page.status(load) == STATUS_FAILED
        assert page.begin(layers=1) is None, "no new in-step load once the daemon is gone"
        page.close()
    finally:
        writer.kill()
        writer.wait()
        parent.close()


def test_counter_words_do_not_overlap() -> None:
    assert len({counter_word(s) for s in range(100)} | {counter_word(s) + 1 for s in range(100)}) == 200
