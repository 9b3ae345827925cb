"""A process that owns a ShmIndex (as the daemon does), hands a reader fd to its parent and churns the index.

    python -m tests.helpers.index_writer --fd N --stable 40 --churn 400 --live 50 --capacity 64 --seconds 2

Publishes `--stable` blocks (keys `key("stable", i)`) and keeps them published throughout; then, until
`--seconds` pass, publishes and withdraws blocks from a pool of `--churn` keys so that about `--live` of them are
published at any time, in a small table, so cuckoo relocations keep moving the stable blocks. The reader fd goes
over the Unix socket `--fd` (SCM_RIGHTS) once the stable blocks are in; a JSON line with the index's counters goes
to stdout at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import time

from kvd.memory.shm_index import ShmIndex, Source


def key(kind: str, i: int) -> bytes:
    return hashlib.blake2b(f"{kind}/{i}".encode(), digest_size=32).digest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--stable", type=int, default=40)
    parser.add_argument("--churn", type=int, default=400)
    parser.add_argument("--live", type=int, default=50)
    parser.add_argument("--capacity", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()

    index = ShmIndex(capacity_blocks=args.capacity, tp_world_size=1, boot_id="writer", group_key="churn")
    index.add_many([key("stable", i) for i in range(args.stable)], 0, Source.HOST)
    with socket.socket(fileno=args.fd) as sock:
        reader_fd = index.open_reader_fd()
        socket.send_fds(sock, [b"index"], [reader_fd])
        rng = random.Random(0)
        live: list[bytes] = []
        deadline = time.monotonic() + args.seconds
        changes = 0
        while time.monotonic() < deadline:
            if len(live) < args.live:
                block = key("churn", rng.randrange(args.churn))
                if block not in live:
                    index.add(block, 0, Source.HOST)
                    live.append(block)
            else:
                index.discard(live.pop(rng.randrange(len(live))), 0, Source.HOST)
            changes += 1
        print(json.dumps({"changes": changes, **index.counters()}), flush=True)
        sock.recv(1)  # the parent closes its end once it stopped reading
    index.close()


if __name__ == "__main__":
    main()
