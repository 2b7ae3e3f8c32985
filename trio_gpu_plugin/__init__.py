"""trio-gpu-plugin: a Kubernetes device plugin for NVIDIA GPUs, on trio.

General layout (data flows down this list):

* ``trio_gpu_plugin.proto``: the sans-IO protobuf codec; ``proto.v1beta1`` holds the
  kubelet device-plugin API's messages and service descriptors.  Imports only the
  standard library.
* ``_grpc``: gRPC over HTTP/2 without I/O (purerpc's state machine, hardened so that bad
  input fails one call rather than the connection).
* ``_transport``: the trio side: :func:`serve_unix` serves services on a Unix socket
  inside the caller's nursery, :func:`open_unix_channel` calls them.
* ``_cli``: the ``trio-gpu-plugin`` command, a thin layer over the above.

Everything listed in ``__all__`` is public; modules with a leading underscore are not.
"""

from ._grpc import RpcError as RpcError, Status as Status, StatusCode as StatusCode
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
    "ResponseStream",
    "RpcError",
    "Service",
    "Status",
    "StatusCode",
    "__version__",
    "open_unix_channel",
    "serve_unix",
]
