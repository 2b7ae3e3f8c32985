"""The kubelet device-plugin API v1beta1: messages, services and constants.

Each class mirrors one message of ``protos/api.proto`` (field names verbatim, mixed case
included, as protobuf's generated Python uses them), with the methods purerpc and grpc
stubs call: ``SerializeToString``, ``ParseFromString``, ``FromString`` and
``DESCRIPTOR.full_name``.  ``tests/test_schema.py`` compiles ``protos/api.proto`` with
protoc and checks this module against it, field by field, so the two cannot drift.

Example::

    >>> from trio_gpu_plugin.proto.v1beta1 import Device, TopologyInfo, NUMANode
    >>> d = Device(ID="GPU-0", health=HEALTHY, topology=TopologyInfo(nodes=[NUMANode(ID=0)]))
    >>> Device.FromString(d.SerializeToString()) == d
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ._codegen import compile_package
from ._schema import (
    Message,
    MethodDescriptor,
    ServiceDescriptor,
    field,
    map_field,
    message,
    repeated,
)

__all__ = [
    "AllocateRequest",
    "AllocateResponse",
    "CDIDevice",
    "ContainerAllocateRequest",
    "ContainerAllocateResponse",
    "ContainerPreferredAllocationRequest",
    "ContainerPreferredAllocationResponse",
    "DEVICE_PLUGIN",
    "DEVICE_PLUGIN_PATH",
    "Device",
    "DevicePluginOptions",
    "DeviceSpec",
    "Empty",
    "HEALTHY",
    "KUBELET_SOCKET",
    "ListAndWatchResponse",
    "Mount",
    "NUMANode",
    "PreStartContainerRequest",
    "PreStartContainerResponse",
    "PreferredAllocationRequest",
    "PreferredAllocationResponse",
    "REGISTRATION",
    "RegisterRequest",
    "TopologyInfo",
    "UNHEALTHY",
    "VERSION",
]

# Constants of k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/constants.go.
HEALTHY: Final = "Healthy"
UNHEALTHY: Final = "Unhealthy"
VERSION: Final = "v1beta1"
# Hard-coded in the kubelet: it does not follow --root-dir.
DEVICE_PLUGIN_PATH: Final = "/var/lib/kubelet/device-plugins/"
KUBELET_SOCKET: Final = DEVICE_PLUGIN_PATH + "kubelet.sock"


@message("v1beta1.DevicePluginOptions")
@dataclass(slots=True, kw_only=True)
class DevicePluginOptions(Message):
    """What the plugin supports, answered to ``GetDevicePluginOptions``."""

    pre_start_required: bool = field(1, "bool")
    get_preferred_allocation_available: bool = field(2, "bool")


@message("v1beta1.RegisterRequest")
@dataclass(slots=True, kw_only=True)
class RegisterRequest(Message):
    """Sent by the plugin to the kubelet's ``Registration.Register``."""

    version: str = field(1, "string")
    endpoint: str = field(2, "string")
    resource_name: str = field(3, "string")
    options: DevicePluginOptions | None = field(4, "DevicePluginOptions")


@message("v1beta1.Empty")
@dataclass(slots=True, kw_only=True)
class Empty(Message):
    """No fields."""


@message("v1beta1.ListAndWatchResponse")
@dataclass(slots=True, kw_only=True)
class ListAndWatchResponse(Message):
    """The full device list; each message replaces the kubelet's view."""

    devices: list[Device] = repeated(1, "Device")


@message("v1beta1.TopologyInfo")
@dataclass(slots=True, kw_only=True)
class TopologyInfo(Message):
    """The NUMA nodes a device is attached to."""

    nodes: list[NUMANode] = repeated(1, "NUMANode")


@message("v1beta1.NUMANode")
@dataclass(slots=True, kw_only=True)
class NUMANode(Message):
    """One NUMA node, by ID."""

    ID: int = field(1, "int64")


@message("v1beta1.Device")
@dataclass(slots=True, kw_only=True)
class Device(Message):
    """One advertised device: its ID, health (``HEALTHY`` or ``UNHEALTHY``) and topology."""

    ID: str = field(1, "string")
    health: str = field(2, "string")
    topology: TopologyInfo | None = field(3, "TopologyInfo")


@message("v1beta1.PreStartContainerRequest")
@dataclass(slots=True, kw_only=True)
class PreStartContainerRequest(Message):
    """The devices allocated to a container that is about to start."""

    devices_ids: list[str] = repeated(1, "string")


@message("v1beta1.PreStartContainerResponse")
@dataclass(slots=True, kw_only=True)
class PreStartContainerResponse(Message):
    """No fields."""


@message("v1beta1.PreferredAllocationRequest")
@dataclass(slots=True, kw_only=True)
class PreferredAllocationRequest(Message):
    """The kubelet asks which devices the plugin would rather give."""

    container_requests: list[ContainerPreferredAllocationRequest] = repeated(
        1, "ContainerPreferredAllocationRequest"
    )


@message("v1beta1.ContainerPreferredAllocationRequest")
@dataclass(slots=True, kw_only=True)
class ContainerPreferredAllocationRequest(Message):
    """Choose ``allocation_size`` devices from ``available_deviceIDs``, keeping the must-includes."""

    available_deviceIDs: list[str] = repeated(1, "string")  # noqa: N815 (the proto's name)
    must_include_deviceIDs: list[str] = repeated(2, "string")  # noqa: N815
    allocation_size: int = field(3, "int32")


@message("v1beta1.PreferredAllocationResponse")
@dataclass(slots=True, kw_only=True)
class PreferredAllocationResponse(Message):
    """One answer per container request."""

    container_responses: list[ContainerPreferredAllocationResponse] = repeated(
        1, "ContainerPreferredAllocationResponse"
    )


@message("v1beta1.ContainerPreferredAllocationResponse")
@dataclass(slots=True, kw_only=True)
class ContainerPreferredAllocationResponse(Message):
    """The preferred device IDs for one container."""

    deviceIDs: list[str] = repeated(1, "string")  # noqa: N815


@message("v1beta1.AllocateRequest")
@dataclass(slots=True, kw_only=True)
class AllocateRequest(Message):
    """Devices chosen for each container (the kubelet sends exactly one)."""

    container_requests: list[ContainerAllocateRequest] = repeated(1, "ContainerAllocateRequest")


@message("v1beta1.ContainerAllocateRequest")
@dataclass(slots=True, kw_only=True)
class ContainerAllocateRequest(Message):
    """The device IDs given to one container."""

    devices_ids: list[str] = repeated(1, "string")


@message("v1beta1.CDIDevice")
@dataclass(slots=True, kw_only=True)
class CDIDevice(Message):
    """A fully-qualified CDI device name, e.g. ``nvidia.com/gpu=GPU-...``."""

    name: str = field(1, "string")


@message("v1beta1.AllocateResponse")
@dataclass(slots=True, kw_only=True)
class AllocateResponse(Message):
    """What the runtime needs for each container."""

    container_responses: list[ContainerAllocateResponse] = repeated(1, "ContainerAllocateResponse")


@message("v1beta1.ContainerAllocateResponse")
@dataclass(slots=True, kw_only=True)
class ContainerAllocateResponse(Message):
    """Environment, mounts, device nodes, annotations and CDI devices for one container."""

    envs: dict[str, str] = map_field(1, "string", "string")
    mounts: list[Mount] = repeated(2, "Mount")
    devices: list[DeviceSpec] = repeated(3, "DeviceSpec")
    annotations: dict[str, str] = map_field(4, "string", "string")
    cdi_devices: list[CDIDevice] = repeated(5, "CDIDevice")


@message("v1beta1.Mount")
@dataclass(slots=True, kw_only=True)
class Mount(Message):
    """A host path to mount into the container."""

    container_path: str = field(1, "string")
    host_path: str = field(2, "string")
    read_only: bool = field(3, "bool")


@message("v1beta1.DeviceSpec")
@dataclass(slots=True, kw_only=True)
class DeviceSpec(Message):
    """A device node to expose; ``permissions`` is any of ``r``, ``w``, ``m``."""

    container_path: str = field(1, "string")
    host_path: str = field(2, "string")
    permissions: str = field(3, "string")


MESSAGES: Final[tuple[type[Message], ...]] = (
    DevicePluginOptions,
    RegisterRequest,
    Empty,
    ListAndWatchResponse,
    TopologyInfo,
    NUMANode,
    Device,
    PreStartContainerRequest,
    PreStartContainerResponse,
    PreferredAllocationRequest,
    ContainerPreferredAllocationRequest,
    PreferredAllocationResponse,
    ContainerPreferredAllocationResponse,
    AllocateRequest,
    ContainerAllocateRequest,
    CDIDevice,
    AllocateResponse,
    ContainerAllocateResponse,
    Mount,
    DeviceSpec,
)
compile_package(MESSAGES)

#: Served by the kubelet on ``kubelet.sock``.
REGISTRATION: Final = ServiceDescriptor(
    "v1beta1.Registration",
    (MethodDescriptor("Register", RegisterRequest, Empty),),
)

#: Served by the plugin on its own socket.
DEVICE_PLUGIN: Final = ServiceDescriptor(
    "v1beta1.DevicePlugin",
    (
        MethodDescriptor("GetDevicePluginOptions", Empty, DevicePluginOptions),
        MethodDescriptor("ListAndWatch", Empty, ListAndWatchResponse, server_streaming=True),
        MethodDescriptor(
            "GetPreferredAllocation", PreferredAllocationRequest, PreferredAllocationResponse
        ),
        MethodDescriptor("Allocate", AllocateRequest, AllocateResponse),
        MethodDescriptor("PreStartContainer", PreStartContainerRequest, PreStartContainerResponse),
    ),
)
