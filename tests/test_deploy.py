"""The deployment files: k8s/ manifests, the Dockerfile and the wheel it builds.

Manifests are validated offline against the Kubernetes OpenAPI schemas bundled with
kubernetes-validate (strict: unknown fields are errors), then held to the invariants the
DaemonSet must keep (scheduling, security, mounts, resources, probes), and the ConfigMap's
config file is read by our own loader.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from typing import Any

import pytest
import yaml

from trio_gpu_plugin._config import FLAGS, load_config_file, resolve_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"

#: The oldest Kubernetes the manifests must be valid for (schemas ship with the package).
KUBE_VERSION = "1.30.0"
#: bench/: the plugin's resident set serving a node.
MEASURED_RSS_MIB = 33
DEVICE_PLUGINS = "/var/lib/kubelet/device-plugins"
DRIVER_ROOT_CTR_PATH = "/driver-root"  # --driver-root-ctr-path's default
#: Set for the NVIDIA container runtime, not read by the plugin.
RUNTIME_ENVS = {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_MIG_MONITOR_DEVICES"}


def manifest_files() -> list[pathlib.Path]:
    return sorted(p for p in K8S.glob("*.y*ml") if p.name != "kustomization.yaml")


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in documents()
             if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} under k8s/, found {len(found)}"
    doc: dict[str, Any] = found[0]
    return doc


@pytest.fixture
def daemonset() -> dict[str, Any]:
    return find("DaemonSet", "trio-gpu-plugin")


@pytest.fixture
def pod(daemonset: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return spec


@pytest.fixture
def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = [c for c in pod["containers"] if c["name"] == "trio-gpu-plugin"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        assert "value" in item, f"env {item['name']} must be a literal value"
        assert item["name"] not in env, f"env {item['name']} set twice"
        env[item["name"]] = item["value"]
    return env


def mount_of(container: dict[str, Any], pod: dict[str, Any], mount_path: str
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"expected one mount at {mount_path}"
    volumes = [v for v in pod.get("volumes", []) if v["name"] == mounts[0]["name"]]
    assert len(volumes) == 1, f"mount {mount_path} names no (or several) volumes"
    return mounts[0], volumes[0]


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity_bytes(text: str) -> float:
    """A Kubernetes memory quantity in bytes (the suffixes a manifest here would use)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|k|M|G|)", str(text))
    assert match, f"unexpected memory quantity {text!r}"
    scale = _BINARY.get(match[2]) or _DECIMAL[match[2]]
    return float(match[1]) * scale


def metrics_port(container: dict[str, Any]) -> int:
    """The port of METRICS_ADDRESS, parsed as the plugin parses it."""
    from trio_gpu_plugin._metrics import parse_address

    return parse_address(env_of(container)["METRICS_ADDRESS"])[1]


# --------------------------------------------------------------------------------------
# Schemas


def test_kubernetes_validate_has_offline_schemas() -> None:
    import kubernetes_validate.utils as kv  # type: ignore[import-untyped]

    assert kv.major_minor(KUBE_VERSION) in {kv.major_minor(v) for v in kv.all_versions()}


@pytest.mark.parametrize("label,doc", documents(), ids=[label for label, _ in documents()])
def test_manifest_validates_strictly(label: str, doc: dict[str, Any]) -> None:
    import kubernetes_validate

    validated = kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    assert validated == "1.30"


def test_manifests_are_namespaced_in_kube_system() -> None:
    labels = documents()
    assert labels, "no manifests under k8s/"
    for label, doc in labels:
        assert doc["metadata"].get("namespace") == "kube-system", label
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "trio-gpu-plugin", label


def test_kustomization_lists_exactly_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "kube-system"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == [p.name for p in manifest_files()]


# --------------------------------------------------------------------------------------
# DaemonSet invariants


def test_daemonset_scheduling(daemonset: dict[str, Any], pod: dict[str, Any]) -> None:
    assert daemonset["metadata"]["namespace"] == "kube-system"
    assert daemonset["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "trio-gpu-plugin"}
    assert selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    assert pod["priorityClassName"] == "system-node-critical"
    assert not pod.get("hostNetwork", False)

    tolerations = pod["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert any(t["key"] == "CriticalAddonsOnly" and t["operator"] == "Exists"
               for t in tolerations)

    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    # One expression per term: the terms are ORed, expressions within a term ANDed.
    expressions = []
    for term in terms:
        assert len(term["matchExpressions"]) == 1, term
        expressions.append(term["matchExpressions"][0])
    for label in ("nvidia.com/gpu.present", "feature.node.kubernetes.io/pci-10de.present"):
        assert {"key": label, "operator": "In", "values": ["true"]} in expressions, label


def test_daemonset_security_context(container: dict[str, Any], pod: dict[str, Any]) -> None:
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert not security["capabilities"].get("add")
    assert security["readOnlyRootFilesystem"] is True
    assert not security.get("privileged", False)
    for key in ("hostPID", "hostIPC", "hostNetwork"):
        assert not pod.get(key, False), key
    # A read-only root filesystem needs a writable /tmp.
    _, tmp = mount_of(container, pod, "/tmp")
    assert "emptyDir" in tmp


def test_daemonset_mounts(container: dict[str, Any], pod: dict[str, Any]) -> None:
    mount, volume = mount_of(container, pod, DEVICE_PLUGINS)
    assert volume["hostPath"]["path"] == DEVICE_PLUGINS
    assert not mount.get("readOnly", False), "the plugin creates its sockets there"

    mount, volume = mount_of(container, pod, DRIVER_ROOT_CTR_PATH)
    assert mount["readOnly"] is True
    assert mount.get("mountPropagation", "None") in {"None", "HostToContainer"}
    host_root = env_of(container).get("NVIDIA_DRIVER_ROOT", "/")
    assert volume["hostPath"]["path"] == host_root

    # No other hostPath: the host is reached only through these two.
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {DEVICE_PLUGINS, host_root}


def test_daemonset_config_file_comes_from_the_configmap(
        container: dict[str, Any], pod: dict[str, Any]) -> None:
    config_file = pathlib.PurePosixPath(env_of(container)["CONFIG_FILE"])
    mount, volume = mount_of(container, pod, str(config_file.parent))
    # No subPath: a subPath mount never sees the ConfigMap's updates.
    assert "subPath" not in mount and mount["readOnly"] is True
    configmap = find("ConfigMap", volume["configMap"]["name"])
    assert config_file.name in configmap["data"]
    assert not volume["configMap"].get("items"), "items would rename or drop keys"


def test_daemonset_env_is_ours_and_valid(container: dict[str, Any]) -> None:
    env = env_of(container)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    # As NVIDIA's chart sets it where MIG may be used: NVML's MIG parent totals need it.
    assert env["NVIDIA_MIG_MONITOR_DEVICES"] == "all"
    assert env["LOG_FORMAT"] == "json"
    # Values the plugin reads must be accepted by it (raises ConfigError otherwise).
    _, warnings = resolve_config({}, env, None)
    assert warnings == []
    specs = {name: spec for spec in FLAGS for name in spec.envs}
    unknown = set(env) - specs.keys() - RUNTIME_ENVS
    assert not unknown, f"env the plugin does not read: {sorted(unknown)}"
    # Process-only flags (attr None) are not checked by resolve_config.
    for name, value in env.items():
        if name in specs and specs[name].kind == "choice":
            assert value in specs[name].choices, (name, value)
    metrics_port(container)


def test_daemonset_resources(container: dict[str, Any]) -> None:
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[kind].keys(), kind
    request = quantity_bytes(resources["requests"]["memory"])
    limit = quantity_bytes(resources["limits"]["memory"])
    assert request >= MEASURED_RSS_MIB * 2**20
    assert limit >= 2 * MEASURED_RSS_MIB * 2**20
    assert limit >= request


def test_daemonset_probes_use_the_metrics_port(container: dict[str, Any]) -> None:
    port = metrics_port(container)
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named.values()
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert named.get(get["port"], get["port"]) == port, probe
    liveness = container["livenessProbe"]
    assert liveness["initialDelaySeconds"] == 10
    assert liveness["periodSeconds"] == 10
    assert liveness["failureThreshold"] == 3


def test_daemonset_image(container: dict[str, Any]) -> None:
    image = container["image"]
    assert re.fullmatch(r"[\w.-]+(?::\d+)?/[\w./-]+:[\w.-]+", image), image
    assert not image.endswith(":latest")


# --------------------------------------------------------------------------------------
# ConfigMap


@pytest.fixture
def config_text() -> str:
    text: str = find("ConfigMap", "trio-gpu-plugin-config")["data"]["config.yaml"]
    return text


def test_configmap_config_resolves(config_text: str) -> None:
    config, warnings = resolve_config({}, {}, yaml.safe_load(config_text))
    assert warnings == []
    assert config.sharing.strategy == "time-slicing"
    slicing = config.sharing.time_slicing
    assert slicing is not None and slicing.rename_by_default is False
    assert [(r.name, r.replicas) for r in slicing.resources] == [("nvidia.com/gpu", 4)]


def test_configmap_config_loads_as_a_file(config_text: str, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config_text, encoding="utf-8")
    config, warnings = resolve_config({}, {"CONFIG_FILE": str(path)}, load_config_file(str(path)),
                                      source=f"config file {path}")
    assert warnings == []
    assert config.sharing.time_slicing is not None


# --------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations
    joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends in a continuation"
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        assert stages, f"{instruction} before the first FROM"
        stages[-1].append((instruction, args.strip()))
    return stages


def test_dockerfile_is_two_stage_and_compiler_free() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    build, final = stages
    assert re.fullmatch(r"python:3\.11-slim(@sha256:[0-9a-f]{64})? AS build", build[0][1],
                        re.IGNORECASE)
    assert re.fullmatch(r"python:3\.11-slim(@sha256:[0-9a-f]{64})?", final[0][1])
    compilers = re.compile(r"\b(gcc|g\+\+|clang|build-essential|apt-get|apt|apk|make)\b")
    for stage in stages:
        for instruction, args in stage:
            if instruction == "RUN":
                assert not compilers.search(args), args


def test_dockerfile_build_stage_builds_wheels() -> None:
    runs = [args for instruction, args in dockerfile_stages()[0] if instruction == "RUN"]
    assert any("pip wheel" in run and "[metrics]" in run for run in runs), runs


def test_dockerfile_final_stage_installs_local_wheels_only() -> None:
    final = dockerfile_stages()[1]
    installs = [args for instruction, args in final
                if instruction == "RUN" and "pip install" in args]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    assert "--no-index" in words
    assert "--find-links" in words and words[words.index("--find-links") + 1] == "/wheels"
    assert "trio-gpu-plugin[metrics]" in words
    for instruction, args in final:
        if instruction == "RUN":
            assert "pip wheel" not in args and "git " not in args, args
    env = " ".join(args for instruction, args in final if instruction == "ENV")
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert "NVIDIA_VISIBLE_DEVICES=all" in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    entrypoints = [args for instruction, args in final if instruction == "ENTRYPOINT"]
    assert entrypoints == ['["trio-gpu-plugin"]']


def test_dockerfile_exposes_the_metrics_port() -> None:
    container = find("DaemonSet", "trio-gpu-plugin")["spec"]["template"]["spec"]["containers"][0]
    exposed = [args for instruction, args in dockerfile_stages()[1] if instruction == "EXPOSE"]
    assert exposed == [str(metrics_port(container))]


def build_stage_copies() -> list[str]:
    """The repository paths the build stage copies into its context."""
    sources = []
    for instruction, args in dockerfile_stages()[0]:
        if instruction in {"COPY", "ADD"}:
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources.extend(words[:-1])
    return sources


def _can_build_offline() -> str | None:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return "setuptools is not installed"
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None:
        return "this setuptools needs the wheel package to build wheels"
    return None


@pytest.mark.slow
def test_the_dockerfile_wheel_builds(tmp_path: pathlib.Path) -> None:
    reason = _can_build_offline()
    if reason:
        pytest.skip(f"cannot build a wheel without build isolation: {reason}")
    # Only what the build stage copies (and .dockerignore lets through): a missing file
    # fails here as it would in `docker build`.
    context = tmp_path / "context"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.egg-info")
    for source in build_stage_copies():
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=ignore)
        else:
            shutil.copy2(src, context / source)
    wheels = tmp_path / "wheels"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), "."],
        check=False, cwd=context, env=env, capture_output=True, text=True, timeout=55)
    assert result.returncode == 0, result.stdout + result.stderr
    built = list(wheels.glob("trio_gpu_plugin-*.whl"))
    assert len(built) == 1, list(wheels.iterdir())
    with zipfile.ZipFile(built[0]) as wheel:
        names = set(wheel.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "trio-gpu-plugin = trio_gpu_plugin._cli:main" in wheel.read(entry_points).decode()
    assert {"trio_gpu_plugin/_cli.py", "trio_gpu_plugin/py.typed"} <= names
    assert "trio_gpu_plugin/proto/v1beta1.py" in names
    assert not any(n.startswith("tests/") or "__pycache__" in n for n in names)
