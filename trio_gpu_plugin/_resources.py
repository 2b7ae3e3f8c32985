"""The resource planner: which resources the node advertises and which devices each holds.

Sans-IO: :func:`plan` is a plain function from what discovery found (:class:`NodeModel`),
the configuration (:class:`Config`) and the MIG capability table (parsed from
``/proc/driver/nvidia-caps/mig-minors`` by :func:`parse_mig_minors`; the caller reads the
file) to :class:`PlanResult`.  It follows NVIDIA's ``internal/rm`` (``rm.go``,
``device_map.go``, ``devices.go``) with the same error texts, except where NVIDIA strips
configuration we honour:

* ``resources.gpus`` / ``resources.mig`` patterns (NVIDIA clears them) are tried before
  NVIDIA's default patterns, so a user can rename a GPU model or a MIG profile;
* a shared resource's ``rename`` and ``devices`` (NVIDIA resets them) are honoured:
  several entries may share different devices of one resource, with different replica
  counts and names, and the devices no entry selects stay unshared under the original
  name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, TypeAlias

from ._config import Config, ConfigError, ReplicatedResource, ResourcePattern
from ._node_model import GpuInfo, MigInfo, NodeModel
from ._plan_model import (
    MAX_LIST_AND_WATCH_BYTES,
    PlannedDevice,
    PlannedResource,
    gpu_device,
    list_and_watch_bytes,
    max_replicas,
    mig_device,
    replicas,
    replicas_bytes,
)

__all__ = [
    "MigMinors",
    "PlanError",
    "PlanResult",
    "full_resource_name",
    "glob_matches",
    "mig_cap_paths",
    "parse_mig_minors",
    "plan",
    "resource_patterns",
    "socket_name",
]

#: ``(gpu minor, gi, ci or None)`` -> the ``nvidia-caps`` minor of that access file.
MigMinors: TypeAlias = Mapping[tuple[int, int, int | None], int]

DOMAIN: Final = "nvidia.com"
CAP_DEVICE_DIR: Final = "/dev/nvidia-caps"

_GI_ACCESS: Final = re.compile(r"gpu(\d+)/gi(\d+)/access")
_CI_ACCESS: Final = re.compile(r"gpu(\d+)/gi(\d+)/ci(\d+)/access")
# go-nvlib writes ``<C>c.<G>g.<GB>gb`` only when a compute instance is smaller than its
# GPU instance; NVIDIA's mixed strategy gives such profiles no default resource.
_SUBDIVIDED_PROFILE: Final = re.compile(r"\d+c\.")


class PlanError(ConfigError):
    """This node cannot be served with this configuration (fatal at start).  Where NVIDIA
    has an error for the case the message is NVIDIA's text."""


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """What :func:`plan` decided.

    Attributes:
        resources: the resources to serve, sorted by name, each with ≥ 1 device.
        warnings: things an operator should see in the log (an empty MIG GPU under the
            mixed strategy, a shared resource that is not on this node).
    """

    resources: tuple[PlannedResource, ...]
    warnings: tuple[str, ...] = ()

    def resource(self, name: str) -> PlannedResource | None:
        """The resource with this name, if it is planned."""
        for resource in self.resources:
            if resource.name == name:
                return resource
        return None


# --------------------------------------------------------------------------------------
# MIG capability devices


def parse_mig_minors(text: str) -> dict[tuple[int, int, int | None], int]:
    """Parse ``/proc/driver/nvidia-caps/mig-minors``.

    Lines are ``config <n>``, ``monitor <n>``, ``gpu<g>/gi<i>/access <n>`` and
    ``gpu<g>/gi<i>/ci<j>/access <n>``; ``g`` is the GPU's device minor.  Returns
    ``(g, i, None)`` and ``(g, i, j)`` -> ``n`` (``config`` and ``monitor`` are checked and
    dropped: NVIDIA never hands them out).  ``ValueError`` names the line number and
    content of the first malformed or repeated line.
    """
    minors: dict[tuple[int, int, int | None], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue

        def bad(problem: str) -> ValueError:
            return ValueError(f"mig-minors line {number}: {problem}: {line!r}")

        if len(fields) != 2 or not (fields[1].isascii() and fields[1].isdecimal()):
            raise bad("expected '<capability> <minor>'")
        name, value = fields[0], int(fields[1])
        if name in ("config", "monitor"):
            continue
        key: tuple[int, int, int | None]
        if match := _GI_ACCESS.fullmatch(name):
            key = (int(match[1]), int(match[2]), None)
        elif match := _CI_ACCESS.fullmatch(name):
            key = (int(match[1]), int(match[2]), int(match[3]))
        else:
            raise bad("unknown capability")
        if key in minors:
            # Two minors for one capability would make the device paths a guess.
            raise bad("capability listed twice")
        minors[key] = value
    return minors


def mig_cap_paths(minors: MigMinors, gpu_minor: int, gi: int, ci: int) -> tuple[str, str]:
    """The GI and CI access capability device nodes of a MIG device, as NVIDIA's
    ``nvmlMigDevice.GetPaths`` finds them; :class:`PlanError` (NVIDIA's text) when the
    table lacks one."""
    gi_minor = minors.get((gpu_minor, gi, None))
    if gi_minor is None:
        raise PlanError("missing MIG GPU instance capability path")
    ci_minor = minors.get((gpu_minor, gi, ci))
    if ci_minor is None:
        raise PlanError("missing MIG compute instance capability path")
    return f"{CAP_DEVICE_DIR}/nvidia-cap{gi_minor}", f"{CAP_DEVICE_DIR}/nvidia-cap{ci_minor}"


# --------------------------------------------------------------------------------------
# Names and patterns


def full_resource_name(name: str) -> str:
    """``nvidia.com/`` prepended to a name without a domain, as NVIDIA's
    ``NewResourceName`` does."""
    return name if "/" in name else f"{DOMAIN}/{name}"


def socket_name(resource: str) -> str:
    """The socket file of a resource: ``nvidia-<name after "nvidia.com/">.sock``
    (``nvidia-gpu.sock``, ``nvidia-mig-1g.5gb.sock``); other domains
    ``<domain>-<name>.sock``."""
    domain, _, name = full_resource_name(resource).partition("/")
    if domain == DOMAIN:
        return f"nvidia-{name}.sock"
    return f"{domain}-{name.replace('/', '-')}.sock"


def glob_matches(pattern: str, text: str) -> bool:
    """Whether ``text`` matches the glob ``pattern`` as a whole (``*`` is the only
    wildcard; since NVIDIA v0.20.0 patterns are anchored, so ``1g.10gb`` does not match
    ``1g.10gb+me``)."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, text, flags=re.S) is not None


def _mig_default_name(profile: str) -> str:
    return f"{DOMAIN}/mig-{profile.replace('+', '.')}"


def resource_patterns(model: NodeModel, config: Config) -> tuple[tuple[ResourcePattern, ...],
                                                                 tuple[ResourcePattern, ...]]:
    """The GPU patterns and the MIG patterns in the order they are tried: the config's
    ``resources.gpus`` / ``resources.mig`` first, then NVIDIA's defaults
    (``AddDefaultResourcesToConfig``): GPU ``*`` -> ``nvidia.com/gpu``; ``single``: MIG
    ``*`` -> ``nvidia.com/gpu``; ``mixed``: each profile on the node whose compute
    instance is its whole GPU instance -> ``nvidia.com/mig-<profile, '+' as '.'>``.

    NVIDIA's mixed defaults cover every profile the GPUs support; profiles not on the
    node would only name resources with no devices, which are never served, so the
    node's own profiles are enough.  Names are returned fully qualified.
    """
    gpus = tuple(ResourcePattern(p.pattern, full_resource_name(p.name))
                 for p in config.resources.gpus)
    gpus += (ResourcePattern("*", f"{DOMAIN}/gpu"),)
    mig = tuple(ResourcePattern(p.pattern, full_resource_name(p.name))
                for p in config.resources.mig)
    strategy = config.flags.mig_strategy
    if strategy == "single":
        mig += (ResourcePattern("*", f"{DOMAIN}/gpu"),)
    elif strategy == "mixed":
        profiles = dict.fromkeys(m.profile for g in model.gpus if g.mig_enabled
                                 for m in g.mig_devices)
        mig += tuple(ResourcePattern(p, _mig_default_name(p)) for p in profiles
                     if not _SUBDIVIDED_PROFILE.match(p))
    return gpus, mig


def _match(patterns: Iterable[ResourcePattern], text: str) -> str | None:
    for pattern in patterns:
        if glob_matches(pattern.pattern, text):
            return pattern.name
    return None


# --------------------------------------------------------------------------------------
# Devices


def _mig_device(gpu: GpuInfo, mig: MigInfo, by_index: bool,
                minors: MigMinors | None) -> PlannedDevice:
    # Without the table (a caller that hands out no device specs) the parent's node is
    # all we can name; with it, a missing entry is fatal as in NVIDIA.
    caps = () if minors is None else mig_cap_paths(minors, gpu.minor, mig.gi_id, mig.ci_id)
    return mig_device(gpu, mig, by_index, caps)


def _aliases(model: NodeModel, device: PlannedDevice) -> set[str]:
    """Every way a ``devices`` list may name a device: index, UUID and, for MIG, the
    legacy ``MIG-GPU-<uuid>/<gi>/<ci>`` form."""
    names = {device.index, device.uuid}
    if device.is_mig:
        gpu_index, slot = (int(part) for part in device.index.split(":"))
        for mig in model.gpu(gpu_index).mig_devices:
            if mig.index == slot:
                names.add(f"MIG-{mig.parent_uuid}/{mig.gi_id}/{mig.ci_id}")
    return names


def _order(device: PlannedDevice) -> tuple[int, int, int]:
    """NVML order: GPU index, then MIG slot (a whole GPU first), then replica."""
    gpu, _, slot = device.index.partition(":")
    return (int(gpu), int(slot) if slot else -1,
            -1 if device.replica is None else device.replica)


def _device_map(model: NodeModel, config: Config, minors: MigMinors | None,
                warnings: list[str]) -> dict[str, list[PlannedDevice]]:
    """NVIDIA's ``buildDeviceMapFromConfigResources``, checks in the same order."""
    strategy = config.flags.mig_strategy
    by_index = config.flags.plugin.device_id_strategy == "index"
    gpu_patterns, mig_patterns = resource_patterns(model, config)
    devices: dict[str, list[PlannedDevice]] = {}
    for gpu in model.gpus:
        if gpu.mig_enabled and strategy != "none":
            continue
        name = _match(gpu_patterns, gpu.name)
        if name is None:
            raise PlanError(f"GPU name '{gpu.name}' does not match any resource patterns")
        devices.setdefault(name, []).append(gpu_device(gpu, by_index))
    if strategy == "none":
        return devices

    mig_devices: dict[str, list[PlannedDevice]] = {}
    for gpu in model.gpus:
        if not gpu.mig_enabled:
            continue
        for mig in gpu.mig_devices:
            name = _match(mig_patterns, mig.profile)
            if name is None:
                raise PlanError(f"MIG profile '{mig.profile}' does not match any resource patterns")
            mig_devices.setdefault(name, []).append(_mig_device(gpu, mig, by_index, minors))

    for gpu in model.gpus:
        if gpu.mig_enabled and not gpu.mig_devices:
            message = f"device {gpu.index} has no MIG devices configured"
            if strategy == "single":
                raise PlanError(message)
            warnings.append(f"{message}; it is not advertised (MIG strategy {strategy!r})")
    if strategy == "single":
        # NVIDIA compares NVML's MIG device attributes; profile and memory size stand for
        # them (the profile string encodes slices and engines).
        kinds = {(m.profile, m.memory_bytes) for g in model.gpus if g.mig_enabled
                 for m in g.mig_devices}
        if len(kinds) > 1:
            raise PlanError("more than one MIG device type present on node")
        if devices and mig_devices:
            raise PlanError("all devices on the node must be configured with the same "
                            "migEnabled value")
    for name, found in mig_devices.items():
        devices.setdefault(name, []).extend(found)
    return devices


# --------------------------------------------------------------------------------------
# Sharing


def _select(model: NodeModel, entry: ReplicatedResource, name: str,
            available: Sequence[PlannedDevice], where: str) -> list[PlannedDevice]:
    """The devices of ``name`` this sharing entry replicates, in NVML order."""
    spec = entry.devices
    # A count or a list wins over ``all``: ``all`` defaults to true, so a hand-built
    # ReplicatedDevices(count=2) means two devices, not every device.
    if spec.count is not None and spec.ids:
        raise PlanError(f"{where}: '{name}' gives both a count of devices and a list")
    if spec.count is not None:
        if spec.count < 1:
            raise PlanError(f"devices set as '{spec.count}' but a count of devices must be > 0")
        if spec.count > len(available):
            raise PlanError(f"requested {spec.count} devices to be replicated, but only "
                            f"{len(available)} devices available")
        return list(available[:spec.count])
    if spec.ids:
        aliases = [(_aliases(model, device), device) for device in available]
        unknown = [i for i in spec.ids if not any(i in names for names, _ in aliases)]
        if unknown:
            listed = ", ".join(repr(i) for i in unknown)
            raise PlanError(f"{where}: {listed} not among the devices of '{name}' on this node")
        wanted = set(spec.ids)
        return [device for names, device in aliases if names & wanted]
    return list(available)


def _share(model: NodeModel, config: Config, devices: dict[str, list[PlannedDevice]],
           warnings: list[str]) -> dict[str, list[PlannedDevice]]:
    """NVIDIA's ``updateDeviceMapWithReplicas`` with ``rename`` and ``devices`` honoured.

    Every resource that gets replicas is checked against the kubelet's message limit
    (:func:`_check_shares`) before any replica is formed, so a count far too large is
    refused at the cost of a few sums, not after building millions of devices."""
    active = config.sharing.active
    if active is None:
        return devices
    strategy = config.sharing.strategy
    where = f"sharing.{'mps' if strategy == 'mps' else 'timeSlicing'}.resources"
    result = {name: list(found) for name, found in devices.items()}
    claimed: dict[tuple[str, str], int] = {}
    shares: list[_Share] = []
    for number, entry in enumerate(active.resources):
        name = full_resource_name(entry.name)
        available = devices.get(name, [])
        if not available:
            present = ", ".join(sorted(devices)) or "none"
            warnings.append(f"{where}[{number}].name: no '{name}' devices on this node, "
                            f"nothing to share (resources on this node: {present})")
            continue
        chosen = _select(model, entry, name, available, f"{where}[{number}]")
        if strategy == "mps" and any(device.is_mig for device in chosen):
            raise PlanError("sharing using MPS is not supported for MIG devices")
        for device in chosen:
            earlier = claimed.setdefault((name, device.id), number)
            if earlier != number:
                raise PlanError(f"{where}: device {device.id} of '{name}' is shared by both "
                                f"entry {earlier} and entry {number}")
        ids = {device.id for device in chosen}
        result[name] = [device for device in result[name] if device.id not in ids]
        # Config fills rename for renameByDefault; a hand-built Config may leave it None.
        if entry.rename:
            target = full_resource_name(entry.rename)
        elif active.rename_by_default:
            target = f"{name}.shared"
        else:
            target = name
        shares.append(_Share(f"{where}[{number}]", entry.replicas, chosen, target))
    _check_shares(result, shares)
    for share in shares:
        result.setdefault(share.target, []).extend(
            replica for device in share.devices for replica in replicas(device, share.replicas))
    return result


@dataclasses.dataclass(frozen=True)
class _Share:
    """One sharing entry as planned: its key path, its devices and where replicas go."""

    path: str
    replicas: int
    devices: list[PlannedDevice]
    target: str

    def bytes(self) -> int:
        """What its replicas add to the target's ListAndWatchResponse."""
        return sum(replicas_bytes(d.id, d.numa_nodes, self.replicas) for d in self.devices)


def _limit_text() -> str:
    return (f"the kubelet takes at most {MAX_LIST_AND_WATCH_BYTES} bytes "
            f"({MAX_LIST_AND_WATCH_BYTES // (1024 * 1024)} MiB) in one ListAndWatch response")


def _check_shares(result: Mapping[str, Sequence[PlannedDevice]], shares: Sequence[_Share]) -> None:
    """Raise :class:`PlanError` naming the entry's ``replicas`` key, the device count, the
    limit and the most replicas that would fit, if a resource's device list with these
    replicas would be larger than the kubelet takes."""
    for target in dict.fromkeys(share.target for share in shares):
        into = [share for share in shares if share.target == target]
        plain = result.get(target, ())
        plain_bytes = list_and_watch_bytes((d.id, d.numa_nodes) for d in plain)
        total = plain_bytes + sum(share.bytes() for share in into)
        if total <= MAX_LIST_AND_WATCH_BYTES:
            continue
        # The last entry filling the resource is the one to shrink; the others stay.
        last = into[-1]
        others = plain_bytes + sum(share.bytes() for share in into[:-1])
        fits = max_replicas([(d.id, d.numa_nodes) for d in last.devices],
                            MAX_LIST_AND_WATCH_BYTES - others)
        count = len(plain) + sum(share.replicas * len(share.devices) for share in into)
        advice = (f"at most {fits} replicas fit here" if fits >= 2 else
                  f"not even 2 replicas fit beside the {count - last.replicas * len(last.devices)}"
                  " other devices")
        raise PlanError(f"{last.path}.replicas: {last.replicas} replicas of "
                        f"{len(last.devices)} device(s) would give '{target}' {count} devices, "
                        f"a device list of {total} bytes; {_limit_text()}, so {advice} on this "
                        "node")


# --------------------------------------------------------------------------------------
# The plan


def _check_size(name: str, devices: Sequence[PlannedDevice]) -> None:
    size = list_and_watch_bytes((d.id, d.numa_nodes) for d in devices)
    if size > MAX_LIST_AND_WATCH_BYTES:
        raise PlanError(f"'{name}': {len(devices)} devices make a device list of {size} "
                        f"bytes; {_limit_text()}")


def plan(model: NodeModel, config: Config, mig_minors: MigMinors | None = None) -> PlanResult:
    """The resources this node advertises under ``config``.

    Follows NVIDIA's device map (MIG strategies ``none``, ``single``, ``mixed`` with their
    checks and error texts), device IDs per ``deviceIDStrategy``, then sharing (each
    selected device replaced by ``<id>::<n>`` replicas, moved to ``rename`` if set).
    Resources with no devices are left out; resources are sorted by name, devices in
    NVML order (GPU index, MIG slot, replica).

    ``mig_minors`` is the parsed ``mig-minors`` table: with it, MIG devices carry the
    parent's node and their GI and CI capability nodes, and a missing entry raises;
    without it (``None``, for callers that pass no device specs) only the parent's node.

    Raises :class:`PlanError` when the node cannot be served with this configuration,
    including a resource whose device list would not fit in the kubelet's 4 MiB
    ListAndWatch message (:data:`~trio_gpu_plugin._plan_model.MAX_LIST_AND_WATCH_BYTES`):
    the error names the sharing entry's ``replicas`` and how many would fit.
    """
    warnings: list[str] = []
    devices = _device_map(model, config, mig_minors, warnings)
    devices = _share(model, config, devices, warnings)
    resources = []
    for name in sorted(devices):
        found = sorted(devices[name], key=_order)
        if not found:
            continue
        is_shared = any(device.replica is not None for device in found)
        if not is_shared:
            # Shared resources were checked before their replicas were formed.
            _check_size(name, found)
        resources.append(PlannedResource(
            name=name, socket_name=socket_name(name), devices=tuple(found),
            sharing=config.sharing.strategy if is_shared else "none",
            fail_requests_greater_than_one=(config.sharing.fail_requests_greater_than_one
                                            if is_shared else False)))
    return PlanResult(tuple(resources), tuple(warnings))
