"""deploy/: the Kubernetes manifests, the sample config and the Containerfile agree with the daemon's contract."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from kvd.config import KvdConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SOCKET = "/run/kvd/kvd.sock"

Doc = dict[str, Any]


@pytest.fixture(autouse=True)
def _no_kvd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # KvdConfig reads KVD_* variables; the files alone must validate.
    for key in list(os.environ):
        if key.startswith("KVD_"):
            monkeypatch.delenv(key)


def load(name: str) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d is not None]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
    return docs


def by_kind(docs: list[Doc], kind: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container(pod: Doc, name: str) -> Doc:
    (found,) = [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name]
    return found


def quantity(text: str | int) -> int:
    """A Kubernetes memory quantity ("20Gi", "512Mi", "8G", "1024") in bytes."""
    match = re.fullmatch(r"(\d+)([KMGTE]i?)?", str(text))
    assert match, f"unparsable quantity {text!r}"
    number, suffix = int(match[1]), match[2] or ""
    powers = {"K": 1, "M": 2, "G": 3, "T": 4, "E": 6}
    return number * ((1024 if suffix.endswith("i") else 1000) ** powers[suffix[0]] if suffix else 1)


def config_of(configmap: Doc) -> KvdConfig:
    data = tomllib.loads(configmap["data"]["kvd.toml"])
    return KvdConfig(**data)


def probe_argv(c: Doc, probe: str) -> list[str]:
    argv: list[str] = c[probe]["exec"]["command"]
    return argv


def assert_health_probes(c: Doc) -> None:
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        argv = probe_argv(c, probe)
        assert argv[:2] == ["kvd", "health"], (probe, argv)
        assert argv[argv.index("--socket") + 1] == SOCKET
    # Readiness and startup wait for SERVING; liveness only for an answer (a draining daemon is alive).
    assert "--live" in probe_argv(c, "livenessProbe")
    assert "--live" not in probe_argv(c, "readinessProbe")
    assert "--live" not in probe_argv(c, "startupProbe")
    # Pinning the pool takes time: the startup probe must allow for more than a minute.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def assert_config_mounted(c: Doc, pod: Doc, configmap: Doc) -> None:
    args = c["args"]
    path = Path(args[args.index("--config") + 1])
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert path.name in configmap["data"]


def assert_memory_covers_pool(c: Doc, config: KvdConfig) -> None:
    limit = quantity(c["resources"]["limits"]["memory"])
    # Pinned memory is charged to the container: the limit must hold the pool plus the daemon itself.
    assert limit >= config.host_pool.capacity_bytes + (1 << 30)
    assert quantity(c["resources"]["requests"]["memory"]) == limit  # no overcommit for pinned memory


def assert_hardened(c: Doc) -> None:
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]


def env_of(c: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


# ---- the DaemonSet ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemonset_docs() -> list[Doc]:
    return load("daemonset.yaml")


def test_daemonset_configmap_is_a_valid_config(daemonset_docs: list[Doc]) -> None:
    config = config_of(by_kind(daemonset_docs, "ConfigMap"))
    assert str(config.socket) == SOCKET
    assert config.socket_mode == 0o660
    assert config.metrics.port is not None and config.metrics.host == "0.0.0.0"  # scraped on the pod IP


def test_daemonset_pod(daemonset_docs: list[Doc]) -> None:
    ds = by_kind(daemonset_docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    config = config_of(by_kind(daemonset_docs, "ConfigMap"))
    kvd = container(pod, "kvd")

    assert pod["hostIPC"] is True and pod["hostPID"] is True
    assert pod.get("hostNetwork", False) is False
    assert pod["terminationGracePeriodSeconds"] > config.drain_timeout_s
    assert pod["securityContext"]["runAsNonRoot"] is True

    # The socket directory is the host's /run/kvd, mounted where the config puts the socket.
    (socket_volume,) = [v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == "/run/kvd"]
    assert {"name": socket_volume["name"], "mountPath": "/run/kvd"} in kvd["volumeMounts"]
    assert config.socket.parent == Path("/run/kvd")

    assert_health_probes(kvd)
    assert_config_mounted(kvd, pod, by_kind(daemonset_docs, "ConfigMap"))
    assert_memory_covers_pool(kvd, config)
    assert_hardened(kvd)

    # Sees every GPU without taking any away from the workers.
    assert env_of(kvd)["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "nvidia.com/gpu" not in json.dumps(kvd["resources"])

    ports = {p["containerPort"] for p in kvd["ports"]}
    assert config.metrics.port in ports


# ---- the sidecar Deployment ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sidecar_docs() -> list[Doc]:
    return load("sidecar.yaml")


def test_sidecar_pod(sidecar_docs: list[Doc]) -> None:
    pod = by_kind(sidecar_docs, "Deployment")["spec"]["template"]["spec"]
    configmap = by_kind(sidecar_docs, "ConfigMap")
    config = config_of(configmap)
    assert str(config.socket) == SOCKET

    assert pod["shareProcessNamespace"] is True
    kvd = container(pod, "kvd")
    assert kvd in pod["initContainers"] and kvd["restartPolicy"] == "Always"  # a native sidecar: starts first
    vllm = container(pod, "vllm")

    # Both containers mount the same emptyDir where the socket lives.
    (socket_volume,) = [v for v in pod["volumes"] if "emptyDir" in v and v["name"] == "kvd-socket"]
    for c in (kvd, vllm):
        assert {"name": socket_volume["name"], "mountPath": str(config.socket.parent)} in c["volumeMounts"]

    assert_health_probes(kvd)
    assert_config_mounted(kvd, pod, configmap)
    assert_memory_covers_pool(kvd, config)
    assert_hardened(kvd)
    assert env_of(kvd)["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1

    args = vllm["args"]
    transfer = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert transfer == {
        "kv_connector": "KvdConnector",
        "kv_connector_module_path": "kvd_client.vllm.connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": str(config.socket)},
    }


# ---- the sample config --------------------------------------------------------------------------------------------


def test_sample_config_validates() -> None:
    sample = DEPLOY / "kvd.toml"
    data = tomllib.loads(sample.read_text())
    direct = KvdConfig(**data)
    assert direct == KvdConfig.load(sample)  # the same through the real TOML source
    assert str(direct.socket) == SOCKET and direct.socket_mode == 0o660


def test_sample_config_documents_every_field() -> None:
    """Every KvdConfig field appears in the sample, set or commented out, in its own section."""
    text = (DEPLOY / "kvd.toml").read_text()
    section = ""
    keys: set[str] = set()
    for line in text.splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m[1]
        elif m := re.match(r"^#?\s*(\w+)\s*=", line):
            keys.add(f"{section}.{m[1]}" if section else m[1])
    expected: set[str] = set()
    for name, field in KvdConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            expected |= {f"{name}.{sub}" for sub in annotation.model_fields}
        else:
            expected.add(name)
    assert expected - keys == set(), "fields missing from deploy/kvd.toml"
    assert keys - expected == set(), "keys in deploy/kvd.toml that KvdConfig does not have"


def test_sample_config_rejects_typos(tmp_path: Path) -> None:
    # extra="forbid" is what makes the two tests above meaningful.
    with pytest.raises(pydantic.ValidationError):
        KvdConfig(**tomllib.loads("[host_pool]\ncapacity = 1\n"))


# ---- the Containerfile --------------------------------------------------------------------------------------------


def containerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_containerfile() -> None:
    instructions = containerfile_instructions()
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in instructions if word == "ARG" and "=" in rest
    }
    assert args["PYTHON_IMAGE"] == "python:3.12-slim"
    assert all(rest.split()[0] in ("${PYTHON_IMAGE}", "python:3.12-slim") for w, rest in instructions if w == "FROM")

    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    # Both distributions, the client first (the daemon depends on it); the daemon optionally with extras.
    assert re.search(r'pip install \./client "?\.(\$\{KVD_EXTRAS:\+\[\$\{KVD_EXTRAS\}\]\})?"?(\s|$)', runs), runs

    (user,) = [rest for word, rest in instructions if word == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (entrypoint,) = [rest for word, rest in instructions if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["kvd", "serve"]
    (healthcheck,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[:2] == ["kvd", "health"] and command[command.index("--socket") + 1] == SOCKET
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    assert dict(item.split("=", 1) for item in shlex.split(env) if "=" in item)["KVD_SOCKET"] == SOCKET
