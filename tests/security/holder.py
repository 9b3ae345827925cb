"""A privileged process holding a secret in memory: what the identity attacks try to read and overwrite.

Run by a setuid-root copy of the interpreter (`python -I holder.py SECRET_FILE ADDR NBYTES`) that an agent execs in
place, or by root directly: it maps NBYTES at exactly ADDR, reads SECRET_FILE (root-only) into it, says
`{"event": "holder", "pid", "ids", "addr"}`, then answers `read` (its buffer, as it acts on it) and `exit` on stdin.
Standard library only: the interpreter runs isolated (-I), and as a setuid program.
"""

import ctypes
import json
import mmap
import os
import sys

MAP_FIXED_NOREPLACE = 0x100000


def main() -> int:
    secret_file, addr, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
    got = libc.mmap(ctypes.c_void_p(addr), nbytes, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    if got != addr:
        reply({"event": "holder_failed", "error": f"mmap at {addr:#x}: {os.strerror(ctypes.get_errno())}"})
        return 1
    with open(secret_file, "rb") as f:
        secret = f.read(nbytes)
    ctypes.memmove(addr, secret, len(secret))
    reply({"event": "holder", "pid": os.getpid(), "ids": [os.getresuid(), os.getresgid()], "addr": addr})
    for line in sys.stdin:
        cmd = json.loads(line).get("cmd")
        if cmd == "read":
            reply({"data": ctypes.string_at(addr, nbytes).hex()})
        elif cmd == "exit":
            reply({"bye": True})
            return 0
        else:
            reply({"error": f"unknown command {cmd}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
