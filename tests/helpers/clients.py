"""In-process KvdClient helpers: wait for one operation's completion among everything poll_finished returns; end a
client's session behind its back."""

from __future__ import annotations

from kvd_client import Completion, KvdClient
from kvd_client.wire.kvd.v1 import kvd_pb2

from tests.helpers.daemon import Daemon


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


def end_session(daemon: Daemon, client: KvdClient) -> str:
    """End the client's session behind its back, as a lease expiry would, and return its id. Only the session's
    owner holds its key, so the test borrows the client's (white-box: nothing else may end another's session)."""
    session = client._session
    daemon.stub().Unregister(kvd_pb2.UnregisterRequest(session_id=session.id, session_key=session.key), timeout=5)
    return session.id
