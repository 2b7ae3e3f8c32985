"""Helpers shared by the codec tests: converting between our messages and protobuf's.

protobuf (``tests/peers.py`` compiles ``protos/api.proto``) is the independent peer the
codec tests compare against.  The converters here walk ``Cls.DESCRIPTOR.fields``, so they
work for every v1beta1 message and for test-only packages alike; :func:`compile_proto`
builds protobuf classes for such a test-only package from ``.proto`` text, with protoc.

The converters only read and write field values: they never encode or decode, so a bug in
either codec cannot hide behind them.
"""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from trio_gpu_plugin.proto import Label, Message


def to_peer(msg: Message, peer: Mapping[str, Any]) -> Any:
    """Build the protobuf message equal to ``msg``; ``peer`` maps short type names to
    protobuf classes (a pb2 module's ``__dict__`` will do)."""
    cls = type(msg)
    out = peer[cls.DESCRIPTOR.name]()
    for f in cls.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.label is Label.MAP:
            target = getattr(out, f.name)
            for key, item in value.items():
                target[key] = item
        elif f.label is Label.REPEATED:
            target = getattr(out, f.name)
            if f.is_message:
                for item in value:
                    target.add().CopyFrom(to_peer(item, peer))
            else:
                target.extend(value)
        elif f.is_message:
            if value is not None:
                sub = getattr(out, f.name)
                sub.SetInParent()  # presence, even for an empty message
                sub.CopyFrom(to_peer(value, peer))
        else:
            setattr(out, f.name, value)
    return out


def from_peer(peer_msg: Any, ours: Mapping[str, type[Message]]) -> Message:
    """Build our message equal to the protobuf message ``peer_msg`` (unknown fields, which
    protobuf keeps and we drop, are ignored); ``ours`` maps short names to our classes."""
    cls = ours[peer_msg.DESCRIPTOR.name]
    kwargs: dict[str, Any] = {}
    for f in cls.DESCRIPTOR.fields:
        value = getattr(peer_msg, f.name)
        if f.label is Label.MAP:
            kwargs[f.name] = dict(value.items())
        elif f.label is Label.REPEATED:
            if f.is_message:
                kwargs[f.name] = [from_peer(item, ours) for item in value]
            else:
                kwargs[f.name] = list(value)
        elif f.is_message:
            kwargs[f.name] = from_peer(value, ours) if peer_msg.HasField(f.name) else None
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


def by_name(classes: Iterable[type[Message]]) -> dict[str, type[Message]]:
    """Our classes keyed by their short proto name."""
    return {cls.DESCRIPTOR.name: cls for cls in classes}


def deterministic_key(key: object) -> Any:
    """The order in which protobuf (upb) writes map entries with ``deterministic=True``.

    String keys go by their UTF-8 bytes, except that a key which is a prefix of another
    comes *after* it (``"ab"`` before ``"a"`` before ``""``): upb compares the common
    prefix with memcmp and then the longer key first.  Other keys go by value.
    """
    if isinstance(key, str):
        return [*key.encode(), 256]
    return key


def sorted_maps(msg: Message) -> Message:
    """A copy of ``msg`` whose dicts (at every depth) are in :func:`deterministic_key`
    order, the order in which protobuf's ``SerializeToString(deterministic=True)`` writes
    map entries."""
    cls = type(msg)
    kwargs: dict[str, Any] = {}
    for f in cls.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.label is Label.MAP:
            value = dict(sorted(value.items(), key=lambda item: deterministic_key(item[0])))
        elif f.label is Label.REPEATED and f.is_message:
            value = [sorted_maps(item) for item in value]
        elif f.is_message and value is not None:
            value = sorted_maps(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def compile_proto(source: str, name: str) -> dict[str, Any]:
    """protobuf classes, by short name, for a test-only ``.proto`` given as text.

    protoc (from grpcio-tools) compiles it, as ``tests/peers.py`` does for api.proto, so
    the peer's schema, map entry types included, comes from protoc and not from us.
    """
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="tgp-proto-") as tmp:
        path = pathlib.Path(tmp)
        (path / name).write_text(source)
        descriptor_set = path / "out.desc"
        rc = protoc.main(["grpc_tools.protoc", f"-I{path}",
                          f"--descriptor_set_out={descriptor_set}", str(path / name)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {name} (exit {rc})")
        file_set = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    classes: dict[str, Any] = {}
    for file in file_set.file:
        pool.Add(file)
        for msg in file.message_type:
            descriptor = pool.FindMessageTypeByName(f"{file.package}.{msg.name}")
            classes[msg.name] = message_factory.GetMessageClass(descriptor)
    return classes
