"""A pure-Python, sans-IO protobuf codec for the kubelet device-plugin API.

``trio_gpu_plugin.proto.v1beta1`` holds the messages and services; this package holds
the machinery (schema declarations in ``_schema``, wire helpers in ``_wire``, the code
generator in ``_codegen``).  Nothing here imports trio, sockets or a clock, and nothing
needs protobuf or grpcio at run time.
"""

from ._schema import (
    Descriptor as Descriptor,
    FieldDescriptor as FieldDescriptor,
    Label as Label,
    Message as Message,
    MethodDescriptor as MethodDescriptor,
    ServiceDescriptor as ServiceDescriptor,
    field as field,
    map_field as map_field,
    message as message,
    repeated as repeated,
)
from ._codegen import compile_package as compile_package, generated_source as generated_source
from ._wire import DecodeError as DecodeError, EncodeError as EncodeError

__all__ = [
    "DecodeError",
    "Descriptor",
    "EncodeError",
    "FieldDescriptor",
    "Label",
    "Message",
    "MethodDescriptor",
    "ServiceDescriptor",
    "compile_package",
    "field",
    "generated_source",
    "map_field",
    "message",
    "repeated",
]
