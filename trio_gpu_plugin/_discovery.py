"""Discovery: one pass over NVML that builds the immutable :class:`NodeModel`.

A plain blocking function over the narrow :class:`~trio_gpu_plugin._nvml.NVML` interface
(run it in a worker thread), so real pynvml and the simulated NVML go through the same
code.  What it reads, and where NVIDIA's plugin reads the same thing:

* identity and paths: UUID, index, minor number, name, memory, PCI bus ID, compute
  capability (``nvml_devices.go``);
* NUMA node from sysfs, ``<root>/sys/bus/pci/devices/<bus id>/numa_node``, with the bus
  ID derived as NVIDIA does (``GetNumaNode``); unknown (no file, or -1) is ``None``;
* NVLink: for each active link, the remote PCI bus ID, counted per peer GPU, links
  to anything else (NVSwitches) counted apart; PCIe common-ancestor level per pair;
* MIG devices with the profile string derived from GI/CI profile info the way go-nvlib
  names profiles (``1g.5gb``, ``1g.5gb+me``, ``1c.2g.10gb``).

A GPU that NVML answers for only in part (a GPU lost at start, say) stays in the model
if its UUID is known, with what could be read, and is listed in
``DiscoveryResult.problems`` so health checking starts it Unhealthy.  Errors that mean
NVML as a whole is unusable propagate.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Final

import pynvml

from ._mig_profiles import (
    CI_PROFILE_SLICES,
    GI_PROFILE_ATTRIBUTE,
    GI_PROFILE_SLICES,
    format_profile,
    match_gi_profile,
    memory_gb,
    profile_from_nvml_name,
    profile_name,
)
from ._node_model import GpuInfo, MigInfo, NodeModel
from ._nvml import DEVICE_ERRORS, NVML, NVMLError, error_code, nvml_gone, text

__all__ = ["DiscoveryError", "DiscoveryResult", "discover", "numa_node_path"]

MiB: Final = 1024 * 1024

log = logging.getLogger("trio_gpu_plugin.nvml")


class DiscoveryError(Exception):
    """Discovery found something it cannot model (a malformed sysfs NUMA file, say)."""


@dataclasses.dataclass(frozen=True)
class DiscoveryResult:
    """What one discovery pass found.

    Attributes:
        model: the node.
        problems: device UUID (or ``"GPU <index>"`` where not even the UUID could be
            read) -> what NVML could not answer for it.  A GPU listed by UUID is in the
            model with what could be read; its facts are incomplete.
        notes: GPU UUID -> how some of its facts had to be found (MIG names without
            privilege, say), for the log.
    """

    model: NodeModel
    problems: dict[str, str]
    notes: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def numa_node_path(root: str | os.PathLike[str], pci_bus_id: str) -> str:
    """Where sysfs keeps a GPU's NUMA node, from NVML's bus ID (``00000000:3B:00.0``).

    NVIDIA strips one leading ``0000`` (NVML pads the domain to eight digits, sysfs
    uses four) and lower-cases.
    """
    bus = pci_bus_id
    if len(bus.split(":", 1)[0]) == 8 and bus.startswith("0000"):
        bus = bus[4:]
    return os.path.join(os.fspath(root), "sys/bus/pci/devices", bus.lower(), "numa_node")


def _read_numa(root: str | os.PathLike[str], pci_bus_id: str) -> int | None:
    path = numa_node_path(root, pci_bus_id)
    try:
        with open(path, encoding="ascii") as file:
            raw = file.read().strip()
    except OSError:
        return None  # NVIDIA: no file means no topology, not an error
    try:
        node = int(raw)
    except ValueError:
        raise DiscoveryError(f"{path}: expected a NUMA node number, found {raw!r}") from None
    return node if node >= 0 else None


def _normal_bus(bus_id: str) -> str:
    domain, _, rest = bus_id.partition(":")
    return f"{int(domain, 16):08X}:{rest.upper()}" if rest else bus_id.upper()


def _nvlinks(nvml: NVML, handle: Any) -> list[str]:
    """Remote bus IDs of the GPU's active NVLinks (one entry per link).

    Every link index is asked: a link that answers NOT_SUPPORTED (or INVALID_ARGUMENT)
    says nothing about the others, and on real parts inactive or absent link numbers
    can come before active ones.  Only an error meaning the GPU or NVML is gone stops.
    """
    remotes = []
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                continue
            remotes.append(_normal_bus(text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)))
        except NVMLError as exc:
            if nvml_gone(exc) or error_code(exc) in DEVICE_ERRORS:
                raise
    return remotes


def _gi_profiles(nvml: NVML, parent: Any) -> dict[int, Any]:
    """Every GPU instance profile the parent offers: profile index -> profile info.
    Needs no privilege (unlike looking up the GPU instances themselves)."""
    profiles = {}
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            profiles[index] = nvml.nvmlDeviceGetGpuInstanceProfileInfo(parent, index)
        except NVMLError as exc:
            if nvml_gone(exc) or error_code(exc) in DEVICE_ERRORS:
                raise
            # NOT_SUPPORTED / INVALID_ARGUMENT: a profile this GPU does not have.
    return profiles


def _gi_index_by_instance(nvml: NVML, parent: Any, gi_id: int, candidates: list[int],
                          profiles: dict[int, Any]) -> int | None:
    """Which of ``candidates`` the GPU instance really is, from its profile ID; needs
    privilege (``nvmlDeviceGetGpuInstanceById``), so ``None`` without it."""
    try:
        info = nvml.nvmlGpuInstanceGetInfo(nvml.nvmlDeviceGetGpuInstanceById(parent, gi_id))
    except NVMLError as exc:
        if nvml_gone(exc) or error_code(exc) in DEVICE_ERRORS:
            raise
        return None
    return next((i for i in candidates if profiles[i].id == info.profileId), None)


def _ci_index(ci_slices: int) -> int | None:
    """A compute instance profile index with this many slices (the name depends only on
    the count: ``7_SLICE`` and ``7_SLICE_NVL`` both name ``7g``)."""
    return next((i for i, n in sorted(CI_PROFILE_SLICES.items()) if n == ci_slices), None)


@dataclasses.dataclass
class _MigNaming:
    """How one parent GPU's MIG devices get their names, worked out once per GPU."""

    total_bytes: int | None  # the parent's memory, None without privilege
    profiles: dict[int, Any]  # GI profile index -> info
    notes: list[str]  # what the caller should log about how names were found


def _mig_profile(nvml: NVML, parent: Any, mig: Any, gi_id: int, naming: _MigNaming) -> tuple[str, int]:
    """The MIG device's profile string (go-nvlib's) and memory, from unprivileged calls.

    The device's own attributes give its slice counts, memory and engines; they pick its
    GPU instance profile out of the parent's profile table (so ``1g.10gb+me`` is told from
    ``1g.10gb`` by its media engines).  The GB figure follows go-nvlib from the parent's
    total memory when NVML gives it (privileged, or NVIDIA_MIG_MONITOR_DEVICES=all);
    otherwise NVML's own name of the profile holds it (NVIDIA's published names are
    NVML's); failing both, the largest profile stands in for the total.
    """
    attributes = nvml.nvmlDeviceGetAttributes(mig)
    g, c = int(attributes.gpuInstanceSliceCount), int(attributes.computeInstanceSliceCount)
    memory_mb = int(attributes.memorySizeMB)
    candidates = match_gi_profile(attributes, naming.profiles)
    if len(candidates) > 1:
        exact = _gi_index_by_instance(nvml, parent, gi_id, candidates, naming.profiles)
        if exact is None:
            naming.notes.append(
                f"GPU instance {gi_id} matches profiles {candidates} alike and NVML will not "
                f"say which without privilege; named as profile {candidates[0]}")
        candidates = [exact if exact is not None else candidates[0]]
    ci_index = _ci_index(c)
    if candidates and ci_index is not None:
        gi_index = candidates[0]
        info = naming.profiles[gi_index]
        if naming.total_bytes:
            return (profile_name(gi_index, ci_index, int(info.memorySizeMB), naming.total_bytes),
                    int(info.memorySizeMB) * MiB)
        parsed = profile_from_nvml_name(info.name) if hasattr(info, "name") else None
        if parsed is not None and parsed[0] == GI_PROFILE_SLICES[gi_index]:
            _, gb, _ = parsed
            return (format_profile(c, g, gb, GI_PROFILE_ATTRIBUTE[gi_index]),
                    int(info.memorySizeMB) * MiB)
    # No profile to match (the table did not answer) or NVML's name is unusable: the
    # attributes give the plain name, with the best total there is.
    total = naming.total_bytes or max(
        (int(p.memorySizeMB) * MiB for p in naming.profiles.values()), default=memory_mb * MiB)
    naming.notes.append(f"GPU instance {gi_id}: named from its attributes alone")
    return format_profile(c, g, memory_gb(memory_mb, total) if total else 0), memory_mb * MiB


def _mig_devices(nvml: NVML, parent: Any, parent_uuid: str, parent_index: int,
                 numa: int | None, total_bytes: int | None,
                 notes: list[str]) -> tuple[bool, tuple[MigInfo, ...], int]:
    """(MIG on, its MIG devices, the largest GPU instance profile's memory in bytes)."""
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(parent)
    except NVMLError as exc:
        if nvml_gone(exc) or error_code(exc) in DEVICE_ERRORS:
            raise
        return False, (), 0  # NOT_SUPPORTED: a GPU without MIG
    if current != pynvml.NVML_DEVICE_MIG_ENABLE:
        return False, (), 0
    naming = _MigNaming(total_bytes, _gi_profiles(nvml, parent), notes)
    devices = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(parent)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
        except NVMLError as exc:
            if error_code(exc) == pynvml.NVML_ERROR_NOT_FOUND:
                continue  # slots are sparse
            raise
        gi_id = nvml.nvmlDeviceGetGpuInstanceId(mig)
        ci_id = nvml.nvmlDeviceGetComputeInstanceId(mig)
        profile, memory = _mig_profile(nvml, parent, mig, gi_id, naming)
        devices.append(MigInfo(
            uuid=text(nvml.nvmlDeviceGetUUID(mig)), parent_uuid=parent_uuid,
            parent_index=parent_index, index=slot, gi_id=gi_id, ci_id=ci_id,
            profile=profile, memory_bytes=memory, numa_node=numa))
    largest = max((int(p.memorySizeMB) * MiB for p in naming.profiles.values()), default=0)
    return True, tuple(devices), largest


def _memory(nvml: NVML, handle: Any, notes: list[str]) -> int | None:
    """The GPU's total memory; ``None`` where NVML will not say (noted in ``notes``).

    NVML gives a MIG-enabled parent's aggregate only to a privileged caller
    (NO_PERMISSION otherwise); NVIDIA's plugin ignores memory errors altogether, so any
    error but one meaning the GPU or NVML is gone leaves the memory unknown, not the GPU.
    """
    try:
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    except NVMLError as exc:
        if nvml_gone(exc) or error_code(exc) in DEVICE_ERRORS:
            raise
        if error_code(exc) == pynvml.NVML_ERROR_NO_PERMISSION:
            notes.append("NVML gives a MIG-enabled GPU's total memory only to a privileged "
                         "caller (NVIDIA_MIG_MONITOR_DEVICES=all gives it); MIG profile "
                         "names come from NVML's own profile table instead")
        else:
            notes.append(f"its memory size is unknown: {exc}")
        return None


def _gpu(nvml: NVML, index: int, root: str | os.PathLike[str], problems: dict[str, str],
         notes: dict[str, list[str]]) -> tuple[GpuInfo, list[str], Any] | None:
    """One GPU, the remote bus IDs of its NVLinks and its handle; ``None`` if not even
    its UUID can be read."""
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = text(nvml.nvmlDeviceGetUUID(handle))
    except NVMLError as exc:
        if nvml_gone(exc):
            raise
        problems[f"GPU {index}"] = f"NVML cannot identify GPU {index}: {exc}"
        return None
    gpu_notes: list[str] = []
    try:
        total = _memory(nvml, handle, gpu_notes)
        bus = text(nvml.nvmlDeviceGetPciInfo(handle).busId)
        numa = _read_numa(root, bus)
        mig_enabled, migs, largest = _mig_devices(nvml, handle, uuid, index, numa, total,
                                                  gpu_notes)
        gpu = GpuInfo(
            uuid=uuid, index=index, minor=nvml.nvmlDeviceGetMinorNumber(handle),
            name=text(nvml.nvmlDeviceGetName(handle)),
            # Unknown (MIG without privilege): the whole-GPU profile's memory, what one
            # container could have of it at most.
            memory_bytes=total if total is not None else largest,
            pci_bus_id=bus, compute_capability=tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle)),  # type: ignore[arg-type]
            numa_node=numa, mig_enabled=mig_enabled, mig_devices=migs)
        links = _nvlinks(nvml, handle)
    except NVMLError as exc:
        if nvml_gone(exc):
            raise
        problems[uuid] = f"NVML cannot answer for it: {exc}"
        return GpuInfo(uuid=uuid, index=index, minor=-1, name="", memory_bytes=0,
                       pci_bus_id="", compute_capability=(0, 0), numa_node=None), [], None
    if gpu_notes:
        notes[uuid] = gpu_notes
    return gpu, links, handle


def discover(nvml: NVML, root: str | os.PathLike[str] = "/") -> DiscoveryResult:
    """Read every GPU and MIG device from an initialised NVML.  Blocking.

    Makes no call that needs privilege to succeed: MIG profiles are named from the
    devices' own attributes and the parent's profile table.

    Args:
        nvml: real pynvml or the simulated NVML, already ``nvmlInit``-ed.
        root: where ``sys/`` is found (``/`` on a node; a simulated node's fake root).

    Raises:
        NVMLError: NVML itself failed (the count, the driver version, or an error
            meaning NVML is gone).
        DiscoveryError: a sysfs NUMA file holds something other than a number.
    """
    driver = text(nvml.nvmlSystemGetDriverVersion())
    problems: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    found = []
    for index in range(nvml.nvmlDeviceGetCount()):
        result = _gpu(nvml, index, root, problems, notes)
        if result is not None:
            found.append(result)
    by_bus = {_normal_bus(gpu.pci_bus_id): gpu.uuid for gpu, _, _ in found if gpu.pci_bus_id}
    gpus = []
    for gpu, remotes, _ in found:
        peers: dict[str, int] = {}
        other = 0
        for remote in remotes:
            peer = by_bus.get(remote)
            if peer is None or peer == gpu.uuid:
                other += 1
            else:
                peers[peer] = peers.get(peer, 0) + 1
        gpus.append(dataclasses.replace(gpu, nvlinks=peers, nvswitch_links=other))
    pcie: dict[tuple[str, str], int] = {}
    handles = {gpu.uuid: handle for gpu, _, handle in found if gpu.uuid not in problems}
    healthy = [g for g in gpus if g.uuid in handles]
    if len(healthy) > 1:
        for i, a in enumerate(healthy):
            for b in healthy[i + 1:]:
                try:
                    level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a.uuid], handles[b.uuid]))
                except NVMLError as exc:
                    if nvml_gone(exc):
                        raise
                    continue  # unknown relationship: the topology model tolerates gaps
                pcie[(a.uuid, b.uuid)] = pcie[(b.uuid, a.uuid)] = level
    return DiscoveryResult(NodeModel(gpus=tuple(gpus), pcie=pcie, driver_version=driver),
                           problems, notes)
