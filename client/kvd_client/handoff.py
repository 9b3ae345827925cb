"""The two hand-offs between the caller's thread (vLLM's model or scheduler thread) and the client's loop thread.

`Inbox`: work from callers to the loop, appended to a deque, then (if the loop is not already woken) one byte on a
wake pipe. The byte is written with libc's write() through ctypes.PyDLL, which keeps the GIL: once the GIL is
dropped (as call_soon_threadsafe's socket send does), the busy background thread can keep it for the interpreter's
switch interval (5 ms), which the model thread would then wait out.

`Finished`: completions from the loop to callers, collected without blocking (`take_all`) or waited for (`wait`);
`settle_when_done`: a caller's future resolved by a task on the loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from kvd_client.types import Completion

T = TypeVar("T")
log = logging.getLogger(__name__)

_libc_keep_gil = ctypes.PyDLL(None, use_errno=True)
_libc_keep_gil.write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
_libc_keep_gil.write.restype = ctypes.c_ssize_t


class Inbox:
    def __init__(self) -> None:
        self._work: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_pending = False
        self.read_fd = self._write_fd = -1

    def open(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def post(self, work: Callable[[], None]) -> None:
        """Run `work` on the loop thread soon, from any thread, without ever releasing the GIL here."""
        self._work.append(work)
        if not self._wake_pending and self._write_fd >= 0:
            self._wake_pending = True
            _libc_keep_gil.write(self._write_fd, b"\0", 1)  # at most one byte is ever pending: never EAGAIN

    def drain(self) -> None:
        """Run everything posted so far (the loop's reader callback on `read_fd`)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.read_fd, 4096)
        self._wake_pending = False  # before draining: work posted from now on writes a new byte
        while True:
            try:
                work = self._work.popleft()
            except IndexError:
                return
            work()

    def close(self) -> None:
        """Only once nothing posts any more: an fd closed under a late writer could be reused."""
        if self._write_fd < 0:
            return
        read_fd, write_fd, self.read_fd, self._write_fd = self.read_fd, self._write_fd, -1, -1
        os.close(read_fd)
        os.close(write_fd)


class Finished:
    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._completions: collections.deque[Completion] = collections.deque()
        self._changed = threading.Condition(lock)

    def push(self, completion: Completion) -> None:
        with self._changed:
            self._completions.append(completion)
            self._changed.notify_all()

    def take_all(self) -> list[Completion]:
        """Every completion so far (never blocks)."""
        with self._lock:
            out = list(self._completions)
            self._completions.clear()
        return out

    def wait(self, op_ids: Iterable[int], timeout_s: float) -> list[Completion]:
        """Block until these operations finished or `timeout_s` passed; their completions (the others stay)."""
        wanted = set(op_ids)
        found: list[Completion] = []
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                keep: collections.deque[Completion] = collections.deque()
                for completion in self._completions:
                    (found if completion.op_id in wanted else keep).append(completion)
                self._completions = keep
                wanted -= {c.op_id for c in found}
                left = deadline - time.monotonic()
                if not wanted or left <= 0:
                    return found
                self._changed.wait(left)


def settle_when_done(
    future: concurrent.futures.Future[T], task: asyncio.Task[T], cancelled: Callable[[], BaseException]
) -> None:
    """Resolve the caller's `future` with `task`'s outcome (`cancelled()` if the task is cancelled), unless the
    future was failed already (by the client closing)."""

    def finished(task: asyncio.Task[T]) -> None:
        if future.done():  # failed by close() already
            return
        if task.cancelled():
            future.set_exception(cancelled())
        elif (error := task.exception()) is not None:
            future.set_exception(error)
        else:
            future.set_result(task.result())

    task.add_done_callback(finished)


def run_on_loop(loop: asyncio.AbstractEventLoop, coro: Any, timeout_s: float | None, what: str) -> None:
    """Run `coro` on the loop's thread; with a timeout, wait for it that long. Never raises: what it does is best
    effort (a daemon that is gone has dropped the session anyway)."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    if timeout_s is None:
        return
    try:
        future.result(timeout=timeout_s)
    except Exception as exc:  # must never raise into the caller
        log.debug("kvd client %s: %s", what, exc)
