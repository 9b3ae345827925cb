"""Attack 6 of issue #12: a block larger than the GPU staging chunk.

The CUDA transport stages every copy through chunk-sized device buffers (`transports.cuda_chunk_bytes`) and assumed a
block fits one; a block larger than the chunk (a pool slab raised, as an error message advised) would have been
gathered past the end of its staging buffer. Registration now refuses such a layout, naming both sizes and the keys,
before any device is touched: this runs on a daemon without a GPU too.
"""

from __future__ import annotations

from tests.conftest import DaemonFactory
from tests.helpers.daemon import MiB
from tests.helpers.rpc import token
from tests.security.kit import cuda_request, raw_call

CHUNK = 1 * MiB


def test_a_block_larger_than_the_staging_chunk_is_refused_at_registration(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(
        slab_bytes=4 * MiB,  # the pool would take the block: only the staging chunk is too small
        env={"KVD_TRANSPORTS__CUDA_CHUNK_BYTES": str(CHUNK)},
    )
    request = cuda_request(token(daemon.socket), block_bytes=2 * MiB)
    code, details, _ = raw_call(daemon.channel(), "RegisterSession", request.SerializeToString())
    assert code == "INVALID_ARGUMENT", f"{code}: {details}"
    assert str(2 * MiB) in details and str(CHUNK) in details, details
    assert "cuda_chunk_bytes" in details, details


def test_the_slab_message_names_every_limit_a_block_must_fit(daemon_factory: DaemonFactory) -> None:
    """Raising host_pool.slab_bytes alone is not enough for a GPU worker: the advice names the chunk too."""
    daemon = daemon_factory(slab_bytes=1 * MiB)
    request = cuda_request(token(daemon.socket), block_bytes=2 * MiB)
    code, details, _ = raw_call(daemon.channel(), "RegisterSession", request.SerializeToString())
    assert code == "INVALID_ARGUMENT", f"{code}: {details}"
    assert "slab_bytes" in details and "cuda_chunk_bytes" in details, details
