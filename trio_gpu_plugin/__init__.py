"""trio-gpu-plugin: a Kubernetes device plugin for NVIDIA GPUs, on trio.

General layout (data flows down this list):

* ``trio_gpu_plugin.proto``: the sans-IO protobuf codec; ``proto.v1beta1`` holds the
  kubelet device-plugin API's messages and service descriptors.  Imports only the
  standard library.
* ``_grpc``: gRPC over HTTP/2 without I/O (purerpc's state machine, hardened so that bad
  input fails one call rather than the connection).
* ``_transport``: the trio side: :func:`serve_unix` serves services on a Unix socket
  inside the caller's nursery, :func:`open_unix_channel` calls them.
* ``_devices``: the device model (:class:`DeviceInfo`, :class:`Resource`, the
  :class:`DeviceSource` interface, the default preferred-allocation policy), sans-IO.
* ``_service``: the DevicePlugin RPCs of one resource over its device table.
* ``_watch``: inotify (ctypes) on kubelet.sock and our sockets, polling as a fallback.
* ``_runtime``: :class:`DevicePlugin`, registration epochs that end and start again
  whenever the kubelet restarts.
* ``_nvml``: the one narrow NVML interface (pynvml's names); ``_node_model``: the
  immutable device model; ``_discovery``: NVML -> model; ``_health``: the sans-IO health
  policy (NVIDIA's XID filter, event -> devices, recovery); ``_nvml_source``:
  :class:`NvmlNode` (event task, probes, NVML sessions) and its device sources.
* ``_nvml_sim``: a simulated NVML (presets, node files, fault injection);
  ``_control``: its fault-injection socket; ``_simulated``: a generic simulated device
  source; ``testing``: the test kit (fake kubelet, fixtures).
* ``_config``: NVIDIA's configuration (flags, environment, config file) as a
  :class:`Config` (:func:`load_config` builds one); ``_resources`` and ``_allocate``:
  planning (MIG strategies, sharing) and Allocate's answers; ``_configured``: the
  planned resources' device sources.
* ``_plugin``: :class:`GpuPlugin`, all of the above as NVIDIA's plugin runs it
  (configuration, planning, reload, metrics) in the caller's nursery.
* ``_cli`` and ``_demo``: the ``trio-gpu-plugin`` command, a thin driver of
  :class:`GpuPlugin` (flags, signals), and the demo.

Everything listed in ``__all__`` is public; modules with a leading underscore are not.
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._config import (
    Config as Config,
    ConfigError as ConfigError,
    Flags as Flags,
    Imex as Imex,
    PluginFlags as PluginFlags,
    ReplicatedDevices as ReplicatedDevices,
    ReplicatedResource as ReplicatedResource,
    ResourcePattern as ResourcePattern,
    Resources as Resources,
    Sharing as Sharing,
    SharingStrategy as SharingStrategy,
    load_config as load_config,
)
from ._devices import (
    DeviceInfo as DeviceInfo,
    DeviceSource as DeviceSource,
    PreferredAllocationPolicy as PreferredAllocationPolicy,
    Publish as Publish,
    Resource as Resource,
    first_fit as first_fit,
)
from ._grpc import RpcError as RpcError, Status as Status, StatusCode as StatusCode
from ._health import HealthChecks as HealthChecks
from ._node_model import GpuInfo as GpuInfo, MigInfo as MigInfo, NodeModel as NodeModel
from ._nvml import NVML as NVML, load_pynvml as load_pynvml
from ._nvml_source import (
    DeviceSelector as DeviceSelector,
    NvmlDeviceSource as NvmlDeviceSource,
    NvmlInitError as NvmlInitError,
    NvmlNode as NvmlNode,
    mig_slices as mig_slices,
    whole_gpus as whole_gpus,
    with_replicas as with_replicas,
)
from ._observe import Observer as Observer, Problem as Problem
from ._plan_model import PlannedDevice as PlannedDevice, PlannedResource as PlannedResource
from ._plugin import GpuPlugin as GpuPlugin, StartupError as StartupError
from ._runtime import DevicePlugin as DevicePlugin
from ._simulated import SimulatedDeviceSource as SimulatedDeviceSource
from ._transport import (
    DEFAULT_CALL_TIMEOUT as DEFAULT_CALL_TIMEOUT,
    Channel as Channel,
    ResponseStream as ResponseStream,
    Service as Service,
    SocketInUseError as SocketInUseError,
    open_unix_channel as open_unix_channel,
    serve_unix as serve_unix,
)
from ._version import __version__ as __version__

if TYPE_CHECKING:
    from ._control import send_control as send_control, serve_control as serve_control
    from ._nvml_sim import (
        SimGpuSpec as SimGpuSpec,
        SimNodeSpec as SimNodeSpec,
        SimulatedNVML as SimulatedNVML,
        load_node_file as load_node_file,
    )

# The simulator and its control socket are loaded on first use: a plugin serving real
# GPUs never needs them, and each module loaded is memory on every node.
_LAZY = {
    "SimGpuSpec": "_nvml_sim", "SimNodeSpec": "_nvml_sim", "SimulatedNVML": "_nvml_sim",
    "load_node_file": "_nvml_sim", "send_control": "_control", "serve_control": "_control",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "NVML",
    "Channel",
    "Config",
    "ConfigError",
    "DeviceInfo",
    "DevicePlugin",
    "DeviceSelector",
    "DeviceSource",
    "Flags",
    "GpuInfo",
    "GpuPlugin",
    "HealthChecks",
    "Imex",
    "MigInfo",
    "NodeModel",
    "NvmlDeviceSource",
    "NvmlInitError",
    "NvmlNode",
    "Observer",
    "PlannedDevice",
    "PlannedResource",
    "PluginFlags",
    "PreferredAllocationPolicy",
    "Problem",
    "Publish",
    "ReplicatedDevices",
    "ReplicatedResource",
    "Resource",
    "ResourcePattern",
    "Resources",
    "ResponseStream",
    "RpcError",
    "Service",
    "Sharing",
    "SharingStrategy",
    "SimGpuSpec",
    "SimNodeSpec",
    "SimulatedDeviceSource",
    "SimulatedNVML",
    "SocketInUseError",
    "StartupError",
    "Status",
    "StatusCode",
    "__version__",
    "first_fit",
    "load_config",
    "load_node_file",
    "load_pynvml",
    "mig_slices",
    "open_unix_channel",
    "send_control",
    "serve_control",
    "serve_unix",
    "whole_gpus",
    "with_replicas",
]
