"""Protobuf wire format: varints, tags, skipping unknown fields, and the codec's errors.

Strategy: the generated per-message decoders (``_codegen``) inline the common case
(one-byte tags and lengths) and call into this module only for the rare slow paths.
Helpers here raise the private ``Malformed`` with a reason; the generated decoder that
called them catches it and re-raises a public :class:`DecodeError` that also names the
message type, the field and the byte offset, which only the caller knows.

Nothing in this module (or anywhere in ``trio_gpu_plugin.proto``) does I/O.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DecodeError", "EncodeError"]

WIRETYPE_VARINT: Final = 0
WIRETYPE_FIXED64: Final = 1
WIRETYPE_LENGTH_DELIMITED: Final = 2
WIRETYPE_START_GROUP: Final = 3
WIRETYPE_END_GROUP: Final = 4
WIRETYPE_FIXED32: Final = 5

# Field numbers are 29 bits (protobuf language guide, "Assigning Field Numbers").
MAX_FIELD_NUMBER: Final = (1 << 29) - 1
# A varint encodes at most 64 bits, 7 per byte: 10 bytes.
MAX_VARINT_BYTES: Final = 10
# Groups are a proto2 relic that v1beta1 never uses, but a peer may still send one as an
# unknown field, and groups nest without a length prefix.  Without a bound, b"\x0b" * N
# would make us track N open groups.  protobuf's own default recursion limit is 100.
MAX_GROUP_DEPTH: Final = 100

# One-byte varints, the encoding of every small length and tag: a table lookup is much
# cheaper than building a bytes object each time.
VARINT_1: Final = tuple(bytes((i,)) for i in range(128))


class DecodeError(ValueError):
    """Bytes that are not a valid encoding of the message type asked for.

    This is the only exception the decoders raise for bad input, whatever the bytes.

    Attributes:
        message_type: full name of the message whose bytes were bad (the innermost one).
        field: the field being read (its name, or ``field <number>`` if unknown, or
            ``tag`` when the tag itself was bad).
        offset: byte offset in the whole input where the problem was found.
        reason: what was wrong, in words.
        path: the fields that lead from the outermost message to ``message_type``.
    """

    def __init__(self, message_type: str, field: str, offset: int, reason: str) -> None:
        self.message_type = message_type
        self.field = field
        self.offset = offset
        self.reason = reason
        self.path: list[str] = []
        self.outer_type = message_type
        super().__init__()

    def _enter(self, outer_type: str, field: str) -> None:
        # Called by each enclosing decoder as the error travels outwards.
        self.path.insert(0, field)
        self.outer_type = outer_type

    def __str__(self) -> str:
        where = f"{self.message_type} field {self.field!r} at byte {self.offset}"
        if self.path:
            where += f" (reached from {self.outer_type} via {'.'.join(self.path)})"
        return f"cannot decode {where}: {self.reason}"


class EncodeError(ValueError):
    """A message holds a value its field's type cannot encode (wrong type, out of range).

    Attributes:
        message_type: full name of the message holding the bad value.
        field: the field's name.
        reason: what was wrong.
        path: the fields that lead from the message being serialized to ``message_type``.
    """

    def __init__(self, message_type: str, field: str, reason: str) -> None:
        self.message_type = message_type
        self.field = field
        self.reason = reason
        self.path: list[str] = []
        self.outer_type = message_type
        super().__init__()

    def _enter(self, outer_type: str, field: str) -> None:
        self.path.insert(0, field)
        self.outer_type = outer_type

    def __str__(self) -> str:
        where = f"{self.message_type} field {self.field!r}"
        if self.path:
            where += f" (reached from {self.outer_type} via {'.'.join(self.path)})"
        return f"cannot encode {where}: {self.reason}"


class Malformed(Exception):
    """Internal: raised by the helpers below, turned into :class:`DecodeError` by the caller."""

    def __init__(self, reason: str, offset: int | None = None) -> None:
        self.reason = reason
        # Where the bad bytes start, when the helper knows better than its caller.
        self.offset = offset
        super().__init__(reason)


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer below 2**64 (callers mask negatives to 64 bits)."""
    if value < 0x80:
        return VARINT_1[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Read a varint at ``pos``; return ``(value, position after it)``.

    The value is returned unmasked (up to 70 bits); callers truncate to the field's width
    as protobuf does.  Raises ``IndexError`` if the buffer ends inside the varint.
    """
    result = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 7 * MAX_VARINT_BYTES:
            raise Malformed(f"varint longer than {MAX_VARINT_BYTES} bytes")


def read_tag(buf: bytes, pos: int) -> tuple[int, int]:
    """Read a multi-byte tag (the generated code handles one-byte tags inline)."""
    tag, pos = read_varint(buf, pos)
    if tag > (MAX_FIELD_NUMBER << 3 | 7):
        raise Malformed(f"field number {tag >> 3} is out of range (max {MAX_FIELD_NUMBER})")
    return tag, pos


def skip_field(buf: bytes, pos: int, end: int, tag: int) -> int:
    """Skip the value of an unknown field whose tag was just read; return the new position.

    ``pos`` is just after the tag.  Known field numbers arriving with an unexpected wire
    type are treated as unknown too, as protobuf does.
    """
    number = tag >> 3
    wire_type = tag & 7
    if number == 0:
        raise Malformed("field number 0 is not allowed")
    if wire_type == WIRETYPE_VARINT:
        # IndexError (truncated) propagates to the caller.
        _, pos = read_varint(buf, pos)
    elif wire_type == WIRETYPE_LENGTH_DELIMITED:
        length, pos = read_varint(buf, pos)
        pos += length
    elif wire_type == WIRETYPE_FIXED64:
        pos += 8
    elif wire_type == WIRETYPE_FIXED32:
        pos += 4
    elif wire_type == WIRETYPE_START_GROUP:
        pos = _skip_group(buf, pos, end, number)
    elif wire_type == WIRETYPE_END_GROUP:
        raise Malformed(f"end-group for field {number} without a matching start-group")
    else:
        raise Malformed(f"invalid wire type {wire_type}")
    if pos > end:
        raise Malformed("field runs past the end of the message")
    return pos


def _skip_group(buf: bytes, pos: int, end: int, number: int) -> int:
    # Iterative, with an explicit stack of open group numbers, so that hostile nesting
    # costs a list entry per level rather than a Python stack frame.
    open_groups = [number]
    while open_groups:
        if pos >= end:
            raise Malformed(f"group for field {open_groups[-1]} is not terminated")
        start = pos
        tag, pos = read_tag(buf, pos)
        field_number = tag >> 3
        wire_type = tag & 7
        if field_number == 0:
            raise Malformed("field number 0 is not allowed", start)
        if wire_type == WIRETYPE_START_GROUP:
            if len(open_groups) >= MAX_GROUP_DEPTH:
                raise Malformed(f"groups nested deeper than {MAX_GROUP_DEPTH} levels", start)
            open_groups.append(field_number)
        elif wire_type == WIRETYPE_END_GROUP:
            if field_number != open_groups[-1]:
                raise Malformed(
                    f"end-group for field {field_number} closes the group of field "
                    f"{open_groups[-1]}",
                    start,
                )
            open_groups.pop()
        else:
            pos = skip_field(buf, pos, end, tag)
    return pos
