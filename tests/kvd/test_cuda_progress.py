"""In-step loads on the GPU, the worker's side: the current stream waits on a progress counter (cuStreamWaitValue32),
never on the host, is released exactly when the counter reaches the layer's value, and is released by the worker
itself when the daemon dies. Needs a CUDA GPU (run on the device); skipped elsewhere."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from kvd_client.cuda_progress import StreamProgress  # noqa: E402
from kvd_client.progress import ProgressPage  # noqa: E402

from kvd.memory.progress import ProgressWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _current_stream() -> int:
    return int(torch.cuda.current_stream().cuda_stream)


def _pending(event: torch.cuda.Event, seconds: float) -> bool:
    """True if `event` is still not complete after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if event.query():
            return False
        time.sleep(0.005)
    return True


def _complete_within(event: torch.cuda.Event, seconds: float) -> bool:
    return not _pending(event, seconds)


def test_the_current_stream_waits_for_each_layer_and_is_never_switched() -> None:
    torch.cuda.init()
    writer = ProgressWriter(slots=4)
    page_fd, wake_fd = writer.client_fds()
    page = ProgressPage(page_fd, wake_fd=wake_fd)
    os.close(page_fd)
    stream_before = torch.cuda.current_stream()
    waits = StreamProgress(page, _current_stream)
    try:
        load = page.begin(layers=3)
        assert load is not None
        x = torch.zeros(1 << 20, device="cuda")
        # The kernel queued after the waits runs once before them: under CUDA's lazy module loading its first
        # launch could wait for the context to go idle, waits included, and this thread writes the counters.
        x += 1
        x -= 1
        torch.cuda.synchronize()
        after = []
        for layer in range(3):
            waits.wait(load, layer)
            x += 1  # the "attention" of this layer: queued after its wait
            event = torch.cuda.Event()
            event.record()
            after.append(event)
        assert torch.cuda.current_stream() == stream_before, "kvd changed the current stream"
        assert _pending(after[0], 0.3), "the stream ran past a layer that was not in place"
        writer.layer_done(load.slot, load.target(0))
        assert _complete_within(after[0], 5) and _pending(after[1], 0.2)
        writer.finish(load.slot, load.final, ok=True)
        assert _complete_within(after[2], 5)
        assert float(x[0]) == 3.0
        page.end(load)
        # The entry is reused without a reset: a wait of the next load on it waits for the next values only.
        again = page.begin(layers=1)
        assert again is not None and again.base == load.final
    finally:
        torch.cuda.synchronize()
        waits.close()
        page.close()
        writer.close()


def test_a_daemon_killed_mid_load_never_hangs_the_stream() -> None:
    torch.cuda.init()
    parent, child = socket.socketpair()
    helper = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.progress_writer", f"--fd={child.fileno()}"],
        pass_fds=[child.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    child.close()
    try:
        _, (page_fd, wake_fd), _, _ = socket.recv_fds(parent, 16, 2)
        page = ProgressPage(page_fd, wake_fd=wake_fd, lease_fd=os.dup(parent.fileno()))
        os.close(page_fd)
        waits = StreamProgress(page, _current_stream)
        load = page.begin(layers=4)
        assert load is not None
        for layer in range(4):
            waits.wait(load, layer)
        done = torch.cuda.Event()
        done.record()
        os.kill(helper.pid, signal.SIGKILL)
        assert not page.wait(load, 3, timeout_s=10) and page.daemon_gone
        page.release(load)  # what the client does for every unfinished in-step load
        assert _complete_within(done, 5), "the stream still waits on a dead daemon"
        waits.close()
        page.close()
    finally:
        helper.kill()
        helper.wait()
        parent.close()
