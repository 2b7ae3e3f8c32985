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
import math
import os
from typing import Any, Final

import pynvml

from ._node_model import GpuInfo, MigInfo, NodeModel
from ._nvml import NVML, NVMLError, nvml_gone, text

__all__ = ["DiscoveryError", "DiscoveryResult", "discover", "numa_node_path", "profile_name"]

MiB: Final = 1024 * 1024
GiB: Final = 1024 * MiB

# Slice counts of NVML's GPU instance profile indexes, and the attribute go-nvlib
# appends to the profile name for each variant.
_GI_SLICES: Final = {0: 1, 1: 2, 2: 3, 3: 4, 4: 7, 5: 8, 6: 6, 7: 1, 8: 2, 9: 1,
                     10: 1, 11: 2, 12: 4, 13: 1, 14: 2, 15: 1, 16: 2}
_GI_ATTRIBUTE: Final = {7: "+me", 8: "+me", 10: "+gfx", 11: "+gfx", 12: "+gfx",
                        13: "-me", 14: "-me", 15: "+me.all", 16: "+me.all"}
_CI_SLICES: Final = {0: 1, 1: 2, 2: 3, 3: 4, 4: 7, 5: 8, 6: 6, 7: 1}


class DiscoveryError(Exception):
    """Discovery found something it cannot model (a malformed sysfs NUMA file, say)."""


@dataclasses.dataclass(frozen=True)
class DiscoveryResult:
    """What one discovery pass found.

    Attributes:
        model: the node.
        problems: device UUID -> what NVML could not answer for it.
    """

    model: NodeModel
    problems: dict[str, str]


def profile_name(gi_index: int, ci_index: int, slice_memory_mb: int, total_bytes: int) -> str:
    """go-nvlib's MIG profile string from GI/CI profile indexes and memory sizes.

    ``GB`` is the slice's share of the GPU's memory rounded up to eighths, times the
    GPU's memory in whole GiB, rounded: an A100-40GB slice of 4864 MB is ``5gb``.
    """
    g = _GI_SLICES[gi_index]
    c = _CI_SLICES[ci_index]
    fraction = math.ceil(slice_memory_mb * MiB / total_bytes * 8) / 8
    gb = round(fraction * ((total_bytes + GiB - 1) // GiB))
    suffix = _GI_ATTRIBUTE.get(gi_index, "")
    return f"{g}g.{gb}gb{suffix}" if c == g else f"{c}c.{g}g.{gb}gb{suffix}"


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


def _error_code(error: NVMLError) -> int | None:
    return getattr(error, "value", None)


def _nvlinks(nvml: NVML, handle: Any) -> list[str]:
    """Remote bus IDs of the GPU's active NVLinks (one entry per link)."""
    remotes = []
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                continue
            remotes.append(_normal_bus(text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)))
        except NVMLError as exc:
            if nvml_gone(exc):
                raise
            # NOT_SUPPORTED (no NVLink at all) or INVALID_ARGUMENT (past the last link).
            break
    return remotes


def _gi_profile(nvml: NVML, parent: Any, profile_id: int) -> tuple[int, Any] | None:
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(parent, index)
        except NVMLError as exc:
            if nvml_gone(exc):
                raise
            continue  # a profile this GPU does not support
        if info.id == profile_id and index in _GI_SLICES:
            return index, info
    return None


def _ci_profile_index(nvml: NVML, gpu_instance: Any, profile_id: int) -> int | None:
    for index in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                gpu_instance, index, pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
        except NVMLError as exc:
            if nvml_gone(exc):
                raise
            continue
        if info.id == profile_id and index in _CI_SLICES:
            return index
    return None


def _mig_profile(nvml: NVML, parent: Any, mig: Any, gi_id: int, ci_id: int,
                 total_bytes: int) -> tuple[str, int]:
    """The MIG device's profile string and memory, from GI/CI profile info (go-nvlib's
    way), falling back to the MIG device's own attributes."""
    try:
        gpu_instance = nvml.nvmlDeviceGetGpuInstanceById(parent, gi_id)
        gi_profile = _gi_profile(nvml, parent, nvml.nvmlGpuInstanceGetInfo(gpu_instance).profileId)
        compute_instance = nvml.nvmlGpuInstanceGetComputeInstanceById(gpu_instance, ci_id)
        ci_index = _ci_profile_index(
            nvml, gpu_instance, nvml.nvmlComputeInstanceGetInfo(compute_instance).profileId)
        if gi_profile is not None and ci_index is not None and total_bytes:
            gi_index, info = gi_profile
            return (profile_name(gi_index, ci_index, int(info.memorySizeMB), total_bytes),
                    int(info.memorySizeMB) * MiB)
    except NVMLError as exc:
        if nvml_gone(exc):
            raise
    # Without profile info (too little privilege to query instances, say), the
    # device's attributes give slice counts and memory: the plain profile name.
    attributes = nvml.nvmlDeviceGetAttributes(mig)
    g, c = int(attributes.gpuInstanceSliceCount), int(attributes.computeInstanceSliceCount)
    memory_mb = int(attributes.memorySizeMB)
    fraction = math.ceil(memory_mb * MiB / total_bytes * 8) / 8 if total_bytes else 0
    gb = round(fraction * ((total_bytes + GiB - 1) // GiB))
    return (f"{g}g.{gb}gb" if c == g else f"{c}c.{g}g.{gb}gb"), memory_mb * MiB


def _mig_devices(nvml: NVML, parent: Any, parent_uuid: str, parent_index: int,
                 numa: int | None, total_bytes: int) -> tuple[bool, tuple[MigInfo, ...]]:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(parent)
    except NVMLError as exc:
        if nvml_gone(exc):
            raise
        return False, ()  # NOT_SUPPORTED: a GPU without MIG
    if current != pynvml.NVML_DEVICE_MIG_ENABLE:
        return False, ()
    devices = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(parent)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
        except NVMLError as exc:
            if _error_code(exc) == pynvml.NVML_ERROR_NOT_FOUND:
                continue  # slots are sparse
            raise
        gi_id = nvml.nvmlDeviceGetGpuInstanceId(mig)
        ci_id = nvml.nvmlDeviceGetComputeInstanceId(mig)
        profile, memory = _mig_profile(nvml, parent, mig, gi_id, ci_id, total_bytes)
        devices.append(MigInfo(
            uuid=text(nvml.nvmlDeviceGetUUID(mig)), parent_uuid=parent_uuid,
            parent_index=parent_index, index=slot, gi_id=gi_id, ci_id=ci_id,
            profile=profile, memory_bytes=memory, numa_node=numa))
    return True, tuple(devices)


def _gpu(nvml: NVML, index: int, root: str | os.PathLike[str],
         problems: dict[str, str]) -> tuple[GpuInfo, list[str], Any] | None:
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
    try:
        try:
            memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        except NVMLError as exc:
            if nvml_gone(exc) or _error_code(exc) == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise
            memory = 0  # NVIDIA ignores memory errors too (MIG parents may refuse)
        bus = text(nvml.nvmlDeviceGetPciInfo(handle).busId)
        numa = _read_numa(root, bus)
        mig_enabled, migs = _mig_devices(nvml, handle, uuid, index, numa, memory)
        gpu = GpuInfo(
            uuid=uuid, index=index, minor=nvml.nvmlDeviceGetMinorNumber(handle),
            name=text(nvml.nvmlDeviceGetName(handle)), memory_bytes=memory,
            pci_bus_id=bus, compute_capability=tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle)),  # type: ignore[arg-type]
            numa_node=numa, mig_enabled=mig_enabled, mig_devices=migs)
        return gpu, _nvlinks(nvml, handle), handle
    except NVMLError as exc:
        if nvml_gone(exc):
            raise
        problems[uuid] = f"NVML cannot answer for it: {exc}"
        return GpuInfo(uuid=uuid, index=index, minor=-1, name="", memory_bytes=0,
                       pci_bus_id="", compute_capability=(0, 0), numa_node=None), [], None


def discover(nvml: NVML, root: str | os.PathLike[str] = "/") -> DiscoveryResult:
    """Read every GPU and MIG device from an initialised NVML.  Blocking.

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
    found = []
    for index in range(nvml.nvmlDeviceGetCount()):
        result = _gpu(nvml, index, root, problems)
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
    return DiscoveryResult(NodeModel(gpus=tuple(gpus), pcie=pcie, driver_version=driver), problems)
