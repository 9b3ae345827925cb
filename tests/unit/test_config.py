"""The configuration's sections, one per layer, and the old `[engine]` section refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kvd.config import KvdConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_kvd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("KVD_")]:
        monkeypatch.delenv(name)


def test_sections_match_the_layers() -> None:
    config = KvdConfig.load()
    assert config.transports.cpu_copy_threads == 4 and config.transports.cuda_completion_wait == "poll"
    assert config.max_inflight_ops == 64 and config.runtime.gil_switch_interval_us == 500
    assert not hasattr(config, "engine")


def test_the_sample_file_loads() -> None:
    config = KvdConfig.load(ROOT / "deploy" / "kvd.toml")
    assert config.transports.cuda_chunk_bytes == 64 << 20 and config.max_inflight_ops == 64


def test_an_old_engine_section_is_an_error_that_names_the_new_place(tmp_path: Path) -> None:
    old = tmp_path / "old.toml"
    old.write_text("[engine]\ncpu_copy_threads = 2\n")
    with pytest.raises(ValidationError, match=r"\[transports\]"):
        KvdConfig.load(old)


def test_an_old_engine_variable_is_an_error_that_names_the_new_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVD_ENGINE__CPU_COPY_THREADS", "2")
    with pytest.raises(ValueError, match=r"KVD_ENGINE__CPU_COPY_THREADS.*KVD_TRANSPORTS__"):
        KvdConfig.load()


def test_new_variables_reach_their_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVD_TRANSPORTS__CPU_COPY_THREADS", "2")
    monkeypatch.setenv("KVD_RUNTIME__GIL_SWITCH_INTERVAL_US", "1000")
    monkeypatch.setenv("KVD_MAX_INFLIGHT_OPS", "8")
    config = KvdConfig.load()
    assert (config.transports.cpu_copy_threads, config.runtime.gil_switch_interval_us) == (2, 1000)
    assert config.max_inflight_ops == 8
