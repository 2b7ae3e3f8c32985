"""Fuzzing every message decoder with random and mutated bytes, against protobuf.

For each message type of ``v1beta1.MESSAGES``, a seeded ``random.Random`` (so every run
sees the same inputs and a failure reproduces) produces ``INPUTS_PER_TYPE`` byte
strings: random bytes, random sequences of well-formed fields of every wire type, and
mutations of valid encodings of random messages (made by us and by protobuf): bit flips,
byte inserts and deletes, truncation, splicing, duplicated chunks, inflated or deflated
length prefixes, varints padded to more bytes, inserted unknown fields and groups.

For every input:

* our decoder either succeeds or raises ``DecodeError``; anything else fails the test,
  with the input in hex;
* what we decode re-encodes to bytes that decode to the same message (idempotence);
* protobuf decodes the same input; when both accept, the messages must be equal.  When
  only one side accepts, or the values differ, the case is recorded and must be one of
  the known, deliberate differences below (anything else fails, listing the inputs).

Known differences (investigated; see ``explain``):

* ``long tag``/``long length``: protobuf's upb refuses a tag or a length prefix encoded
  in more than 5 bytes (a padded varint such as ``8a 80 80 80 80 00``), while we accept
  any varint up to the 10 bytes a varint may have.  Both are in-range values; we are the
  more lenient.
* ``deep``: upb counts sub-messages and groups together against its depth limit of 100,
  so 99 nested unknown groups inside a sub-message inside a message are refused; we cap
  group nesting at 100 per message (our own sub-messages are bounded by the schema).
* ``field 0``: field number 0 is invalid, and we always reject it; upb rejects it too,
  except inside an unknown group (``2b 00 01 2c``) and in messages without fields
  (``Empty``, ``PreStartContainerResponse``: ``00 01``), where it accepts it.  We are
  the stricter.
* ``map entry with other fields``: for a map entry that holds fields besides key and
  value, upb moves the whole entry into the parent's unknown fields (the map does not
  get it), while we keep the entry and drop the extra fields, as we drop every unknown
  field.  The values differ.

Each difference is only excused in its own direction: ``long tag``, ``long length`` and
``deep`` when we accept and protobuf rejects, ``field 0`` when protobuf accepts and we
reject, ``map entry with other fields`` when both accept different values.

A hypothesis-driven fuzz (``st.binary()``) runs alongside, with a moderate number of
examples.
"""

from __future__ import annotations

import random
import types
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.message import DecodeError as PeerDecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import codec_support
from trio_gpu_plugin.proto import DecodeError, Label, Message, v1beta1

OURS = codec_support.by_name(v1beta1.MESSAGES)
MESSAGE_IDS = [cls.__name__ for cls in v1beta1.MESSAGES]
SEED = 0x7E57C0DEC
INPUTS_PER_TYPE = 20_000
VALID_SEEDS_PER_TYPE = 40
UPB_DEPTH_LIMIT = 100

_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}
_TEXT = ["", "a", "GPU-0", "Healthy", "é", "😀", "\x00", "x" * 130, "/dev/nvidia0"]


# --- a reference varint encoder (not the codec's) ----------------------------------------


def varint(value: int, width: int = 0) -> bytes:
    """Encode ``value`` (non-negative) as a varint, padded to at least ``width`` bytes."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value or len(out) + 1 < width:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Lenient varint reader for the scanners here; IndexError/ValueError when bad."""
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


# --- random valid messages -----------------------------------------------------------------


def random_scalar(rng: random.Random, type_name: str) -> Any:
    if type_name == "string":
        if rng.random() < 0.5:
            return rng.choice(_TEXT)
        ranges = [(0x20, 0x7F), (0xA0, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
        return "".join(chr(rng.randrange(*rng.choice(ranges))) for _ in range(rng.randrange(6)))
    if type_name == "bytes":
        return rng.randbytes(rng.randrange(6))
    if type_name == "bool":
        return rng.random() < 0.5
    low, high = _INT_RANGES[type_name]
    roll = rng.random()
    if roll < 0.3:
        return rng.choice([low, high, 0, 1, 127, 128, -1 if low < 0 else 2])
    if roll < 0.6:
        return rng.randint(max(low, -300), 300)
    return rng.randint(low, high)


def random_message(rng: random.Random, cls: type[Message]) -> Message:
    kwargs: dict[str, Any] = {}
    for f in cls.DESCRIPTOR.fields:
        if rng.random() < 0.25:
            continue
        count = rng.randrange(3)
        if f.label is Label.MAP:
            assert f.key_type is not None
            kwargs[f.name] = {random_scalar(rng, f.key_type): random_scalar(rng, f.type)
                              for _ in range(count)}
        elif f.is_message:
            sub = OURS[f.type]
            if f.label is Label.REPEATED:
                kwargs[f.name] = [random_message(rng, sub) for _ in range(count)]
            else:
                kwargs[f.name] = random_message(rng, sub)
        elif f.label is Label.REPEATED:
            kwargs[f.name] = [random_scalar(rng, f.type) for _ in range(count)]
        else:
            kwargs[f.name] = random_scalar(rng, f.type)
    return cls(**kwargs)


def random_field(rng: random.Random, numbers: list[int], depth: int = 0) -> bytes:
    """One well-formed field (of a known or unknown number, any wire type)."""
    number = rng.choice(numbers) if rng.random() < 0.7 else rng.choice([4, 5, 15, 16, 2047, 99999])
    wire_type = rng.choice([0, 0, 1, 2, 2, 2, 3, 5])
    tag = varint(number << 3 | wire_type)
    if wire_type == 0:
        # Up to 70 bits: a varint may carry bits beyond the 64 any type keeps.
        return tag + varint(rng.choice([0, 1, 150, 2**63, 2**64 - 1, rng.getrandbits(64),
                                        2**64, 2**64 + 1, rng.getrandbits(70)]))
    if wire_type == 1:
        return tag + rng.randbytes(8)
    if wire_type == 5:
        return tag + rng.randbytes(4)
    if wire_type == 2:
        if depth < 3 and rng.random() < 0.4:
            payload = b"".join(random_field(rng, [1, 2, 3], depth + 1)
                               for _ in range(rng.randrange(3)))
        else:
            payload = rng.choice([b"", b"a", "é".encode(), b"\xff", rng.randbytes(3)])
        return tag + varint(len(payload)) + payload
    inner = b"".join(random_field(rng, numbers, depth + 1)
                     for _ in range(rng.randrange(3) if depth < 3 else 0))
    return tag + inner + varint(number << 3 | 4)


# --- mutations -----------------------------------------------------------------------------


def length_prefixes(data: bytes) -> list[tuple[int, int, int]]:
    """(position, byte count, value) of every length prefix found by a lenient recursive
    scan of ``data`` as fields (payloads that parse as fields are scanned too)."""
    found: list[tuple[int, int, int]] = []

    def scan(pos: int, end: int) -> bool:
        start_count = len(found)
        try:
            while pos < end:
                tag, pos = read_varint(data, pos)
                wire_type = tag & 7
                if wire_type == 0:
                    _, pos = read_varint(data, pos)
                elif wire_type == 1:
                    pos += 8
                elif wire_type == 5:
                    pos += 4
                elif wire_type == 2:
                    at = pos
                    n, pos = read_varint(data, pos)
                    found.append((at, pos - at, n))
                    if pos + n <= end:
                        scan(pos, pos + n)
                    pos += n
                elif wire_type not in (3, 4):
                    raise ValueError
            if pos != end:
                raise ValueError
        except (IndexError, ValueError):
            del found[start_count:]
            return False
        return True

    scan(0, len(data))
    return found


def insert_into_sub_message(
    data: bytes, target: tuple[int, int, int], blob: bytes, at_end: bool
) -> bytes:
    """Insert ``blob`` at the start or end of the payload whose length prefix is
    ``target``, and grow that prefix and every enclosing one to match."""
    at, size, value = target
    body_end = at + size + value
    where = body_end if at_end else at + size
    chain = [p for p in length_prefixes(data)
             if p[0] <= at and p[0] + p[1] + p[2] >= body_end]
    out = data[:where] + blob + data[where:]
    growth = len(blob)
    for p_at, p_size, p_value in sorted(chain, reverse=True):  # innermost first
        new = varint(p_value + growth)
        out = out[:p_at] + new + out[p_at + p_size:]
        growth += len(new) - p_size
    return out


def varints(data: bytes) -> list[tuple[int, int]]:
    """(position, byte count) of varint-looking runs: candidates for padding."""
    spans = []
    pos = 0
    while pos < len(data):
        start = pos
        while pos < len(data) and data[pos] & 0x80:
            pos += 1
        pos += 1
        if pos <= len(data):
            spans.append((start, pos - start))
    return spans


_INTERESTING_BYTES = [0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12, 0x1A, 0x22, 0x0B, 0x0C,
                      0x1B, 0x1C, 0x0E, 0x0F, 0xC0, 0xED, 0xF4]


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    kind = rng.randrange(12)
    if kind == 0 and data:  # flip 1 to 3 bits
        out = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:  # insert a byte
        at = rng.randrange(len(data) + 1)
        byte = rng.choice(_INTERESTING_BYTES) if rng.random() < 0.6 else rng.randrange(256)
        return data[:at] + bytes([byte]) + data[at:]
    if kind == 2 and data:  # delete one or a few bytes
        at = rng.randrange(len(data))
        return data[:at] + data[at + rng.randint(1, 3):]
    if kind == 3 and data:  # truncate
        return data[:rng.randrange(len(data))]
    if kind == 4:  # splice with another valid encoding
        other = rng.choice(others)
        return data[:rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1):]
    if kind == 5 and data:  # duplicate a chunk
        i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
        at = rng.randrange(len(data) + 1)
        return data[:at] + data[i:j] + data[at:]
    if kind in (6, 7):  # inflate (or deflate) a length prefix
        prefixes = length_prefixes(data)
        if prefixes:
            at, size, value = rng.choice(prefixes)
            new = rng.choice([value + 1, value + 2, value + 7, value + 200, max(value - 1, 0),
                              2**31 - 1, 2**32 + value, 2**64 - 1])
            return data[:at] + varint(new) + data[at + size:]
    if kind == 8:  # pad a varint to more bytes, maybe with bits above 64 in the last one
        spans = varints(data)
        if spans:
            at, size = rng.choice(spans)
            try:
                value, _ = read_varint(data, at)
            except (IndexError, ValueError):
                return data
            width = rng.randint(size, 11)
            padded = bytearray(varint(value, width))
            if width == 10 and rng.random() < 0.5:
                padded[9] |= rng.randrange(2, 128) & ~1
            return data[:at] + bytes(padded) + data[at + size:]
    if kind in (9, 10):
        if kind == 9:  # a well-formed (often unknown) field
            blob = random_field(rng, [1, 2, 3, 4, 5])
        else:  # nested groups, sometimes unbalanced or too deep
            depth = rng.choice([1, 2, 50, 97, 98, 99, 100, 101, 150])
            number = rng.choice([4, 5, 1])
            closes = depth if rng.random() < 0.8 else depth - 1
            blob = varint(number << 3 | 3) * depth + varint(number << 3 | 4) * closes
        prefixes = length_prefixes(data)
        if prefixes and rng.random() < 0.6:
            return insert_into_sub_message(data, rng.choice(prefixes), blob, rng.random() < 0.5)
        at = rng.choice([0, len(data)])
        return data[:at] + blob + data[at:]
    if kind == 11:  # overwrite a byte
        if data:
            out = bytearray(data)
            out[rng.randrange(len(out))] = rng.choice(_INTERESTING_BYTES)
            return bytes(out)
    return data + bytes([rng.randrange(256)])


def fuzz_inputs(cls: type[Message], pb2: types.ModuleType, count: int) -> Iterator[bytes]:
    rng = random.Random(f"{SEED}-{cls.__name__}")
    numbers = [f.number for f in cls.DESCRIPTOR.fields] or [1]
    valid: list[bytes] = []
    for _ in range(VALID_SEEDS_PER_TYPE):
        msg = random_message(rng, cls)
        valid.append(msg.SerializeToString())
        peer = codec_support.to_peer(msg, vars(pb2))
        valid.append(peer.SerializeToString(deterministic=rng.random() < 0.5))
    for _ in range(count):
        roll = rng.random()
        if roll < 0.1:
            yield rng.randbytes(rng.choice([1, 2, 3, 5, 8, 16, 40]))
        elif roll < 0.2:
            yield b"".join(random_field(rng, numbers) for _ in range(rng.randint(1, 4)))
        else:
            data = rng.choice(valid)
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                data = mutate(rng, data, valid)
            yield data


# --- explaining the differences from protobuf ----------------------------------------------


def explain(cls: type[Message], data: bytes) -> set[str]:
    """Which known differences from upb ``data`` exercises (see the module docstring).

    Walks ``data`` the way our decoder does (leniently: padded varints, any group
    nesting), with the schema, to find tags or lengths longer than 5 bytes, sub-message
    and group nesting beyond upb's depth, and map entries holding other fields.
    """
    found: set[str] = set()

    def tag_at(pos: int) -> tuple[int, int]:
        tag, end = read_varint(data, pos)
        if end - pos > 5:
            found.add("long tag")
        if tag >> 3 == 0:
            found.add("field 0")
        return tag, end

    def length_at(pos: int) -> tuple[int, int]:
        n, end = read_varint(data, pos)
        if end - pos > 5:
            found.add("long length")
        return n, end

    def skip(tag: int, pos: int, end: int, depth: int) -> int:
        wire_type = tag & 7
        if wire_type == 0:
            return read_varint(data, pos)[1]
        if wire_type == 1:
            return pos + 8
        if wire_type == 5:
            return pos + 4
        if wire_type == 2:
            n, pos = length_at(pos)
            return pos + n
        if wire_type == 3:
            if depth + 1 > UPB_DEPTH_LIMIT:
                found.add("deep")
            while pos < end:
                inner, pos = tag_at(pos)
                if inner & 7 == 4:
                    return pos
                pos = skip(inner, pos, end, depth + 1)
        return end

    def walk(fields: dict[int, Any], pos: int, end: int, depth: int, entry: bool) -> None:
        while pos < end:
            tag, pos = tag_at(pos)
            f = fields.get(tag)
            if f is None:
                if entry:
                    found.add("map entry with other fields")
                pos = skip(tag, pos, end, depth)
                continue
            if tag & 7 != 2 or f == "scalar":
                pos = skip(tag, pos, end, depth)
                continue
            n, pos = length_at(pos)
            if depth + 1 > UPB_DEPTH_LIMIT:
                found.add("deep")
            walk(f, pos, pos + n, depth + 1, entry=f is ENTRY)
            pos += n

    ENTRY: dict[int, Any] = {1 << 3 | 2: "scalar", 2 << 3 | 2: "scalar"}

    def schema(c: type[Message]) -> dict[int, Any]:
        table: dict[int, Any] = {}
        for f in c.DESCRIPTOR.fields:
            if f.label is Label.MAP:
                table[f.number << 3 | 2] = ENTRY
            elif f.is_message:
                table[f.number << 3 | 2] = schema(OURS[f.type])
            else:
                wire_type = 2 if f.type in ("string", "bytes") else 0
                table[f.number << 3 | wire_type] = "scalar"
        return table

    try:
        walk(schema(cls), 0, len(data), 0, entry=False)
    except (IndexError, ValueError, RecursionError):
        pass
    return found


# --- the check run on every input ----------------------------------------------------------


WE_ACCEPT_ONLY = "accepted by us, rejected by protobuf"
PROTOBUF_ACCEPTS_ONLY = "rejected by us, accepted by protobuf"
VALUES_DIFFER = "decoded differently by us and protobuf"
EXCUSES = {
    WE_ACCEPT_ONLY: {"long tag", "long length", "deep"},
    PROTOBUF_ACCEPTS_ONLY: {"field 0"},
    VALUES_DIFFER: {"map entry with other fields"},
}


class Discrepancies:
    """Differences from protobuf seen by a fuzz run: counted when a known difference
    explains them, listed (in hex) when none does."""

    def __init__(self) -> None:
        self.explained: dict[str, int] = {}
        self.unexplained: list[str] = []

    def record(self, cls: type[Message], data: bytes, what: str) -> None:
        reasons = explain(cls, data) & EXCUSES[what]
        if reasons:
            for reason in reasons:
                self.explained[reason] = self.explained.get(reason, 0) + 1
        else:
            self.unexplained.append(f"{cls.__name__} {what}: {data.hex()}")


def check_input(
    cls: type[Message], peer_cls: Any, data: bytes, discrepancies: Discrepancies
) -> bool:
    """Decode ``data`` with us and protobuf; fail on anything but success or DecodeError,
    or on a non-idempotent decode; record differences from protobuf.  True if we accept."""
    try:
        ours: Message | None = cls.FromString(data)
    except DecodeError as exc:
        assert isinstance(exc, ValueError)
        assert exc.message_type and exc.field and 0 <= exc.offset <= len(data), (
            f"{cls.__name__}: incomplete DecodeError {exc!r} for input {data.hex()}")
        ours = None
    except Exception as exc:  # noqa: BLE001 - any other exception is the failure we hunt
        pytest.fail(f"{cls.__name__}.FromString raised {exc!r} (not DecodeError) "
                    f"for input {data.hex()}")
    try:
        theirs = peer_cls.FromString(data)
    except PeerDecodeError:
        theirs = None
    if ours is not None:
        encoded = ours.SerializeToString()
        again = cls.FromString(encoded)
        assert again == ours, f"{cls.__name__}: re-decoding differs for input {data.hex()}"
        assert again.SerializeToString() == encoded, (
            f"{cls.__name__}: re-encoding differs for input {data.hex()}")
    if ours is not None and theirs is not None:
        if codec_support.from_peer(theirs, OURS) != ours:
            discrepancies.record(cls, data, VALUES_DIFFER)
    elif ours is not None:
        discrepancies.record(cls, data, WE_ACCEPT_ONLY)
    elif theirs is not None:
        discrepancies.record(cls, data, PROTOBUF_ACCEPTS_ONLY)
    return ours is not None


@pytest.mark.parametrize("cls", v1beta1.MESSAGES, ids=MESSAGE_IDS)
def test_random_and_mutated_bytes_decode_or_raise_decode_error(
    cls: type[Message], pb2: types.ModuleType
) -> None:
    peer_cls = getattr(pb2, cls.DESCRIPTOR.name)
    discrepancies = Discrepancies()
    accepted = 0
    for data in fuzz_inputs(cls, pb2, INPUTS_PER_TYPE):
        accepted += check_input(cls, peer_cls, data, discrepancies)
    assert not discrepancies.unexplained, (
        f"{len(discrepancies.unexplained)} unexplained differences from protobuf "
        f"(explained: {discrepancies.explained}):\n" + "\n".join(discrepancies.unexplained[:20])
    )
    # The corpus must exercise both outcomes, or it tests nothing.
    assert 0.05 * INPUTS_PER_TYPE < accepted < 0.95 * INPUTS_PER_TYPE, accepted


KNOWN_DIFFERENCES = [
    pytest.param(v1beta1.NUMANode, "88 80 80 80 80 00 05", {"long tag"}, id="six-byte-tag"),
    pytest.param(v1beta1.Device, "0a 81 80 80 80 80 00 61", {"long length"}, id="six-byte-length"),
    pytest.param(v1beta1.Device, "1a c9 01 0a c6 01" + "1b" * 99 + "1c" * 99, {"deep"},
                 id="groups-in-sub-sub-message"),
    pytest.param(v1beta1.ContainerAllocateResponse, "0a 08 0a 01 61 18 01 12 01 62",
                 {"map entry with other fields"}, id="map-entry-with-unknown-field"),
]


@pytest.mark.parametrize(("cls", "hex_data", "reasons"), KNOWN_DIFFERENCES)
def test_known_differences_from_protobuf_are_recognised(
    cls: type[Message], hex_data: str, reasons: set[str], pb2: types.ModuleType
) -> None:
    # Each known difference, for real: we accept, and protobuf either rejects or decodes
    # another value; and ``explain`` names it (so the fuzz above does not hide others).
    data = bytes.fromhex(hex_data)
    ours = cls.FromString(data)
    try:
        theirs = codec_support.from_peer(getattr(pb2, cls.DESCRIPTOR.name).FromString(data), OURS)
    except PeerDecodeError:
        theirs = None
    assert theirs != ours
    assert explain(cls, data) == reasons


@pytest.mark.parametrize(("cls", "hex_data"), [
    pytest.param(v1beta1.Mount, "18 80 80 80 80 80 80 80 80 80 02", id="bool-high-bits"),
    pytest.param(v1beta1.Device, "0a 01 61", id="valid"),
    pytest.param(v1beta1.NUMANode, "88 80 80 80 00 05", id="five-byte-tag"),
    pytest.param(v1beta1.Device, "1a c7 01 0a c4 01" + "1b" * 98 + "1c" * 98, id="depth-100"),
])
def test_explain_does_not_excuse_other_inputs(cls: type[Message], hex_data: str) -> None:
    assert explain(cls, bytes.fromhex(hex_data)) == set()


def test_fuzz_inputs_are_reproducible(pb2: types.ModuleType) -> None:
    first = list(fuzz_inputs(v1beta1.Device, pb2, 50))
    assert first == list(fuzz_inputs(v1beta1.Device, pb2, 50))
    assert len(set(first)) > 40


@pytest.mark.parametrize("cls", v1beta1.MESSAGES, ids=MESSAGE_IDS)
@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=64))
def test_hypothesis_bytes_decode_or_raise_decode_error(
    cls: type[Message], data: bytes, pb2: types.ModuleType
) -> None:
    discrepancies = Discrepancies()
    check_input(cls, getattr(pb2, cls.DESCRIPTOR.name), data, discrepancies)
    assert not discrepancies.unexplained, discrepancies.unexplained
