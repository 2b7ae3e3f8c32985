"""The device model: what a device source tells the plugin, and the plain-data rules on it.

Sans-IO: devices are frozen values, and the rules (how a device list becomes a
ListAndWatchResponse, which IDs an Allocate may use, the default preferred allocation)
are plain functions.  Where devices come from is a :class:`DeviceSource`'s business:
NVML on a GPU node, a simulated node in tests and demos, or anything an embedder plugs
in for their own hardware.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, Protocol

import trio

from ._grpc import RpcError, StatusCode
from .proto import v1beta1

__all__ = [
    "DeviceInfo",
    "DeviceSource",
    "PreferredAllocationPolicy",
    "Publish",
    "Resource",
    "check_resource_name",
    "first_fit",
]


# Slots: a shared resource may list 100,000 devices, and the list is held twice (the
# source's last list and the service's table).
@dataclasses.dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device as the kubelet sees it.

    Attributes:
        id: the device's ID in this resource (for GPUs, the UUID or an index).
        healthy: whether it may be handed to a container now.
        numa_nodes: NUMA nodes it is attached to (empty when unknown).
    """

    id: str
    healthy: bool = True
    numa_nodes: tuple[int, ...] = ()

    def to_proto(self) -> v1beta1.Device:
        """This device as the API's ``Device``."""
        return v1beta1.Device(
            ID=self.id,
            health=v1beta1.HEALTHY if self.healthy else v1beta1.UNHEALTHY,
            topology=(
                v1beta1.TopologyInfo(nodes=[v1beta1.NUMANode(ID=n) for n in self.numa_nodes])
                if self.numa_nodes else None
            ),
        )


#: What a source calls with each full device list.
Publish = Callable[[Sequence[DeviceInfo]], None]


class DeviceSource(Protocol):
    """Where a resource's devices come from.

    ``run`` publishes the full device list at once, then again whenever anything
    changes (health, devices appearing or going); it calls ``task_status.started()``
    after the first publish and runs until cancelled.  ``allocate`` builds what the
    container runtime needs for the given (known, healthy) device IDs.
    """

    async def run(
        self, publish: Publish, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish device lists until cancelled."""
        ...

    def allocate(self, device_ids: Sequence[str]) -> v1beta1.ContainerAllocateResponse:
        """The container's share of an AllocateResponse for these devices.

        Raise :class:`~trio_gpu_plugin.RpcError` to refuse the request.
        """
        ...


#: ``policy(available, must_include, size) -> preferred IDs``; see :func:`first_fit`.
PreferredAllocationPolicy = Callable[[Sequence[DeviceInfo], Sequence[str], int], list[str]]


def first_fit(available: Sequence[DeviceInfo], must_include: Sequence[str], size: int) -> list[str]:
    """The default preferred allocation: the must-include devices, then the others in order,
    preferring those on a NUMA node the must-include devices already use.

    Always a valid answer: no more than ``size`` IDs, all taken from ``available`` (the
    kubelet fills in or cuts whatever it gets anyway; see devicesToAllocate in the
    kubelet's pkg/kubelet/cm/devicemanager/manager.go).
    """
    known = {d.id: d for d in available}
    chosen = [i for i in dict.fromkeys(must_include) if i in known][:size]
    nodes = {n for i in chosen for n in known[i].numa_nodes}
    rest = [d for d in available if d.id not in chosen]
    rest.sort(key=lambda d: not (nodes and nodes.intersection(d.numa_nodes)))
    for device in rest:
        if len(chosen) >= size:
            break
        chosen.append(device.id)
    return chosen


# Extended resource names as the kubelet validates them (IsExtendedResourceName).
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN: Final = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_NAME_PART: Final = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def check_resource_name(name: str) -> None:
    """Raise ``ValueError`` saying why the kubelet would refuse ``name``, if it would."""
    problem = None
    if "/" not in name:
        problem = "it needs a domain prefix, as in nvidia.com/gpu"
    elif "kubernetes.io/" in name:
        problem = "names under kubernetes.io/ are reserved"
    elif name.startswith("requests."):
        problem = "it may not start with 'requests.'"
    elif name.count("/") > 1:
        problem = "it may contain only one '/'"
    else:
        prefix, part = name.split("/")
        if not _DNS_SUBDOMAIN.match("requests." + prefix) or len("requests." + prefix) > 253:
            problem = f"{prefix!r} is not a lowercase DNS subdomain"
        elif len(part) > 63 or not _NAME_PART.match(part):
            problem = f"{part!r} must be 1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends"
    if problem:
        raise ValueError(f"resource name {name!r} would be refused by the kubelet: {problem}")


@dataclasses.dataclass(frozen=True)
class Resource:
    """One extended resource the plugin advertises, e.g. ``nvidia.com/gpu``.

    Attributes:
        name: the resource name the kubelet sees.
        source: where its devices come from.
        socket_name: the file name of its socket in the kubelet's device-plugin directory.
        preferred_allocation: the GetPreferredAllocation policy; ``None`` tells the kubelet
            not to ask.
        pre_start: if given, the kubelet calls PreStartContainer before each container
            start, and this is awaited with the container's device IDs.
    """

    name: str
    source: DeviceSource
    socket_name: str
    preferred_allocation: PreferredAllocationPolicy | None = first_fit
    pre_start: Callable[[Sequence[str]], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        check_resource_name(self.name)
        if not self.socket_name or "/" in self.socket_name or self.socket_name.startswith("."):
            raise ValueError(f"socket name {self.socket_name!r} must be a plain file name")
        if self.socket_name == "kubelet.sock":
            raise ValueError("socket name 'kubelet.sock' is the kubelet's own")

    @property
    def options(self) -> v1beta1.DevicePluginOptions:
        """What GetDevicePluginOptions answers (and Register announces)."""
        return v1beta1.DevicePluginOptions(
            pre_start_required=self.pre_start is not None,
            get_preferred_allocation_available=self.preferred_allocation is not None,
        )


def check_allocatable(
    resource: str, devices: dict[str, DeviceInfo], requested: Iterable[str]
) -> list[str]:
    """The requested IDs, de-duplicated in order, if all are known and healthy.

    Raises :class:`RpcError`: ``INVALID_ARGUMENT`` naming an unknown ID,
    ``FAILED_PRECONDITION`` naming an unhealthy one.
    """
    ids = list(dict.fromkeys(requested))
    if not ids:
        raise RpcError(StatusCode.INVALID_ARGUMENT, f"allocation request for {resource} names no device")
    unknown = [i for i in ids if i not in devices]
    if unknown:
        # NVIDIA's wording (ValidateRequest), which names the first; we add the rest.
        more = f" (and {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
        raise RpcError(
            StatusCode.INVALID_ARGUMENT,
            f'invalid allocation request for "{resource}": invalid request: unknown device: '
            f"{unknown[0]}{more}",
        )
    unhealthy = [i for i in ids if not devices[i].healthy]
    if unhealthy:
        raise RpcError(
            StatusCode.FAILED_PRECONDITION,
            f"allocation request for {resource}: device(s) {', '.join(unhealthy)} unhealthy",
        )
    return ids
