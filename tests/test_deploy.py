"""The deployment files: k8s/ manifests, the Dockerfile and the wheel it builds.

Manifests are validated offline against the Kubernetes OpenAPI schemas bundled with
kubernetes-validate (strict: unknown fields are errors), then held to the invariants the
DaemonSet must keep (scheduling, security, mounts, resources, probes), and the ConfigMap's
config file is read by our own loader.  What ``kubectl apply -k`` would apply is rendered
here (the kustomize features the files use, checked against ``kubectl kustomize`` where
one is installed): the default advertises whole GPUs only, sharing is an opt-in
component.  The image is held to its pins: base digest, k8s/constraints.txt against
setup.cfg and the installed dependency tree, tag and labels against the package version.
"""

from __future__ import annotations

import configparser
import fnmatch
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
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from trio_gpu_plugin import __version__
from trio_gpu_plugin._config import FLAGS, load_config_file, resolve_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = K8S / "constraints.txt"
TIME_SLICING = K8S / "components" / "time-slicing"

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
    # The plugin exits when CONFIG_FILE is missing: an optional volume would turn a
    # missing ConfigMap into a crash loop; a required one holds the pod in
    # ContainerCreating with the kubelet's FailedMount event naming the ConfigMap.
    assert volume["configMap"].get("optional", False) is False


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


def test_daemonset_image_tag_is_the_package_version(container: dict[str, Any]) -> None:
    tag = container["image"].rpartition(":")[2]
    assert tag == __version__, (
        f"k8s/daemonset.yaml's image tag {tag!r} is not the package version {__version__!r} "
        "(trio_gpu_plugin/_version.py), which the Dockerfile builds")


# --------------------------------------------------------------------------------------
# ConfigMap


@pytest.fixture
def config_text() -> str:
    text: str = find("ConfigMap", "trio-gpu-plugin-config")["data"]["config.yaml"]
    return text


def test_configmap_config_resolves_to_whole_gpus_only(config_text: str) -> None:
    assert yaml.safe_load(config_text) == {"version": "v1"}
    config, warnings = resolve_config({}, {}, yaml.safe_load(config_text))
    assert warnings == []
    assert config.sharing.time_slicing is None and config.sharing.mps is None
    # The same configuration as no config file at all.
    assert config == resolve_config({}, {}, None)[0]


def test_configmap_config_loads_as_a_file(config_text: str, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config_text, encoding="utf-8")
    config, warnings = resolve_config({}, {"CONFIG_FILE": str(path)}, load_config_file(str(path)),
                                      source=f"config file {path}")
    assert warnings == []
    assert config.sharing == resolve_config({}, {}, None)[0].sharing


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
    assert "trio-gpu-plugin[metrics]==${VERSION}" in words
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
            (context / source).parent.mkdir(parents=True, exist_ok=True)
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
        scripts = wheel.read(entry_points).decode()
        assert "trio-gpu-plugin = trio_gpu_plugin._cli:main" in scripts
        assert "nvidia-device-plugin = trio_gpu_plugin._cli:main" in scripts
    assert {"trio_gpu_plugin/_cli.py", "trio_gpu_plugin/py.typed"} <= names
    assert "trio_gpu_plugin/proto/v1beta1.py" in names
    assert not any(n.startswith("tests/") or "__pycache__" in n for n in names)


# --------------------------------------------------------------------------------------
# kustomize: what `kubectl apply -k` applies

#: The kustomization keys the renderer below implements; a kustomization here using any
#: other fails, so the renderer cannot silently check less than kustomize applies.
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "namespace",
                  "labels"}


def _kustomization(directory: pathlib.Path, kind: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(
        (directory / "kustomization.yaml").read_text(encoding="utf-8"))
    assert data["kind"] == kind, f"{directory}: expected a {kind}, found {data['kind']}"
    unknown = set(data) - KUSTOMIZE_KEYS
    assert not unknown, f"{directory}: kustomize keys this test does not render: {unknown}"
    return data


def _merge(target: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    """A strategic merge patch of maps only (a list would need kustomize's merge keys)."""
    for key, value in patch.items():
        assert not isinstance(value, list), f"{where}.{key}: list patches are not rendered here"
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, f"{where}.{key}")
        else:
            target[key] = value


def _apply(directory: pathlib.Path, data: dict[str, Any], docs: list[dict[str, Any]]
           ) -> list[dict[str, Any]]:
    for entry in data.get("resources", []):
        path = directory / entry
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8"))
                        if d is not None)
    for entry in data.get("components", []):
        component = directory / entry
        docs = _apply(component, _kustomization(component, "Component"), docs)
    for patch_entry in data.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{directory}: patch {patch_entry} not rendered here"
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text(encoding="utf-8"))
        targets = [d for d in docs if d["kind"] == patch["kind"]
                   and d["metadata"]["name"] == patch["metadata"]["name"]]
        assert len(targets) == 1, f"{directory}: patch {patch_entry['path']} matches {targets}"
        _merge(targets[0], patch, patch["kind"])
    if "namespace" in data:
        for doc in docs:
            doc["metadata"]["namespace"] = data["namespace"]
    for labels in data.get("labels", []):
        assert set(labels) == {"pairs"}, f"{directory}: labels options not rendered: {labels}"
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(labels["pairs"])
    return docs


def render(directory: pathlib.Path) -> list[dict[str, Any]]:
    """What ``kustomize build directory`` outputs, for the features k8s/ uses."""
    return _apply(directory, _kustomization(directory, "Kustomization"), [])


def rendered(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, rendered {len(found)}"
    return found[0]


def rendered_config(docs: list[dict[str, Any]]) -> Any:
    """The plugin's configuration from the rendered ConfigMap the DaemonSet mounts."""
    daemonset = rendered(docs, "DaemonSet", "trio-gpu-plugin")
    pod = daemonset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config_file = pathlib.PurePosixPath(env_of(container)["CONFIG_FILE"])
    _, volume = mount_of(container, pod, str(config_file.parent))
    configmap = rendered(docs, "ConfigMap", volume["configMap"]["name"])
    config, warnings = resolve_config({}, {}, yaml.safe_load(configmap["data"][config_file.name]))
    assert warnings == []
    return config


@pytest.fixture
def time_slicing_overlay(tmp_path: pathlib.Path) -> pathlib.Path:
    """A user's kustomization opting in to the component, as its comment says to write
    one (outside k8s/, relative paths: kustomize refuses absolute ones)."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(K8S, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base],
        "components": [os.path.relpath(TIME_SLICING, overlay)],
    }), encoding="utf-8")
    return overlay


def test_kubectl_apply_k_advertises_whole_gpus_only() -> None:
    docs = render(K8S)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("ConfigMap", "trio-gpu-plugin-config"), ("DaemonSet", "trio-gpu-plugin")]
    config = rendered_config(docs)
    assert config.sharing.time_slicing is None and config.sharing.mps is None
    assert "components" not in yaml.safe_load((K8S / "kustomization.yaml").read_text())


def test_the_time_slicing_component_opts_in_to_four_replicas(
        time_slicing_overlay: pathlib.Path) -> None:
    import kubernetes_validate

    docs = render(time_slicing_overlay)
    config = rendered_config(docs)
    assert config.sharing.strategy == "time-slicing"
    slicing = config.sharing.time_slicing
    assert slicing is not None and slicing.rename_by_default is False
    assert [(r.name, r.replicas) for r in slicing.resources] == [("nvidia.com/gpu", 4)]
    # Only the configuration changes.
    default = render(K8S)
    assert (rendered(docs, "DaemonSet", "trio-gpu-plugin")
            == rendered(default, "DaemonSet", "trio-gpu-plugin"))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # What it does is said where it is opted into.
    comment = (TIME_SLICING / "kustomization.yaml").read_text(encoding="utf-8")
    assert "four times" in comment and "renameByDefault" in comment


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("which", ["default", "time-slicing"])
def test_the_renderer_agrees_with_kustomize(
        which: str, time_slicing_overlay: pathlib.Path) -> None:
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    directory = K8S if which == "default" else time_slicing_overlay
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    theirs = sorted((d for d in yaml.safe_load_all(result.stdout) if d), key=key)
    assert theirs == sorted(render(directory), key=key)


# --------------------------------------------------------------------------------------
# The image: pins, version, labels, entry points


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    return parser


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def runtime_requirements() -> list[Requirement]:
    """install_requires and the metrics extra, which the image installs."""
    cfg = setup_cfg()
    return [Requirement(line) for line in
            _lines(cfg["options"]["install_requires"])
            + _lines(cfg["options.extras_require"]["metrics"])]


def build_requirements() -> list[Requirement]:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return [Requirement(r) for r in pyproject["build-system"]["requires"]]


def pins() -> dict[str, str]:
    """k8s/constraints.txt as {canonical name: exact version}."""
    found: dict[str, str] = {}
    for number, raw in enumerate(CONSTRAINTS.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        where = f"k8s/constraints.txt:{number}: {line!r}"
        assert len(specs) == 1 and specs[0].operator == "==", f"{where}: not an exact pin"
        assert not requirement.marker and not requirement.extras, f"{where}: pins only"
        name = canonicalize_name(requirement.name)
        assert name not in found, f"{where}: {name} pinned twice"
        found[name] = specs[0].version
    return found


#: The image's interpreter, for environment markers.
IMAGE_PYTHON = {"python_version": "3.11", "python_full_version": "3.11.0",
                "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def runtime_closure() -> dict[str, list[Requirement]]:
    """Every distribution the image's ``pip install`` pulls in, by canonical name, with
    the requirements naming it: setup.cfg's, then the installed dependencies' metadata
    (names of dependencies rarely change between versions; the pins' versions are
    checked against every requirement that names them)."""
    wanted: dict[str, list[Requirement]] = {}
    queue = runtime_requirements()
    while queue:
        requirement = queue.pop()
        name = canonicalize_name(requirement.name)
        first = name not in wanted
        wanted.setdefault(name, []).append(requirement)
        if not first:
            continue
        try:
            distribution = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{requirement.name} (needed by the image) is not installed here, "
                        "so its dependencies cannot be checked: pip install -e '.[test]'")
        for text in distribution.requires or []:
            dependency = Requirement(text)
            extras = [""] + sorted(requirement.extras)
            if dependency.marker is None or any(
                    dependency.marker.evaluate({**IMAGE_PYTHON, "extra": extra})
                    for extra in extras):
                queue.append(dependency)
    return wanted


def test_constraints_pin_every_runtime_dependency_and_nothing_else() -> None:
    pinned = pins()
    needed = runtime_closure()
    build = {canonicalize_name(r.name): [r] for r in build_requirements()}
    missing = sorted(needed.keys() - pinned.keys())
    assert not missing, f"k8s/constraints.txt does not pin {missing}, which the image installs"
    missing_build = sorted(build.keys() - pinned.keys())
    assert not missing_build, f"k8s/constraints.txt does not pin the build backend {missing_build}"
    stale = sorted(pinned.keys() - needed.keys() - build.keys())
    assert not stale, f"k8s/constraints.txt pins {stale}, which nothing installs any more"
    for name, requirements in {**needed, **build}.items():
        for requirement in requirements:
            assert requirement.specifier.contains(pinned[name], prereleases=True), (
                f"k8s/constraints.txt pins {name}=={pinned[name]}, which {requirement} refuses")


def test_constraints_honour_setup_cfg() -> None:
    # The direct dependencies, also on their own: a clear message for the commonest edit.
    pinned = pins()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"setup.cfg requires {requirement}; k8s/constraints.txt lacks it"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"setup.cfg requires {requirement}; k8s/constraints.txt pins {pinned[name]}")


def stage_args(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [args for inst, args in stage if inst == instruction]


def build_args(stage: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for args in stage_args(stage, "ARG"):
        name, _, default = args.partition("=")
        found[name] = default
    return found


def key_values(args: str) -> dict[str, str]:
    pairs = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"expected KEY=VALUE, not {word!r}"
        pairs[key] = value
    return pairs


BASE_IMAGE = re.compile(r"python:3\.11-slim@(sha256:[0-9a-f]{64})")


def test_dockerfile_base_image_is_pinned_by_one_digest() -> None:
    digests = set()
    for stage in dockerfile_stages():
        image = stage[0][1].split()[0]
        match = BASE_IMAGE.fullmatch(image)
        assert match, f"FROM {image}: the base image must be pinned by digest"
        digests.add(match[1])
    assert len(digests) == 1, f"the stages start from different bases: {digests}"
    labels = key_values(" ".join(stage_args(dockerfile_stages()[1], "LABEL")))
    assert labels["org.opencontainers.image.base.digest"] == digests.pop()


def test_dockerfile_installs_under_the_constraints_file() -> None:
    build, final = dockerfile_stages()
    env = key_values(" ".join(stage_args(build, "ENV")))
    # PIP_CONSTRAINT, not -c: it also pins the build backend in pip's isolated build env.
    constraint = pathlib.PurePosixPath(env["PIP_CONSTRAINT"])
    workdir = pathlib.PurePosixPath(stage_args(build, "WORKDIR")[-1])
    copied = {}
    for args in stage_args(build, "COPY"):
        *sources, destination = shlex.split(args)
        for source in sources:
            copied[workdir / destination if not destination.endswith("/")
                   else workdir / destination / pathlib.PurePosixPath(source).name] = source
    assert copied.get(constraint) == "k8s/constraints.txt", (
        f"PIP_CONSTRAINT={constraint} is not where the build stage copies k8s/constraints.txt")
    [install] = [args for args in stage_args(final, "RUN") if "pip install" in args]
    words = shlex.split(install)
    mounts = {key_values(w.split("=", 1)[1].replace(",", " "))["target"]:
              key_values(w.split("=", 1)[1].replace(",", " "))
              for w in words if w.startswith("--mount=")}
    option = next(w for w in ("--constraint", "-c") if w in words)
    target = words[words.index(option) + 1]
    assert mounts[target]["from"] == "build" and mounts[target]["source"] == str(constraint)
    # No version pinned in the Dockerfile disagrees with the constraints file.
    pinned = pins()
    for stage in (build, final):
        for args in stage_args(stage, "RUN"):
            for word in shlex.split(args):
                if "==" in word and not word.startswith("-"):
                    if word == "trio-gpu-plugin[metrics]==${VERSION}":
                        continue  # the version this image is tagged with
                    requirement = Requirement(word)
                    name = canonicalize_name(requirement.name)
                    assert pinned.get(name) == str(requirement.specifier)[2:], (
                        f"the Dockerfile pins {word}; k8s/constraints.txt says "
                        f"{pinned.get(name, 'nothing')}")


def test_dockerfile_version_and_oci_labels() -> None:
    build, final = dockerfile_stages()
    for stage in (build, final):
        assert build_args(stage)["VERSION"] == __version__, (
            "the Dockerfile's VERSION default is not trio_gpu_plugin/_version.py's")
    # The build stage refuses a VERSION that is not the wheel it built.
    assert any("trio_gpu_plugin-${VERSION}-py3-none-any.whl" in run
               for run in stage_args(build, "RUN"))
    assert "REVISION" in build_args(final) and "SOURCE" in build_args(final)
    labels = key_values(" ".join(stage_args(final, "LABEL")))
    metadata = setup_cfg()["metadata"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    assert labels["org.opencontainers.image.source"] == "${SOURCE}"
    assert labels["org.opencontainers.image.title"] == metadata["name"]
    assert labels["org.opencontainers.image.description"] == metadata["description"]
    assert labels["org.opencontainers.image.licenses"] == metadata["license"]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent of it wins."""
    parts = pathlib.PurePosixPath(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        if any(fnmatch.fnmatchcase(c, body) for c in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_lets_every_copied_path_through() -> None:
    patterns = [line.strip() for line in
                (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    for source in build_stage_copies():
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
        assert not _dockerignored(source, patterns), f".dockerignore excludes {source}"
    assert _dockerignored("k8s/daemonset.yaml", patterns)
    assert _dockerignored("tests/test_deploy.py", patterns)


def test_the_image_has_nvidia_device_plugin_on_path() -> None:
    # NVIDIA's Helm chart runs command: ["nvidia-device-plugin"]; pip installs every
    # console script of the package into the image's PATH.
    scripts = dict(line.split(" = ") for line in
                   _lines(setup_cfg()["options.entry_points"]["console_scripts"]))
    assert scripts["nvidia-device-plugin"] == scripts["trio-gpu-plugin"] == "trio_gpu_plugin._cli:main"
