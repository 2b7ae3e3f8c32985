"""What the plugin advertises: resources and their devices, planned from model + config.

Plain frozen data shared by the resource planner (``_resources``: MIG strategies,
naming, sharing) and Allocate (``_allocate``: what a container gets).  The plugin runtime
turns each :class:`PlannedResource` into one socket and one registration.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PlannedDevice", "PlannedResource"]


@dataclasses.dataclass(frozen=True)
class PlannedDevice:
    """One device as a resource advertises it.

    Attributes:
        id: the ID the kubelet sees: per ``deviceIDStrategy`` the UUID (``GPU-...``,
            ``MIG-...``) or the index (``"3"``, ``"3:1"``), with ``::<n>`` for a replica.
        uuid: the GPU's or MIG device's UUID.
        index: NVIDIA's index: ``"<i>"`` for GPU i, ``"<i>:<j>"`` for MIG device j of GPU i.
        replica: ``n`` of ``::<n>``, or ``None`` for an unshared device.
        units: health units it is built on (GPU and MIG UUIDs).
        numa_nodes: NUMA nodes it is attached to.
        paths: its device nodes as the container sees them: ``/dev/nvidia<minor>``; for
            MIG the parent's node and the GI and CI access capability nodes
            (``/dev/nvidia-caps/nvidia-cap<n>``).
        memory_bytes: its memory (the MIG slice's for MIG devices).
        compute_capability: ``(major, minor)``.
    """

    id: str
    uuid: str
    index: str
    replica: int | None
    units: tuple[str, ...]
    numa_nodes: tuple[int, ...]
    paths: tuple[str, ...]
    memory_bytes: int = 0
    compute_capability: tuple[int, int] = (0, 0)

    @property
    def is_mig(self) -> bool:
        """Whether it is a MIG device (NVIDIA: the index contains ``:``)."""
        return ":" in self.index

    @property
    def base_id(self) -> str:
        """The ID without the replica suffix."""
        return self.id.split("::", 1)[0]


@dataclasses.dataclass(frozen=True)
class PlannedResource:
    """One extended resource: one socket and one registration.

    Attributes:
        name: e.g. ``nvidia.com/gpu``, ``nvidia.com/mig-1g.5gb``, ``nvidia.com/gpu.shared``.
        socket_name: ``nvidia-<name after "nvidia.com/">.sock``, as NVIDIA names it (other
            domains: the name with ``/`` replaced by ``-``).
        devices: its devices, in advertising order.
        sharing: ``"none"``, ``"time-slicing"`` or ``"mps"``.
        fail_requests_greater_than_one: a request for more than one replica fails.
    """

    name: str
    socket_name: str
    devices: tuple[PlannedDevice, ...]
    sharing: str = "none"
    fail_requests_greater_than_one: bool = False

    def device(self, device_id: str) -> PlannedDevice | None:
        """The device with this ID, if the resource has it."""
        for device in self.devices:
            if device.id == device_id:
                return device
        return None
