"""The one entry point of a save or a load, whichever way it came: a Save/Load RPC (kvd.rpc.servicer) or a record on
the session's submission ring (kvd.rpc.ring). Both go through here, so both get the same checks, limits and
statuses, in the same order."""

from __future__ import annotations

from kvd.errors import InvalidArgument
from kvd.service.service import KvdService
from kvd.types import BlockBatch, DaemonStages, InStep, OpKind, SessionRef

IPC_HANDLE_BYTES = 64


def start_transfer(
    service: KvdService,
    kind: OpKind,
    ref: SessionRef,
    blocks: BlockBatch,
    ready_event: bytes,
    client_tag: int,
    stamps: DaemonStages,
    in_step: InStep | None = None,  # loads only: an in-step load's progress entry (kvd_client.progress)
) -> int:
    """Validate and start the operation (service.save / service.load); its id. Raises the KvdError the caller
    answers with (an RPC status, or a ring record's refusal notice)."""
    if ready_event and len(ready_event) != IPC_HANDLE_BYTES:
        raise InvalidArgument(f"an IPC event handle is {IPC_HANDLE_BYTES} bytes, got {len(ready_event)}")
    if kind is OpKind.SAVE:
        if in_step is not None:
            raise InvalidArgument("in_step is for loads")
        return service.save(ref, blocks, ready_event, client_tag, stamps)
    return service.load(ref, blocks, ready_event, client_tag, stamps, in_step)
