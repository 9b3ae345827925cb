"""Fixtures shared by the vLLM tests."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama (2 layers, 2 KV heads of 32), generated once per session."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    out = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([sys.executable, str(WORKER), "make-model", str(out)], check=True, capture_output=True)
    return out
