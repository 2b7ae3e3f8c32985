"""The node's GPUs as discovery found them: one immutable value per NVML session.

Everything later code needs about the hardware (resource naming, MIG strategies,
allocation contents, topology-aware placement, health mapping) reads this model and
never NVML directly.  Plain frozen data: build one in a test by hand if you like.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Final

__all__ = ["GpuInfo", "MigInfo", "NodeModel", "PCIE_LEVELS"]

#: NVML's PCIe topology levels (``nvmlDeviceGetTopologyCommonAncestor``), nearest first.
PCIE_LEVELS: Final = {
    0: "same board",
    10: "single PCIe switch",
    20: "multiple PCIe switches",
    30: "same host bridge",
    40: "same NUMA node",
    50: "across NUMA nodes",
}


@dataclasses.dataclass(frozen=True)
class MigInfo:
    """One MIG device (a GPU instance with one compute instance).

    Attributes:
        uuid: ``MIG-...``.
        parent_uuid: the physical GPU's UUID.
        parent_index: the physical GPU's NVML index.
        index: the MIG device's slot on its parent (NVIDIA's ``<parent>:<index>`` ID).
        gi_id, ci_id: GPU and compute instance IDs (what NVML events name).
        profile: NVIDIA's profile string, e.g. ``1g.5gb``, ``1g.10gb+me``, ``1c.2g.10gb``.
        memory_bytes: the slice's memory.
        numa_node: the parent's NUMA node, ``None`` when unknown.
    """

    uuid: str
    parent_uuid: str
    parent_index: int
    index: int
    gi_id: int
    ci_id: int
    profile: str
    memory_bytes: int
    numa_node: int | None


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """One physical GPU.

    Attributes:
        uuid: ``GPU-...``.
        index: NVML enumeration index.
        minor: device minor number (``/dev/nvidia<minor>``).
        name: product name, e.g. ``NVIDIA A100-SXM4-40GB``.
        memory_bytes: total framebuffer memory.
        pci_bus_id: as NVML reports it, e.g. ``00000000:07:00.0``.
        compute_capability: ``(major, minor)``.
        numa_node: from sysfs; ``None`` when unknown (no file, or -1).
        nvlinks: active NVLink count to each peer GPU, by peer UUID (links to NVSwitches
            or to GPUs outside the node are not listed).
        nvswitch_links: active links that end at an NVSwitch (or anything that is not a
            GPU of this node).
        mig_enabled: MIG mode is on (current mode; a pending change needs a reset).
        mig_devices: its MIG devices, by slot.
    """

    uuid: str
    index: int
    minor: int
    name: str
    memory_bytes: int
    pci_bus_id: str
    compute_capability: tuple[int, int]
    numa_node: int | None
    nvlinks: Mapping[str, int] = dataclasses.field(default_factory=dict)
    nvswitch_links: int = 0
    mig_enabled: bool = False
    mig_devices: tuple[MigInfo, ...] = ()


@dataclasses.dataclass(frozen=True)
class NodeModel:
    """All GPUs of the node, in NVML index order.

    Attributes:
        gpus: the physical GPUs.
        pcie: NVML's common-ancestor level for each pair of GPU UUIDs (both orders); see
            :data:`PCIE_LEVELS`.  Pairs NVML could not answer for are absent.
        driver_version: the NVIDIA driver's version string.
    """

    gpus: tuple[GpuInfo, ...]
    pcie: Mapping[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    driver_version: str = ""

    def gpu(self, key: int | str) -> GpuInfo:
        """A GPU by index, or by UUID; ``KeyError`` naming the key otherwise."""
        for gpu in self.gpus:
            if gpu.uuid == key or (isinstance(key, int) and gpu.index == key):
                return gpu
        raise KeyError(f"no GPU {key!r} on this node")

    @property
    def mig_devices(self) -> Iterator[MigInfo]:
        """Every MIG device of every GPU."""
        for gpu in self.gpus:
            yield from gpu.mig_devices
