"""In-process KvdClient helpers: wait for one operation's completion among everything poll_finished returns."""

from __future__ import annotations

from kvd_client import Completion, KvdClient


class Completions:
    """Collects `client.poll_finished()`; `wait(op_id)` returns that operation's Completion."""

    def __init__(self, client: KvdClient) -> None:
        self.client = client
        self._done: dict[int, Completion] = {}

    def poll(self) -> None:
        for completion in self.client.poll_finished():
            self._done[completion.op_id] = completion

    def wait(self, op_id: int, timeout: float = 10.0) -> Completion:
        self.poll()
        if op_id in self._done:
            return self._done.pop(op_id)
        # KvdClient.wait blocks on a condition: no busy loop holding the GIL against the client's own thread.
        for completion in self.client.wait([op_id], timeout_s=timeout):
            if completion.op_id == op_id:
                return completion
        raise TimeoutError(f"operation {op_id} did not complete within {timeout:.1f}s")

    def done(self, op_id: int) -> Completion | None:
        """The completion if it already arrived (no waiting)."""
        self.poll()
        return self._done.pop(op_id, None)
