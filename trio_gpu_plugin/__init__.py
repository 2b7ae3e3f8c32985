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
* ``_simulated``: a simulated GPU node; ``testing``: the test kit (fake kubelet, fixtures).
* ``_cli`` and ``_demo``: the ``trio-gpu-plugin`` command, a thin layer over the above.

Everything listed in ``__all__`` is public; modules with a leading underscore are not.
"""

from ._devices import (
    DeviceInfo as DeviceInfo,
    DeviceSource as DeviceSource,
    PreferredAllocationPolicy as PreferredAllocationPolicy,
    Publish as Publish,
    Resource as Resource,
    first_fit as first_fit,
)
from ._grpc import RpcError as RpcError, Status as Status, StatusCode as StatusCode
from ._runtime import DevicePlugin as DevicePlugin
from ._simulated import SimulatedDeviceSource as SimulatedDeviceSource
from ._transport import (
    DEFAULT_CALL_TIMEOUT as DEFAULT_CALL_TIMEOUT,
    Channel as Channel,
    ResponseStream as ResponseStream,
    Service as Service,
    open_unix_channel as open_unix_channel,
    serve_unix as serve_unix,
)
from ._version import __version__ as __version__

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "Channel",
    "DeviceInfo",
    "DevicePlugin",
    "DeviceSource",
    "PreferredAllocationPolicy",
    "Publish",
    "Resource",
    "SimulatedDeviceSource",
    "first_fit",
    "ResponseStream",
    "RpcError",
    "Service",
    "Status",
    "StatusCode",
    "__version__",
    "open_unix_channel",
    "serve_unix",
]
