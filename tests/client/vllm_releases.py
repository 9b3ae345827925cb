"""Fetch the Python sources of the vLLM releases the connector supports beyond the installed one.

vLLM 0.33 and 0.34 ship as CUDA wheels only; their schedulers are pure Python and run on a CPU with the CPU torch
of the test environment. This downloads each wheel (`pip download --no-deps`), extracts only `vllm/**` without the
compiled extensions into DEST/<version>/, and deletes the wheel. A release that cannot be fetched leaves
DEST/<version>.error with the reason, which the tests report when they skip it.

    python tests/client/vllm_releases.py DEST 0.33.0 0.34.0
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

DOWNLOAD_TIMEOUT_S = 600


def _extract(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            name = member.filename
            if not name.startswith("vllm/") or name.endswith((".so", "/")) or ".so." in name:
                continue
            archive.extract(member, target)


def fetch(dest: Path, version: str) -> str:
    """Fetch one release into dest/<version>; a line saying what happened."""
    target, error = dest / version, dest / f"{version}.error"
    if (target / "vllm" / "__init__.py").exists():
        return f"vllm {version}: present"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vllm-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-d", tmp, f"vllm=={version}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            error.write_text(f"pip download vllm=={version} timed out after {DOWNLOAD_TIMEOUT_S} s\n")
            return f"vllm {version}: download timed out"
        wheels = list(Path(tmp).glob("vllm-*.whl"))
        if done.returncode != 0 or not wheels:
            error.write_text(f"pip download vllm=={version} failed: {done.stderr.strip()[-500:]}\n")
            return f"vllm {version}: download failed"
        size = wheels[0].stat().st_size
        partial = dest / f"{version}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        _extract(wheels[0], partial)
        partial.rename(target)
    error.unlink(missing_ok=True)
    return f"vllm {version}: {size / 2**20:.0f} MiB wheel, fetched and extracted in {time.monotonic() - started:.1f} s"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    dest = Path(argv[0])
    dest.mkdir(parents=True, exist_ok=True)
    for version in argv[1:]:
        print(fetch(dest, version), flush=True)
    return 0  # a release that could not be fetched is skipped by the tests, with the reason


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
