"""Differential tests: our codec against protobuf, on random messages of every v1beta1 type.

Strategies are built generically from ``Cls.DESCRIPTOR.fields``, so every message in
``v1beta1.MESSAGES`` is covered and a new field is covered as soon as it is declared:
scalars over their full ranges (negative int32/int64 included, text with astral
characters, empty strings and strings long enough to need two-byte lengths), optional
sub-messages present (possibly empty) or ``None``, lists with default elements, dicts for
maps.  ``tests/codec_support.py`` converts between our messages and protobuf's, field by
field, without encoding anything.

For each message type:

* our bytes decode in protobuf to the same message, and protobuf's bytes decode in ours;
* our bytes are protobuf's bytes, exactly.  Map entries are the one place where the
  order is free, so maps are compared in a canonical order: our dicts rebuilt in sorted
  key order against protobuf's ``SerializeToString(deterministic=True)``, which sorts map
  entries by key; every other byte is compared as is;
* decoding our own bytes gives back the message;
* two encodings concatenated decode as protobuf merges them.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import codec_support
from trio_gpu_plugin.proto import Label, Message, v1beta1

OURS = codec_support.by_name(v1beta1.MESSAGES)
MESSAGE_IDS = [cls.__name__ for cls in v1beta1.MESSAGES]

# Each test runs once per message type (20 of them); keep the whole file well under a
# minute on a slow machine.
EXAMPLES = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}

_SPECIAL_TEXT = ["", "Healthy", "é", "😀", "\U0010ffff", "\x00", "\x7f\x80", "GPU-0\n"]


def _ints(type_name: str) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[type_name]
    edges = sorted({low, high, 0, 1, -1 if low < 0 else 0, 127, 128, 16383, 16384})
    return st.one_of(st.sampled_from([e for e in edges if low <= e <= high]),
                     st.integers(low, high),
                     st.integers(-200 if low < 0 else 0, 200))


def _text() -> st.SearchStrategy[str]:
    # codec="utf-8" leaves out lone surrogates, which no string field can hold.
    chars = st.characters(codec="utf-8")
    return st.one_of(
        st.sampled_from(_SPECIAL_TEXT),
        st.text(chars, max_size=12),
        st.text(st.characters(codec="utf-8", min_codepoint=0x10000), max_size=4),
        # Long enough for a two-byte length prefix.
        st.builds(lambda c, n: c * n, chars, st.integers(100, 200)),
    )


def scalar_strategy(type_name: str) -> st.SearchStrategy[Any]:
    if type_name == "string":
        return _text()
    if type_name == "bytes":
        return st.binary(max_size=20)
    if type_name == "bool":
        return st.booleans()
    return _ints(type_name)


@functools.cache
def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    """Messages of ``cls`` with every field drawn from its declaration."""
    kwargs: dict[str, st.SearchStrategy[Any]] = {}
    for f in cls.DESCRIPTOR.fields:
        if f.label is Label.MAP:
            assert f.key_type is not None
            kwargs[f.name] = st.dictionaries(
                scalar_strategy(f.key_type), scalar_strategy(f.type), max_size=4)
        elif f.is_message:
            sub = message_strategy(OURS[f.type])
            if f.label is Label.REPEATED:
                kwargs[f.name] = st.lists(sub, max_size=3)
            else:
                kwargs[f.name] = st.none() | sub
        elif f.label is Label.REPEATED:
            kwargs[f.name] = st.lists(scalar_strategy(f.type), max_size=4)
        else:
            kwargs[f.name] = scalar_strategy(f.type)
    return st.builds(cls, **kwargs)


def peer_class(pb2: types.ModuleType, cls: type[Message]) -> Any:
    return getattr(pb2, cls.DESCRIPTOR.name)


def to_pb2(pb2: types.ModuleType, msg: Message) -> Any:
    return codec_support.to_peer(msg, vars(pb2))


def from_pb2(peer_msg: Any) -> Message:
    return codec_support.from_peer(peer_msg, OURS)


parametrize_messages = pytest.mark.parametrize("cls", v1beta1.MESSAGES, ids=MESSAGE_IDS)


@parametrize_messages
@EXAMPLES
@given(data=st.data())
def test_protobuf_decodes_our_encoding_to_the_same_message(
    cls: type[Message], data: st.DataObject, pb2: types.ModuleType
) -> None:
    msg = data.draw(message_strategy(cls))
    theirs = peer_class(pb2, cls).FromString(msg.SerializeToString())
    assert from_pb2(theirs) == msg
    assert theirs == to_pb2(pb2, msg)


@parametrize_messages
@EXAMPLES
@given(data=st.data())
def test_we_decode_protobufs_encoding_to_the_same_message(
    cls: type[Message], data: st.DataObject, pb2: types.ModuleType
) -> None:
    msg = data.draw(message_strategy(cls))
    encoded = to_pb2(pb2, msg).SerializeToString()
    assert cls.FromString(encoded) == msg


@parametrize_messages
@EXAMPLES
@given(data=st.data())
def test_our_bytes_are_protobufs_bytes(
    cls: type[Message], data: st.DataObject, pb2: types.ModuleType
) -> None:
    msg = codec_support.sorted_maps(data.draw(message_strategy(cls)))
    ours = msg.SerializeToString()
    theirs = to_pb2(pb2, msg).SerializeToString(deterministic=True)
    assert ours.hex(" ") == theirs.hex(" ")


@parametrize_messages
@EXAMPLES
@given(data=st.data())
def test_our_encoding_decodes_back_to_the_message(
    cls: type[Message], data: st.DataObject
) -> None:
    msg = data.draw(message_strategy(cls))
    encoded = msg.SerializeToString()
    decoded = cls.FromString(encoded)
    assert decoded == msg
    assert decoded.SerializeToString() == encoded


@parametrize_messages
@EXAMPLES
@given(data=st.data())
def test_concatenated_encodings_merge_like_protobuf(
    cls: type[Message], data: st.DataObject, pb2: types.ModuleType
) -> None:
    first = data.draw(message_strategy(cls))
    second = data.draw(message_strategy(cls))
    joined = first.SerializeToString() + second.SerializeToString()
    expected = from_pb2(peer_class(pb2, cls).FromString(joined))
    assert cls.FromString(joined) == expected
    merged = cls.FromString(first.SerializeToString())
    merged.MergeFromString(second.SerializeToString())
    assert merged == expected


# --- corner cases, deterministic: every field at its extremes ---------------------------

_CORNER_TEXT = {"low": "", "high": "😀\U0010ffffé" * 30, "mixed": "é\x00"}
_CORNER_BYTES = {"low": b"", "high": b"\xff" * 200, "mixed": b"\x00"}


def _corner_scalar(type_name: str, variant: str) -> Any:
    if type_name == "string":
        return _CORNER_TEXT[variant]
    if type_name == "bytes":
        return _CORNER_BYTES[variant]
    if type_name == "bool":
        return variant != "low"
    low, high = _INT_RANGES[type_name]
    return {"low": low, "high": high, "mixed": -1 if low < 0 else 1}[variant]


def corner_message(cls: type[Message], variant: str) -> Message:
    """A message of ``cls`` with every field set to an extreme: ``low`` (minimum ints,
    empty strings, present-but-empty sub-messages, lists of one default element, a map
    entry with empty key and value), ``high`` (maximum ints, long astral text, several
    elements and entries) or ``mixed``."""
    kwargs: dict[str, Any] = {}
    for f in cls.DESCRIPTOR.fields:
        if f.label is Label.MAP:
            assert f.key_type is not None
            keys = {v: _corner_scalar(f.key_type, v) for v in ("low", "high", "mixed")}
            values = {v: _corner_scalar(f.type, v) for v in ("low", "high", "mixed")}
            kwargs[f.name] = {
                "low": {keys["low"]: values["low"]},
                "high": {keys["high"]: values["high"], keys["mixed"]: values["low"],
                         keys["low"]: values["mixed"]},
                "mixed": {},
            }[variant]
        elif f.is_message:
            sub = OURS[f.type]
            if f.label is Label.REPEATED:
                kwargs[f.name] = {
                    "low": [sub()],
                    "high": [corner_message(sub, "high"), sub(), corner_message(sub, "low")],
                    "mixed": [corner_message(sub, "mixed")] * 2,
                }[variant]
            else:
                kwargs[f.name] = {"low": sub(), "high": corner_message(sub, "high"),
                                  "mixed": None}[variant]
        elif f.label is Label.REPEATED:
            kwargs[f.name] = {
                "low": [_corner_scalar(f.type, "low")],
                "high": [_corner_scalar(f.type, v) for v in ("high", "low", "mixed")],
                "mixed": [],
            }[variant]
        else:
            kwargs[f.name] = _corner_scalar(f.type, variant)
    return cls(**kwargs)


CORNERS = [
    pytest.param(corner_message(cls, variant), id=f"{cls.__name__}-{variant}")
    for cls in v1beta1.MESSAGES
    for variant in ("low", "high", "mixed")
]


@pytest.mark.parametrize("msg", CORNERS)
def test_corner_messages_agree_with_protobuf_both_ways(
    msg: Message, pb2: types.ModuleType
) -> None:
    cls = type(msg)
    encoded = msg.SerializeToString()
    assert from_pb2(peer_class(pb2, cls).FromString(encoded)) == msg
    assert cls.FromString(to_pb2(pb2, msg).SerializeToString()) == msg
    assert cls.FromString(encoded) == msg
    canonical = codec_support.sorted_maps(msg)
    assert canonical.SerializeToString().hex(" ") == (
        to_pb2(pb2, canonical).SerializeToString(deterministic=True).hex(" "))


@settings(max_examples=60, deadline=None, database=None)
@given(msg=message_strategy(v1beta1.ContainerAllocateResponse))
def test_map_order_does_not_change_what_protobuf_decodes(
    msg: v1beta1.ContainerAllocateResponse, pb2: types.ModuleType
) -> None:
    # Our encoder writes map entries in dict order; any order must mean the same map.
    reversed_maps = v1beta1.ContainerAllocateResponse(
        envs=dict(reversed(list(msg.envs.items()))),
        mounts=msg.mounts,
        devices=msg.devices,
        annotations=dict(reversed(list(msg.annotations.items()))),
        cdi_devices=msg.cdi_devices,
    )
    theirs = pb2.ContainerAllocateResponse.FromString(reversed_maps.SerializeToString())
    assert from_pb2(theirs) == msg


def test_large_nested_message_has_protobufs_bytes(pb2: types.ModuleType) -> None:
    # Sub-messages over 16 KiB (three-byte length prefixes) at two nesting levels, many
    # map entries and list elements.
    response = v1beta1.AllocateResponse(container_responses=[
        v1beta1.ContainerAllocateResponse(
            envs={f"VAR_{i:05d}": "é" * (i % 40) for i in range(2000)},
            mounts=[v1beta1.Mount(container_path="/" + "p" * 20_000, read_only=True)],
            devices=[v1beta1.DeviceSpec(host_path=f"/dev/nvidia{i}") for i in range(300)],
            cdi_devices=[v1beta1.CDIDevice(name="😀" * 5000)],
        ),
        v1beta1.ContainerAllocateResponse(),
    ])
    ours = codec_support.sorted_maps(response).SerializeToString()
    assert len(ours) > 3 * 16384
    assert ours == to_pb2(pb2, response).SerializeToString(deterministic=True)
    assert v1beta1.AllocateResponse.FromString(ours) == response
