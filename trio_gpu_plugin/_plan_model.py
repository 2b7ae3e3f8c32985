"""What the plugin advertises: resources and their devices, planned from model + config.

Plain frozen data shared by the resource planner (``_resources``: MIG strategies,
naming, sharing) and Allocate (``_allocate``: what a container gets).  The plugin runtime
turns each :class:`PlannedResource` into one socket and one registration.

It also holds the ceiling on a resource's size: the kubelet reads a resource's whole
device list as one ListAndWatchResponse, so what fits in the kubelet's message limit,
as our own codec encodes it (:func:`list_and_watch_bytes`, :func:`max_replicas`,
:data:`MAX_REPLICAS`), bounds replicas and devices per resource.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Final

from ._devices import DeviceInfo
from ._health import gpu_units, mig_units
from ._node_model import GpuInfo, MigInfo
from .proto import v1beta1

__all__ = [
    "MAX_LIST_AND_WATCH_BYTES",
    "MAX_REPLICAS",
    "PlannedDevice",
    "PlannedResource",
    "gpu_device",
    "mig_device",
    "replicas",
    "list_and_watch_bytes",
    "max_replicas",
    "replicas_bytes",
]

#: The largest ListAndWatchResponse the kubelet takes.  Its device-plugin client
#: (``pkg/kubelet/cm/devicemanager/plugin/v1beta1/client.go``) dials with grpc-go's
#: defaults, whose largest received message is 4 MiB (``defaultClientMaxReceiveMessageSize``,
#: counted without the 5-byte gRPC frame header); a longer one fails the stream with
#: RESOURCE_EXHAUSTED, so the resource would never get a device.
MAX_LIST_AND_WATCH_BYTES: Final = 4 * 1024 * 1024

# A replica's ID is ``<device id>::<n>`` (``_resources._replicas``).
_REPLICA_SEPARATOR: Final = "::"
_LONGEST_HEALTH: Final = max((v1beta1.HEALTHY, v1beta1.UNHEALTHY), key=len)


@functools.cache
def _entry_bytes(id_bytes: int, numa_nodes: tuple[int, ...]) -> int:
    """What one device whose ID is ``id_bytes`` UTF-8 bytes long adds to a
    ListAndWatchResponse, as our codec encodes it: the response with that device alone
    (repeated fields concatenate, and an empty response is zero bytes).  The longer
    health string (``Unhealthy``) is counted: the list must fit whatever the health.
    Only lengths and NUMA nodes matter, so a few encodings serve a whole plan."""
    topology = (v1beta1.TopologyInfo(nodes=[v1beta1.NUMANode(ID=n) for n in numa_nodes])
                if numa_nodes else None)
    device = v1beta1.Device(ID="x" * id_bytes, health=_LONGEST_HEALTH, topology=topology)
    return len(v1beta1.ListAndWatchResponse(devices=[device]).SerializeToString())


def list_and_watch_bytes(devices: Iterable[tuple[str, Sequence[int]]]) -> int:
    """The size of the ListAndWatchResponse advertising ``devices`` (``(id, numa
    nodes)`` pairs), every one counted as unhealthy (the longest the list can be)."""
    return sum(_entry_bytes(len(device_id.encode()), tuple(numa))
               for device_id, numa in devices)


def replicas_bytes(device_id: str, numa_nodes: Sequence[int], replicas: int) -> int:
    """The bytes ``replicas`` replicas of one device (IDs ``<device_id>::0`` ...) add to
    a ListAndWatchResponse, computed per number of digits without forming an ID: cheap
    for any count, so a huge one can be refused before anything is built."""
    base = len(device_id.encode()) + len(_REPLICA_SEPARATOR)
    numa = tuple(numa_nodes)
    total, digits, low = 0, 1, 0
    while low < replicas:
        high = min(replicas, 10 ** digits)
        total += (high - low) * _entry_bytes(base + digits, numa)
        low, digits = high, digits + 1
    return total


def max_replicas(devices: Sequence[tuple[str, Sequence[int]]], budget: int) -> int:
    """The most replicas of each of ``devices`` (``(id, numa nodes)`` pairs) that fit in
    ``budget`` bytes of ListAndWatchResponse (0 if not even one does)."""

    def size(count: int) -> int:
        return sum(replicas_bytes(device_id, numa, count) for device_id, numa in devices)

    # Every replica takes more than one byte, so ``budget`` of them never fit: bisect below.
    low, high = 0, budget
    while low < high:
        middle = (low + high + 1) // 2
        if size(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


#: The most replicas a sharing entry may ask for: what fits even for the smallest
#: device there can be (ID ``0``, GPU 0 under ``deviceIDStrategy: index``, no NUMA
#: node) alone on a node.  More can never be served, so the config file is refused at
#: once, before anything is planned or allocated; a node's own bound is checked when
#: its devices are planned.
MAX_REPLICAS: Final = max_replicas([("0", ())], MAX_LIST_AND_WATCH_BYTES)


@dataclasses.dataclass(frozen=True, slots=True)
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

    def advertised(self, healthy: bool) -> DeviceInfo:
        """What ListAndWatch sends for it: its ID, health and NUMA nodes."""
        return DeviceInfo(self.id, healthy, self.numa_nodes)


def _numa(node: int | None) -> tuple[int, ...]:
    return () if node is None else (node,)


def gpu_device(gpu: GpuInfo, by_index: bool = False) -> PlannedDevice:
    """A whole GPU as a device: ID its UUID (or its index, ``by_index``)."""
    index = str(gpu.index)
    return PlannedDevice(
        id=index if by_index else gpu.uuid, uuid=gpu.uuid, index=index, replica=None,
        units=gpu_units(gpu), numa_nodes=_numa(gpu.numa_node),
        paths=(f"/dev/nvidia{gpu.minor}",), memory_bytes=gpu.memory_bytes,
        compute_capability=gpu.compute_capability)


def mig_device(gpu: GpuInfo, mig: MigInfo, by_index: bool = False,
               cap_paths: tuple[str, ...] = ()) -> PlannedDevice:
    """MIG device ``mig`` of ``gpu`` as a device: ID its MIG UUID (or ``<i>:<j>``,
    ``by_index``); its paths the parent's node and ``cap_paths`` (its GI and CI access
    capability nodes, where the caller knows them)."""
    index = f"{gpu.index}:{mig.index}"
    return PlannedDevice(
        id=index if by_index else mig.uuid, uuid=mig.uuid, index=index, replica=None,
        units=mig_units(mig), numa_nodes=_numa(mig.numa_node),
        paths=(f"/dev/nvidia{gpu.minor}", *cap_paths),
        memory_bytes=mig.memory_bytes, compute_capability=gpu.compute_capability)


def replicas(device: PlannedDevice, count: int) -> list[PlannedDevice]:
    """``count`` shared copies ``<id>::<n>`` of ``device``, with its units, paths and
    topology: one health event on the device marks every replica."""
    # Built field by field: dataclasses.replace costs three times as much, and a shared
    # resource may hold a hundred thousand replicas.
    return [PlannedDevice(id=f"{device.id}::{n}", uuid=device.uuid, index=device.index,
                          replica=n, units=device.units, numa_nodes=device.numa_nodes,
                          paths=device.paths, memory_bytes=device.memory_bytes,
                          compute_capability=device.compute_capability)
            for n in range(count)]


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
