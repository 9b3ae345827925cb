"""A process that owns a progress page, as the daemon does, and advances it on command.

    python -m tests.helpers.progress_writer --fd N

Sends the page's fd and its wake eventfd over the Unix socket `--fd` (SCM_RIGHTS) and keeps that socket open as
the worker's lease until it exits; then reads commands from stdin, one per line: `layer SLOT VALUE`,
`finish SLOT FINAL OK(0|1)`, `exit`. Prints `ok` after each.
"""

from __future__ import annotations

import argparse
import socket
import sys

from kvd.memory.progress import ProgressWriter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    writer = ProgressWriter(slots=8)
    lease = socket.socket(fileno=args.fd)
    socket.send_fds(lease, [b"progress"], list(writer.client_fds()))
    for line in sys.stdin:
        command, *numbers = line.split()
        values = [int(n) for n in numbers]
        if command == "layer":
            writer.layer_done(values[0], values[1])
        elif command == "finish":
            writer.finish(values[0], values[1], bool(values[2]))
        else:
            break
        print("ok", flush=True)
    writer.close()
    lease.close()


if __name__ == "__main__":
    main()
