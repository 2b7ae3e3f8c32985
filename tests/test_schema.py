"""The codec's schema (trio_gpu_plugin.proto.v1beta1) matches protos/api.proto exactly.

protoc parses the .proto (an independent parser), and we compare every message, field
name, number, type and label, and every service and method, in both directions.
"""

from __future__ import annotations

import types

from google.protobuf import descriptor_pb2

from tests import peers
from trio_gpu_plugin.proto import Label, v1beta1

FDP = descriptor_pb2.FieldDescriptorProto
_SCALAR_NAMES = {
    FDP.TYPE_STRING: "string",
    FDP.TYPE_BYTES: "bytes",
    FDP.TYPE_BOOL: "bool",
    FDP.TYPE_INT32: "int32",
    FDP.TYPE_INT64: "int64",
    FDP.TYPE_UINT32: "uint32",
    FDP.TYPE_UINT64: "uint64",
}


def _proto_file() -> descriptor_pb2.FileDescriptorProto:
    file_set = descriptor_pb2.FileDescriptorSet.FromString(peers.descriptor_set())
    (file,) = file_set.file
    return file


def _type_name(field: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
    if field.type == FDP.TYPE_MESSAGE:
        prefix = f".{package}."
        assert field.type_name.startswith(prefix), field.type_name
        return field.type_name[len(prefix):]
    if field.type not in _SCALAR_NAMES:
        raise AssertionError(f"{field.name}: proto type {field.type} is not supported by the codec")
    return _SCALAR_NAMES[field.type]


def _proto_schema() -> dict[str, set[tuple[str, int, str, str, str | None]]]:
    file = _proto_file()
    schema: dict[str, set[tuple[str, int, str, str, str | None]]] = {}
    for message in file.message_type:
        maps = {nested.name: nested for nested in message.nested_type if nested.options.map_entry}
        fields = set()
        for f in message.field:
            entry_name = f.type_name.rsplit(".", 1)[-1]
            if f.label == FDP.LABEL_REPEATED and f.type == FDP.TYPE_MESSAGE and entry_name in maps:
                key, value = maps[entry_name].field
                fields.add((f.name, f.number, _type_name(value, file.package), "map",
                            _type_name(key, file.package)))
            else:
                label = "repeated" if f.label == FDP.LABEL_REPEATED else "singular"
                fields.add((f.name, f.number, _type_name(f, file.package), label, None))
        schema[f"{file.package}.{message.name}"] = fields
    return schema


def _codec_schema() -> dict[str, set[tuple[str, int, str, str, str | None]]]:
    return {
        cls.DESCRIPTOR.full_name: {
            (f.name, f.number, f.type, f.label.value, f.key_type) for f in cls.DESCRIPTOR.fields
        }
        for cls in v1beta1.MESSAGES
    }


def test_package_is_v1beta1() -> None:
    assert _proto_file().package == "v1beta1"


def test_same_messages() -> None:
    assert sorted(_codec_schema()) == sorted(_proto_schema())


def test_same_fields_in_every_message() -> None:
    proto = _proto_schema()
    for name, fields in _codec_schema().items():
        assert fields == proto[name], name


def test_every_message_is_exported_and_named_like_its_class() -> None:
    for cls in v1beta1.MESSAGES:
        assert cls.DESCRIPTOR.full_name == f"v1beta1.{cls.__name__}"
        assert getattr(v1beta1, cls.__name__) is cls
        assert cls.__name__ in v1beta1.__all__


def test_same_services_and_methods() -> None:
    file = _proto_file()
    proto = {
        f"{file.package}.{service.name}": {
            (m.name, m.input_type.rsplit(".", 1)[1], m.output_type.rsplit(".", 1)[1],
             m.server_streaming, m.client_streaming)
            for m in service.method
        }
        for service in file.service
    }
    ours = {
        service.full_name: {
            (m.name, m.request_type.__name__, m.response_type.__name__, m.server_streaming, False)
            for m in service.methods
        }
        for service in (v1beta1.REGISTRATION, v1beta1.DEVICE_PLUGIN)
    }
    assert ours == proto


def test_schema_comparison_notices_drift() -> None:
    # Guard against a comparison that cannot fail: renumber one field and the
    # schemas must differ.
    codec = _codec_schema()
    device = codec["v1beta1.Device"]
    renumbered = {(n, 9 if n == "health" else num, t, l, k) for n, num, t, l, k in device}
    assert renumbered != _proto_schema()["v1beta1.Device"]


def test_generated_pb2_agrees_on_field_names(pb2: types.ModuleType) -> None:
    # The protobuf classes used as peers elsewhere come from the same file.
    for cls in v1beta1.MESSAGES:
        peer = getattr(pb2, cls.__name__)
        assert {f.name for f in peer.DESCRIPTOR.fields} == {f.name for f in cls.DESCRIPTOR.fields}
        assert peer.DESCRIPTOR.full_name == cls.DESCRIPTOR.full_name
    assert Label.MAP.value == "map"
