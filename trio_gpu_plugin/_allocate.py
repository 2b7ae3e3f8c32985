"""Allocate: what a container gets for the devices the kubelet chose.

Sans-IO at the core: :func:`container_response` and :func:`allocate` are plain functions
of a :class:`~trio_gpu_plugin._plan_model.PlannedResource`, the requested IDs and an
:class:`AllocateContext`.  The few facts about the node that a response depends on
(which control device nodes exist, which IMEX channels are usable) are gathered once at
start by small functions (:func:`existing_control_nodes`) and passed in as data, so one
Allocate never touches the file system.

The response follows NVIDIA's ``internal/plugin/server.go:getAllocateResponse``, in its
order of assembly: CDI parts (any ``cdi-*`` strategy), MPS parts, GDRCOPY/GDS/MOFED
environment, and, unless every selected strategy is a CDI one, ``envvar``,
``volume-mounts`` and (``passDeviceSpecs``) device specs.

CDI device names are where we part from NVIDIA on purpose.  NVIDIA's plugin writes its own
spec for ``k8s.device-plugin.nvidia.com/gpu`` through the container toolkit's libraries,
which we do not re-implement; our names refer to the spec ``nvidia-ctk cdi generate``
writes (``nvidia.com/gpu=<uuid>`` or ``=<index>``), or to ``--cdi-kind``.  A start-up
check (:func:`find_missing_cdi_devices`, :func:`cdi_warning`) says when no spec on the
node declares them, because the runtime would otherwise only fail at container start.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from ._config import Config
from ._grpc import RpcError, StatusCode
from ._plan_model import PlannedDevice, PlannedResource
from .proto import v1beta1

__all__ = [
    "CDI_SPEC_DIRS",
    "CONTROL_NODES",
    "AllocateContext",
    "allocate",
    "cdi_annotation_key",
    "cdi_qualified_name",
    "cdi_spec_declares",
    "cdi_warning",
    "container_response",
    "default_annotation_key",
    "existing_control_nodes",
    "find_missing_cdi_devices",
    "imex_cdi_kind",
    "imex_channel_path",
    "required_cdi_devices",
    "runtime_ids",
    "validate_cdi_kind",
    "validate_request",
]

#: Control device nodes handed out with ``passDeviceSpecs`` when they exist (NVIDIA's
#: "optional" paths of ``apiDeviceSpecs``), in NVIDIA's order.
CONTROL_NODES: Final = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                        "/dev/nvidia-modeset")
#: Where container runtimes look for CDI specs by default (CDI's ``DefaultSpecDirs``).
CDI_SPEC_DIRS: Final = ("/etc/cdi", "/var/run/cdi")

DEVICE_LIST_ENV: Final = "NVIDIA_VISIBLE_DEVICES"
IMEX_CHANNELS_ENV: Final = "NVIDIA_IMEX_CHANNELS"
VOLUME_MOUNTS_ROOT: Final = "/var/run/nvidia-container-devices"
VOLUME_MOUNTS_HOST_PATH: Final = "/dev/null"
IMEX_CHANNEL_DIR: Final = "/dev/nvidia-caps-imex-channels"
MPS_CONTAINER_ROOT: Final = "/mps"
CDI_STRATEGIES: Final = frozenset({"cdi-annotations", "cdi-cri"})
# The plugin name NVIDIA passes to CDI's AnnotationKey; the key's name part is
# "<plugin>_<response id>".
ANNOTATION_PLUGIN_NAME: Final = "nvidia-device-plugin"
# CDI's AnnotationKey limit on the part after the prefix.
ANNOTATION_NAME_MAX: Final = 63
IMEX_CDI_CLASS: Final = "imex-channel"
# How many missing CDI devices the start-up warning names before "and N more".
WARNING_NAMES_SHOWN: Final = 3


def default_annotation_key() -> str:
    """A fresh CDI annotation name, as NVIDIA's plugin makes one for each container:
    ``nvidia-device-plugin_<random UUID4>``."""
    return f"{ANNOTATION_PLUGIN_NAME}_{uuid.uuid4()}"


@dataclasses.dataclass(frozen=True)
class AllocateContext:
    """What Allocate needs besides the request, gathered once at start.

    Attributes:
        config: the plugin's configuration (strategies, roots, GDS...).
        control_nodes: which of :data:`CONTROL_NODES` exist, from
            :func:`existing_control_nodes`; only these become device specs.
        imex_channels: IMEX channels that are configured and exist on the node.
        annotation_key: makes the name part of a CDI annotation key (after the prefix);
            called once per container response.  Tests inject a fixed one.
    """

    config: Config
    control_nodes: tuple[str, ...] = ()
    imex_channels: tuple[int, ...] = ()
    annotation_key: Callable[[], str] = default_annotation_key


def existing_control_nodes(dev_root: str) -> tuple[str, ...]:
    """Which of :data:`CONTROL_NODES` exist under ``dev_root`` (checked as
    ``<dev_root>/dev/...``), in :data:`CONTROL_NODES` order.

    NVIDIA stats the bare path inside its own container; taking the root as a parameter
    lets the caller say where the host's ``/dev`` is visible to us.
    """
    return tuple(p for p in CONTROL_NODES if os.path.exists(_go_join(dev_root, p)))


def imex_channel_path(channel: int) -> str:
    """The device node of IMEX channel ``channel`` as the container sees it."""
    return f"{IMEX_CHANNEL_DIR}/channel{channel}"


def validate_request(resource: PlannedResource, ids: Sequence[str]) -> None:
    """NVIDIA's ``ValidateRequest``: raise :class:`RpcError` (``INVALID_ARGUMENT``) with
    NVIDIA's wording for an ID the resource does not have, or for more than one ID when
    replicas are requested and the sharing configuration forbids that.

    Device health is not checked here (NVIDIA does not either); our service checks it
    before calling Allocate.
    """
    prefix = f'invalid allocation request for "{resource.name}": invalid request'
    known = {device.id for device in resource.devices}
    for device_id in ids:
        if device_id not in known:
            raise RpcError(StatusCode.INVALID_ARGUMENT, f"{prefix}: unknown device: {device_id}")
    includes_replicas = any("::" in device_id for device_id in ids)
    if (includes_replicas and len(ids) > 1 and resource.sharing != "none"
            and resource.fail_requests_greater_than_one):
        raise RpcError(
            StatusCode.INVALID_ARGUMENT,
            f"{prefix}: maximum request size for shared resources is 1; found {len(ids)}",
        )


def runtime_ids(resource: PlannedResource, ids: Sequence[str], id_strategy: str) -> list[str]:
    """The device IDs handed to the container runtime (NVIDIA's
    ``uniqueDeviceIDsFromAnnotatedDeviceIDs``), de-duplicated so that two replicas of one
    GPU name it once.

    ``uuid``: each requested ID without its ``::<n>`` suffix.  ``index``: each device's
    index (``"3"``, ``"3:1"``).  Both keep request order; NVIDIA's ``index`` order comes
    from Go map iteration and is random, ours is stable so responses are reproducible.

    Raises:
        ValueError: an unknown ID strategy, or (``index``) an ID the resource lacks.
    """
    if id_strategy == "uuid":
        return list(dict.fromkeys(device_id.split("::", 1)[0] for device_id in ids))
    if id_strategy == "index":
        devices = _devices_of(resource, ids)
        return list(dict.fromkeys(device.index for device in devices))
    raise ValueError(f"invalid --device-id-strategy option: {id_strategy}")


def validate_cdi_kind(kind: str) -> None:
    """Check a CDI kind (``vendor/class``) as CDI's ``ValidateKind`` does.

    Call it at start on ``--cdi-kind``, so a bad kind fails there, not in every Allocate.

    Raises:
        ValueError: with CDI's wording.
    """
    vendor, slash, cdi_class = kind.partition("/")
    if not slash or not vendor or not cdi_class:
        raise ValueError(f"kind {kind} does not contain a /")
    for what, name in (("vendor", vendor), ("class", cdi_class)):
        problem = _vendor_or_class_problem(name)
        if problem is not None:
            raise ValueError(f"invalid {what}. {problem}")


def cdi_qualified_name(kind: str, name: str) -> str:
    """The fully qualified CDI device name ``<vendor>/<class>=<name>``, checked as CDI's
    parser checks it (a runtime rejects the whole annotation otherwise).

    Raises:
        ValueError: a bad kind or device name, with CDI's wording.
    """
    validate_cdi_kind(kind)
    problem = _device_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return f"{kind}={name}"


def imex_cdi_kind(kind: str) -> str:
    """The CDI kind of IMEX channels next to GPU kind ``kind``: same vendor, class
    ``imex-channel`` (``nvidia.com/imex-channel``, as NVIDIA pairs
    ``k8s.device-plugin.nvidia.com/gpu`` with ``.../imex-channel``)."""
    return f"{kind.partition('/')[0]}/{IMEX_CDI_CLASS}"


def cdi_annotation_key(prefix: str, name: str) -> str:
    """The CDI annotation key ``<prefix><name>``, ``name`` checked as CDI's
    ``AnnotationKey`` checks its name part (at most 63 characters, alphanumeric at both
    ends, ``_-.`` inside).

    The prefix is used verbatim: NVIDIA's ``--cdi-annotation-prefix`` replaces
    ``cdi.k8s.io/`` without any check, and runtimes match the prefix as a plain string.

    Raises:
        ValueError: a name CDI would refuse, with CDI's wording.
    """
    if not name:
        raise ValueError("CDI annotation failed: invalid deviceID, empty")
    if len(name) > ANNOTATION_NAME_MAX:
        raise ValueError(f'CDI annotation failed: invalid plugin+deviceID "{name}", too long')
    if not _is_alnum(name[0]):
        raise ValueError(f'CDI annotation failed: invalid name "{name}", first '
                         f"'{name[0]}' should be alphanumeric")
    for c in name[1:-1]:
        if not (_is_alnum(c) or c in "_-."):
            raise ValueError(f"CDI annotation failed: invalid name \"{name}\", invalid "
                             f"character '{c}'")
    if not _is_alnum(name[-1]):
        raise ValueError(f'CDI annotation failed: invalid name "{name}", last '
                         f"'{name[-1]}' should be alphanumeric")
    return prefix + name


def container_response(
    resource: PlannedResource, ids: Sequence[str], context: AllocateContext
) -> v1beta1.ContainerAllocateResponse:
    """What one container gets for ``ids`` (already validated), assembled in NVIDIA's
    order so that where two parts write the same key, the later one wins as in NVIDIA's
    plugin (``volume-mounts`` over ``envvar`` for ``NVIDIA_VISIBLE_DEVICES``).

    Device specs (``passDeviceSpecs``) are de-duplicated: NVIDIA repeats a GPU's node for
    each replica requested; a runtime given the same node twice gains nothing.

    Raises:
        ValueError: a CDI name or annotation key CDI would refuse; MPS without an MPS
            root; an unknown ID strategy.
    """
    flags = context.config.flags
    plugin = flags.plugin
    strategies = plugin.device_list_strategy
    device_ids = runtime_ids(resource, ids, plugin.device_id_strategy)
    response = v1beta1.ContainerAllocateResponse()

    if any(s in CDI_STRATEGIES for s in strategies):
        names = _cdi_names(device_ids, context)
        if names and "cdi-annotations" in strategies:
            key = cdi_annotation_key(plugin.cdi_annotation_prefix, context.annotation_key())
            # CDI's AnnotationValue: the fully qualified names, comma-separated.
            response.annotations[key] = ",".join(names)
        if names and "cdi-cri" in strategies:
            response.cdi_devices.extend(v1beta1.CDIDevice(name=n) for n in names)

    if resource.sharing == "mps":
        _add_mps(response, resource.name, flags.mps_root)

    for enabled, env in ((flags.gdrcopy_enabled, "NVIDIA_GDRCOPY"),
                         (flags.gds_enabled, "NVIDIA_GDS"),
                         (flags.mofed_enabled, "NVIDIA_MOFED")):
        if enabled:
            response.envs[env] = "enabled"

    # NVIDIA's AllCDIEnabled: with only CDI strategies the runtime gets everything from
    # the CDI names, and env, mounts or device specs would inject devices a second way.
    if all(s in CDI_STRATEGIES for s in strategies):
        return response

    if "envvar" in strategies:
        response.envs[DEVICE_LIST_ENV] = ",".join(device_ids)
        if context.imex_channels:
            response.envs[IMEX_CHANNELS_ENV] = ",".join(str(c) for c in context.imex_channels)
    if "volume-mounts" in strategies:
        response.envs[DEVICE_LIST_ENV] = VOLUME_MOUNTS_ROOT
        response.mounts.extend(
            v1beta1.Mount(container_path=_go_join(VOLUME_MOUNTS_ROOT, i),
                          host_path=VOLUME_MOUNTS_HOST_PATH)
            for i in device_ids
        )
        response.mounts.extend(
            v1beta1.Mount(container_path=_go_join(VOLUME_MOUNTS_ROOT, "imex", str(c)),
                          host_path=VOLUME_MOUNTS_HOST_PATH)
            for c in context.imex_channels
        )
    if plugin.pass_device_specs:
        response.devices.extend(_device_specs(resource, ids, context))
    return response


def allocate(
    resource: PlannedResource,
    container_requests_ids: Sequence[Sequence[str]],
    context: AllocateContext,
) -> v1beta1.AllocateResponse:
    """The whole Allocate: each container request validated (:func:`validate_request`)
    and answered (:func:`container_response`); any failure fails the whole call, as in
    NVIDIA's plugin."""
    responses = []
    for ids in container_requests_ids:
        validate_request(resource, ids)
        responses.append(container_response(resource, ids, context))
    return v1beta1.AllocateResponse(container_responses=responses)


def required_cdi_devices(
    resource: PlannedResource, context: AllocateContext
) -> dict[str, list[str]]:
    """CDI kind -> device names that Allocate may hand out for ``resource`` (empty when
    no CDI strategy is selected): what the start-up check should look for on the node."""
    plugin = context.config.flags.plugin
    if not any(s in CDI_STRATEGIES for s in plugin.device_list_strategy):
        return {}
    ids = runtime_ids(resource, [d.id for d in resource.devices], plugin.device_id_strategy)
    required = {plugin.cdi_kind: ids}
    if context.imex_channels:
        required[imex_cdi_kind(plugin.cdi_kind)] = [str(c) for c in context.imex_channels]
    return required


def cdi_spec_declares(document: Any, kind: str, names: Iterable[str]) -> set[str]:
    """Which of ``names`` a parsed CDI spec (a JSON or YAML document:
    ``{"cdiVersion": ..., "kind": "nvidia.com/gpu", "devices": [{"name": "0"}, ...]}``)
    declares for ``kind``.  Anything not shaped like a spec declares nothing."""
    if not isinstance(document, dict) or document.get("kind") != kind:
        return set()
    devices = document.get("devices")
    if not isinstance(devices, list):
        return set()
    declared = {
        d["name"] for d in devices if isinstance(d, dict) and isinstance(d.get("name"), str)
    }
    return {name for name in names if name in declared}


def find_missing_cdi_devices(
    driver_root: str, kind: str, names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Read the CDI specs (``*.json``, ``*.yaml``) in ``<driver_root>/etc/cdi`` and
    ``<driver_root>/var/run/cdi`` and say which of ``names`` none declares for ``kind``.

    A missing directory, or a spec that cannot be read or parsed, declares nothing:
    the runtime cannot use it either.

    Returns:
        (the directories searched, the names not declared, in ``names`` order).
    """
    import yaml  # only at start, and only with a CDI strategy

    searched = [_go_join(driver_root, d) for d in CDI_SPEC_DIRS]
    declared: set[str] = set()
    for directory in searched:
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            if not entry.endswith((".json", ".yaml")):
                continue
            path = os.path.join(directory, entry)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                document = json.loads(text) if entry.endswith(".json") else yaml.safe_load(text)
            except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
                continue
            declared |= cdi_spec_declares(document, kind, names)
    return searched, [n for n in dict.fromkeys(names) if n not in declared]


def cdi_warning(kind: str, missing: Sequence[str], searched: Sequence[str]) -> str | None:
    """The start-up warning for CDI devices no spec declares, or ``None`` when all are
    declared: it names the kind, the first few missing devices, the directories searched
    and the fix."""
    if not missing:
        return None
    shown = ", ".join(f"{kind}={n}" for n in missing[:WARNING_NAMES_SHOWN])
    more = len(missing) - WARNING_NAMES_SHOWN
    if more > 0:
        shown += f" and {more} more"
    return (
        f"no CDI spec in {' or '.join(searched)} declares {shown}; containers given "
        f"these devices through CDI will fail to start. Run `nvidia-ctk cdi generate "
        f"--output=/var/run/cdi/nvidia.yaml` on the node, or set --cdi-kind to the kind "
        f"of the CDI spec the node has"
    )


def _cdi_names(device_ids: Sequence[str], context: AllocateContext) -> list[str]:
    # GDS/MOFED/GDRCOPY get no CDI device: NVIDIA names the specs its own plugin writes
    # for them, and ``nvidia-ctk cdi generate`` writes none we could rely on.
    kind = context.config.flags.plugin.cdi_kind
    names = [cdi_qualified_name(kind, i) for i in device_ids]
    imex_kind = imex_cdi_kind(kind)
    names.extend(cdi_qualified_name(imex_kind, str(c)) for c in context.imex_channels)
    return names


def _add_mps(response: v1beta1.ContainerAllocateResponse, resource_name: str,
             mps_root: str | None) -> None:
    if mps_root is None:
        # Config validation refuses this; repeated here so a bypass fails loudly.
        raise ValueError("using MPS requires --mps-root to be specified")
    pipe = _go_join(MPS_CONTAINER_ROOT, resource_name, "pipe")
    response.envs["CUDA_MPS_PIPE_DIRECTORY"] = pipe
    response.mounts.extend([
        v1beta1.Mount(container_path=pipe, host_path=_go_join(mps_root, resource_name, "pipe")),
        v1beta1.Mount(container_path="/dev/shm", host_path=_go_join(mps_root, "shm")),
    ])


def _device_specs(resource: PlannedResource, ids: Sequence[str],
                  context: AllocateContext) -> list[v1beta1.DeviceSpec]:
    dev_root = context.config.flags.dev_root
    paths = [*context.control_nodes]
    for device in _devices_of(resource, ids):
        paths.extend(device.paths)
    paths.extend(imex_channel_path(c) for c in context.imex_channels)
    return [
        v1beta1.DeviceSpec(container_path=p, host_path=_go_join(dev_root, p), permissions="rw")
        for p in dict.fromkeys(paths)
    ]


def _devices_of(resource: PlannedResource, ids: Sequence[str]) -> list[PlannedDevice]:
    by_id = {device.id: device for device in resource.devices}
    try:
        return [by_id[i] for i in ids]
    except KeyError as missing:
        raise ValueError(f"{resource.name} has no device {missing.args[0]}") from None


def _go_join(*parts: str) -> str:
    # Go's filepath.Join: empty parts dropped, the result cleaned.  os.path.join would
    # drop the root before an absolute path ("/dev/nvidia0").
    joined = "/".join(p for p in parts if p)
    if not joined:
        return ""
    cleaned = posixpath.normpath(joined)
    # normpath keeps a leading "//" (POSIX allows it a meaning); Go does not.
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def _is_alnum(c: str) -> bool:
    # CDI's IsAlphaNumeric: ASCII only (str.isalnum accepts any Unicode letter).
    return c.isascii() and c.isalnum()


def _vendor_or_class_problem(name: str) -> str | None:
    if not (name[0].isascii() and name[0].isalpha()):
        return f'"{name}", should start with letter'
    for c in name[1:-1]:
        if not (_is_alnum(c) or c in "_-."):
            return f"invalid character '{c}' in name \"{name}\""
    if not _is_alnum(name[-1]):
        return f'"{name}", should end with a letter or digit'
    return None


def _device_name_problem(name: str) -> str | None:
    if not name:
        return "invalid (empty) device name"
    if not _is_alnum(name[0]):
        return f'invalid class "{name}", should start with a letter or digit'
    if len(name) == 1:
        return None
    for c in name[1:-1]:
        if not (_is_alnum(c) or c in "_-.:"):
            return f"invalid character '{c}' in device name \"{name}\""
    if not _is_alnum(name[-1]):
        return f'invalid name "{name}", should end with a letter or digit'
    return None
