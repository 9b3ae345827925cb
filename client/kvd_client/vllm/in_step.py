"""In-step loads, worker side: hits in the daemon's host memory loaded inside the step that schedules the request.

The scheduler answers (n, False) for them, so vLLM runs the request in this step; start_load_kv asks the daemon for
a layer-ordered load, and each attention layer's wait_for_layer_load waits only for its own layer (CPU caches: the
thread sleeps on the progress page's eventfd until the layer's counter arrives; CUDA caches: the current stream
waits on the counter with cuStreamWaitValue32, no host wait, no stream switch), so copying layer i overlaps the
compute of the layers before it. Before the step's errors are reported (get_block_ids_with_load_errors), every
in-step load has ended: failed blocks come from the completion notice, all of them when the daemon died (then the
worker stores the entry's final counter itself so that no stream or thread waits on a dead daemon).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvd_client.progress import STATUS_FAILED, StepLoad
from kvd_client.vllm.clients import ClientLike
from kvd_client.vllm.metadata import BlockOp

if TYPE_CHECKING:
    from kvd_client import Completion

log = logging.getLogger(__name__)


@dataclass
class _Active:
    op_id: int
    load: StepLoad | None  # None: no progress page (the load is waited for whole, before the first layer reads)
    page: Any  # the progress page `load` is an entry of: a daemon restart brings a new page, never for this load
    block_of: dict[bytes, int]  # hash -> block id
    waited: bool = False
    completion: Completion | None = None


class InStepLoads:
    """This step's in-step loads."""

    def __init__(self, layer_names: list[str], timeout_s: float, cuda: bool) -> None:
        self._layer_of = {name: i for i, name in enumerate(layer_names)}
        self._layers = len(layer_names)
        self._timeout_s = timeout_s
        self._cuda = cuda
        # kvd_client.cuda_progress.StreamProgress per progress page (a daemon restart brings a new page). One of an
        # old page stays registered: the GPU may still have to pass waits queued on it, and it is a few KiB.
        self._streams: dict[int, tuple[Any, Any]] = {}
        self._active: list[_Active] = []

    def start(self, client: ClientLike, op: BlockOp) -> None:
        page = _page(client)
        load = page.begin(self._layers) if page is not None else None
        op_id = client.load(op.pairs(), in_step=load)
        block_of = dict(zip(op.block_hashes, op.block_ids, strict=True))
        self._active.append(_Active(op_id, load, page if load is not None else None, block_of))

    def wait_layer(self, client: ClientLike, layer_name: str) -> None:
        layer = self._layer_of.get(layer_name)
        if layer is None or not self._active:
            return
        for active in self._active:
            if active.load is None:
                self._wait_whole(client, active)
            elif self._cuda:
                self._stream_waits(active.page).wait(active.load, layer)
            else:
                active.page.wait(active.load, layer, self._timeout_s)

    def settle(self, client: ClientLike) -> tuple[set[int], int]:
        """End every in-step load of the step: (blocks that did not load, how many loads there were)."""
        failed: set[int] = set()
        for active in self._active:
            load, page = active.load, active.page
            if load is None:
                failed |= self._failed_blocks(client, active, None)
                continue
            ok = page.wait(load, self._layers - 1, self._timeout_s) and page.finished(load)
            if not page.finished(load):  # the daemon died or hangs: release every wait on the entry ourselves
                page.release(load)
            if not ok or page.status(load) == STATUS_FAILED:
                failed |= self._failed_blocks(client, active, page)
            page.end(load)
        count, self._active = len(self._active), []
        return failed, count

    def _failed_blocks(self, client: ClientLike, active: _Active, page: Any) -> set[int]:
        """From the load's completion notice; every block when none comes (the daemon is gone)."""
        if not active.waited:
            timeout = 0.0 if page is not None and page.daemon_gone else self._timeout_s
            self._collect(client, active, timeout)
        done = active.completion
        if done is None:
            return set(active.block_of.values())
        hashes = done.failed_hashes if (done.failed_hashes or done.ok) else frozenset(active.block_of)
        return {active.block_of[h] for h in hashes if h in active.block_of}

    def _wait_whole(self, client: ClientLike, active: _Active) -> None:
        if not active.waited:
            self._collect(client, active, self._timeout_s)
            if active.completion is not None:
                client.wait_loaded(active.completion)  # CUDA: the current stream waits on the daemon's event

    def _collect(self, client: ClientLike, active: _Active, timeout_s: float) -> None:
        got = client.wait([active.op_id], timeout_s)
        active.waited, active.completion = True, (got[0] if got else None)

    def _stream_waits(self, page: Any) -> Any:
        known = self._streams.get(id(page))  # the page is kept with it: its id cannot be reused while kept
        if known is None:
            from kvd_client.cuda import current_stream
            from kvd_client.cuda_progress import StreamProgress

            known = self._streams[id(page)] = (page, StreamProgress(page, current_stream))
        return known[1]


def _page(client: ClientLike) -> Any:
    index = getattr(client, "index", None)
    return getattr(index, "page", None)
