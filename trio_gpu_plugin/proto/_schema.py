"""How message classes declare their protobuf schema.

A message is a plain dataclass (``slots=True, kw_only=True``: typed attributes, ``==``,
a readable ``repr``) whose fields are declared with :func:`field`, :func:`repeated` or
:func:`map_field`.  Those put the proto field number and type in the dataclass field's
metadata, so the schema sits next to the attribute it describes, the way h11's
``_abnf.py`` puts each grammar rule next to its RFC quote.  :func:`message` then
collects the schema into a :class:`Descriptor` and :func:`compile_package` generates
the encoder and decoders (see ``_codegen``).

Python representation of proto3 values:

* scalars: ``str``, ``bytes``, ``bool``, ``int``, with proto3 defaults (``""``, ``b""``,
  ``False``, ``0``), which are not emitted;
* a singular message field: the message, or ``None`` when absent (an empty message that
  is present is emitted as a zero-length field, as protobuf does);
* repeated fields: ``list``; maps: ``dict``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar, Final, TypeVar

from . import _wire

__all__ = [
    "Descriptor",
    "FieldDescriptor",
    "Label",
    "Message",
    "MethodDescriptor",
    "ServiceDescriptor",
    "field",
    "map_field",
    "message",
    "repeated",
]

# Scalar proto types the codec handles, with their wire type and proto3 default.
SCALARS: Final[dict[str, tuple[int, object]]] = {
    "string": (_wire.WIRETYPE_LENGTH_DELIMITED, ""),
    "bytes": (_wire.WIRETYPE_LENGTH_DELIMITED, b""),
    "bool": (_wire.WIRETYPE_VARINT, False),
    "int32": (_wire.WIRETYPE_VARINT, 0),
    "int64": (_wire.WIRETYPE_VARINT, 0),
    "uint32": (_wire.WIRETYPE_VARINT, 0),
    "uint64": (_wire.WIRETYPE_VARINT, 0),
}

_METADATA_KEY: Final = "trio_gpu_plugin.proto"


class Label(enum.Enum):
    """Cardinality of a field, as in ``descriptor.proto``."""

    SINGULAR = "singular"
    REPEATED = "repeated"
    MAP = "map"


@dataclasses.dataclass(frozen=True)
class FieldDescriptor:
    """One field of a message.

    ``type`` is a scalar type name from the proto language (``"string"``, ``"int64"``...)
    or the short name of a message type in the same package.  For a map, ``type`` is the
    value type and ``key_type`` the key type.
    """

    name: str
    number: int
    type: str
    label: Label
    key_type: str | None = None

    @property
    def is_message(self) -> bool:
        """Whether the field holds a message (not a scalar, string or bytes)."""
        return self.type not in SCALARS


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """A message type's schema; ``full_name`` is what purerpc's client reads."""

    full_name: str
    fields: tuple[FieldDescriptor, ...]

    @property
    def name(self) -> str:
        """The message's own name (``Device``), without its package."""
        return self.full_name.rpartition(".")[2]

    @property
    def package(self) -> str:
        """The protobuf package (``v1beta1``)."""
        return self.full_name.rpartition(".")[0]


@dataclasses.dataclass(frozen=True)
class MethodDescriptor:
    """One RPC of a service."""

    name: str
    request_type: type[Message]
    response_type: type[Message]
    server_streaming: bool = False


@dataclasses.dataclass(frozen=True)
class ServiceDescriptor:
    """A gRPC service: its full name (``package.Service``) and methods."""

    full_name: str
    methods: tuple[MethodDescriptor, ...]

    def method(self, name: str) -> MethodDescriptor:
        """Return the method called ``name``; ``KeyError`` names the service if absent."""
        for method in self.methods:
            if method.name == name:
                return method
        raise KeyError(f"service {self.full_name} has no method {name!r}")

    def path(self, name: str) -> str:
        """The HTTP/2 ``:path`` of a method, e.g. ``/v1beta1.DevicePlugin/Allocate``."""
        return f"/{self.full_name}/{self.method(name).name}"


def _check_type_name(type_name: str) -> None:
    if not type_name or not type_name.replace("_", "a").isalnum():
        raise ValueError(f"invalid proto type name {type_name!r}")


def field(number: int, type_name: str) -> Any:
    """A singular field: ``ID: str = field(1, "string")``.

    For a message type, the attribute is ``Optional`` and defaults to ``None``.
    """
    _check_type_name(type_name)
    spec = (number, type_name, Label.SINGULAR, None)
    default = SCALARS[type_name][1] if type_name in SCALARS else None
    return dataclasses.field(default=default, metadata={_METADATA_KEY: spec})


def repeated(number: int, type_name: str) -> Any:
    """A repeated field, a ``list``: ``devices: list[Device] = repeated(1, "Device")``."""
    _check_type_name(type_name)
    spec = (number, type_name, Label.REPEATED, None)
    return dataclasses.field(default_factory=list, metadata={_METADATA_KEY: spec})


def map_field(number: int, key_type: str, value_type: str) -> Any:
    """A map field, a ``dict``: ``envs: dict[str, str] = map_field(1, "string", "string")``.

    Keys and values must be scalars (v1beta1 has only ``map<string, string>``).
    """
    for type_name in (key_type, value_type):
        if type_name not in SCALARS:
            raise ValueError(f"map fields take scalar keys and values, not {type_name!r}")
    spec = (number, value_type, Label.MAP, key_type)
    return dataclasses.field(default_factory=dict, metadata={_METADATA_KEY: spec})


_M = TypeVar("_M", bound="Message")


class Message:
    """Base class of every message class; the methods purerpc and grpc stubs call.

    Subclasses are made with :func:`message`; their codec is attached by
    :func:`compile_package` (``_codegen``).
    """

    __slots__ = ()

    DESCRIPTOR: ClassVar[Descriptor]
    # Attached by the code generator.
    _encode: ClassVar[Any]
    _decode_new: ClassVar[Any]
    _decode_merge: ClassVar[Any]

    def SerializeToString(self) -> bytes:  # noqa: N802 (protobuf's name, which purerpc calls)
        """Encode to protobuf wire format; raises :class:`EncodeError` for bad values."""
        return type(self)._encode(self)  # type: ignore[no-any-return]

    @classmethod
    def FromString(cls: type[_M], data: bytes) -> _M:  # noqa: N802
        """Decode a new message; raises :class:`DecodeError` for bad bytes."""
        return cls._decode_new(_as_bytes(data))  # type: ignore[no-any-return]

    def ParseFromString(self, data: bytes) -> int:  # noqa: N802
        """Replace this message's contents with the decoded ``data``; return its length.

        On a :class:`DecodeError` the message is left unchanged.
        """
        data = _as_bytes(data)
        decoded = type(self)._decode_new(data)
        names: tuple[str, ...] = type(self).__slots__
        for name in names:
            setattr(self, name, getattr(decoded, name))
        return len(data)

    def MergeFromString(self, data: bytes) -> int:  # noqa: N802
        """Merge decoded ``data`` into this message, as protobuf does; return its length.

        Scalars are overwritten, repeated fields appended to, maps updated and message
        fields merged recursively.
        """
        data = _as_bytes(data)
        type(self)._decode_merge(data, self)
        return len(data)


def _as_bytes(data: object) -> bytes:
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"expected a bytes-like object, got {type(data).__name__}")


def message(full_name: str) -> Any:
    """Class decorator: make ``cls`` a dataclass message named ``full_name``.

    Use it above ``@dataclasses.dataclass(slots=True, kw_only=True)``, which gives the
    typed ``__init__``, ``==`` and ``repr`` (and lets type checkers see them).
    """

    def decorate(cls: type[_M]) -> type[_M]:
        if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__:
            raise TypeError(f"{cls.__name__}: apply @dataclass(slots=True, kw_only=True) first")
        fields = []
        for f in dataclasses.fields(cls):
            if _METADATA_KEY not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name}: declare it with field(), repeated() "
                                "or map_field()")
            number, type_name, label, key_type = f.metadata[_METADATA_KEY]
            if not 1 <= number <= _wire.MAX_FIELD_NUMBER:
                raise ValueError(f"{cls.__name__}.{f.name}: field number {number} out of range")
            fields.append(FieldDescriptor(f.name, number, type_name, label, key_type))
        numbers = [f.number for f in fields]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"{cls.__name__}: duplicate field numbers {numbers}")
        cls.DESCRIPTOR = Descriptor(full_name, tuple(sorted(fields, key=lambda f: f.number)))
        return cls

    return decorate
