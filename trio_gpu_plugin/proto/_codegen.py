"""Generate fast encoders and decoders for a package of message classes.

Strategy: a table-driven codec that interprets the schema at run time spends most of its
time on the interpretation.  Instead, like ``dataclasses`` building ``__init__``, we
write straight-line Python source for each message from its :class:`Descriptor`, with
the tags as constants, the one-byte cases inline and nested messages as direct calls,
and ``exec`` it once at import.  The generated source can be read with
:func:`generated_source` (the tests and ``bench/`` do).

Per message ``M`` the namespace gets:

* ``_enc_M(o) -> bytes``: fields in field-number order, defaults skipped, repeated
  scalars packed, map entries with both key and value, exactly as protobuf writes them;
* ``_new_M(buf, pos, end) -> M``: decode ``buf[pos:end]`` into a new message;
* ``_merge_M(buf, pos, end, o)``: merge ``buf[pos:end]`` into ``o``.

Decoding rules (proto3, as protobuf's upb does them): last one wins for singular fields;
embedded messages seen twice merge; repeated scalars accept packed and unpacked input;
map entries may miss key or value (the default stands in) and the last duplicate key
wins; a known field number with another wire type is treated as unknown; unknown fields
of every wire type are skipped and **dropped**: the plugin is an endpoint of the API,
not a proxy, so there is nobody to pass them on to, and keeping them would cost memory
on every message for nothing.

Message types must form an acyclic graph (v1beta1 does), which bounds the nesting of
known fields by the schema; the only unbounded nesting, unknown groups, is capped in
``_wire``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from . import _wire
from ._schema import SCALARS, FieldDescriptor, Label, Message

__all__ = ["compile_package", "generated_source"]

_SOURCES: dict[str, str] = {}

_INT_RANGES: Final = {
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint32": (0, (1 << 32) - 1),
    "uint64": (0, (1 << 64) - 1),
}

# How a varint read in full (up to 70 bits) becomes the field's value: protobuf keeps
# the low 32 or 64 bits and, for signed types, reads them as two's complement.  Only
# needed on the multi-byte path: a one-byte varint is already the value.
_VARINT_FIXUPS: Final = {
    "int32": ["v &= 0xFFFFFFFF", "if v > 0x7FFFFFFF:", "    v -= 0x100000000"],
    "int64": [
        "v &= 0xFFFFFFFFFFFFFFFF",
        "if v > 0x7FFFFFFFFFFFFFFF:",
        "    v -= 0x10000000000000000",
    ],
    "uint32": ["v &= 0xFFFFFFFF"],
    "uint64": ["v &= 0xFFFFFFFFFFFFFFFF"],
    # protobuf reads a bool as a uint64 first: only the low 64 bits decide.
    "bool": ["v &= 0xFFFFFFFFFFFFFFFF"],
}


def _tag(number: int, wire_type: int) -> int:
    return number << 3 | wire_type


def _tag_literal(number: int, wire_type: int) -> str:
    return repr(_wire.encode_varint(_tag(number, wire_type)))


def _indent(lines: Iterable[str], levels: int = 1) -> list[str]:
    pad = "    " * levels
    return [pad + line for line in lines]


# --- decoding --------------------------------------------------------------------------

_READ_LENGTH: Final = [
    "n = buf[pos]",
    "if n < 0x80:",
    "    pos += 1",
    "else:",
    "    n, pos = _read_varint(buf, pos)",
    "npos = pos + n",
    "if npos > end:",
    "    raise _Malformed('length runs past the end of the enclosing message')",
]


def _read_varint_into_v(type_name: str) -> list[str]:
    lines = [
        "v = buf[pos]",
        "if v < 0x80:",
        "    pos += 1",
        "else:",
        "    v, pos = _read_varint(buf, pos)",
        *_indent(_VARINT_FIXUPS[type_name]),
    ]
    if type_name == "bool":
        lines.append("v = v != 0")
    return lines


def _read_scalar_into_v(type_name: str, target: str = "v") -> list[str]:
    """Statements that read one value of a scalar type at ``pos`` into ``target``."""
    if type_name == "string":
        return [*_READ_LENGTH, f"{target} = buf[pos:npos].decode()", "pos = npos"]
    if type_name == "bytes":
        return [*_READ_LENGTH, f"{target} = buf[pos:npos]", "pos = npos"]
    return [*_read_varint_into_v(type_name), *([f"{target} = v"] if target != "v" else [])]


def _decode_branches(msg: type[Message], f: FieldDescriptor) -> list[tuple[int, list[str]]]:
    """(tag, statements) pairs handling field ``f``; the field's value lives in ``f_<name>``."""
    var = f"f_{f.name}"
    wire_type = SCALARS[f.type][0] if not f.is_message else _wire.WIRETYPE_LENGTH_DELIMITED
    if f.label is Label.MAP:
        entry = f"_entry_{msg.__name__}_{f.name}"
        return [(
            _tag(f.number, _wire.WIRETYPE_LENGTH_DELIMITED),
            [*_READ_LENGTH, f"k, v = {entry}(buf, pos, npos)", f"{var}[k] = v", "pos = npos"],
        )]
    if f.is_message:
        if f.label is Label.REPEATED:
            body = [f"{var}.append(_new_{f.type}(buf, pos, npos))"]
        else:
            body = [
                f"if {var} is None:",
                f"    {var} = _new_{f.type}(buf, pos, npos)",
                "else:",
                f"    _merge_{f.type}(buf, pos, npos, {var})",
            ]
        return [(_tag(f.number, wire_type), [*_READ_LENGTH, *body, "pos = npos"])]
    if f.label is Label.REPEATED:
        read = [*_read_scalar_into_v(f.type), f"{var}.append(v)"]
    else:
        read = _read_scalar_into_v(f.type, var)
    branches = [(_tag(f.number, wire_type), read)]
    if f.label is Label.REPEATED and wire_type == _wire.WIRETYPE_VARINT:
        # Packed form of a repeated varint field: one length-delimited run of varints.
        packed = [
            *_READ_LENGTH,
            "while pos < npos:",
            *_indent(_read_varint_into_v(f.type)),
            f"    {var}.append(v)",
            "if pos != npos:",
            "    raise _Malformed('packed values run past their length')",
        ]
        branches.append((_tag(f.number, _wire.WIRETYPE_LENGTH_DELIMITED), packed))
    return branches


def _parse_loop(branches: list[tuple[int, list[str]]]) -> list[str]:
    """The tag loop shared by message and map-entry decoders.

    Fields whose tag fits in one byte (numbers below 16, all of v1beta1) are dispatched on
    the first byte directly, which spares the common case a test; anything else (longer
    tags, tags padded with continuation bytes, unknown fields) reads the whole tag first
    and goes through every branch again.
    """
    def chain(items: list[tuple[int, list[str]]], prologue: list[str]) -> list[str]:
        out = []
        keyword = "if"
        for tag, body in items:
            out += [f"{keyword} tag == {tag}:", *_indent([*prologue, *body])]
            keyword = "elif"
        return out

    one_byte = [(tag, body) for tag, body in branches if tag < 0x80]
    slow = [
        "tag = -1",
        "tag, pos = _read_tag(buf, pos)",
        *chain(branches, []),
        *(["else:"] if branches else []),
        f"{'    ' if branches else ''}pos = _skip_field(buf, pos, end, tag)",
    ]
    lines = ["while pos < end:", "    tag = buf[pos]"]
    if one_byte:
        lines += _indent([*chain(one_byte, ["pos += 1"]), "else:", *_indent(slow)])
    else:
        lines += _indent(slow)
    return lines + [
        "if pos != end:",
        "    raise _Malformed('field runs past the end of the enclosing message')",
    ]


def _error_handlers(type_const: str, names_const: str) -> list[str]:
    return [
        "except IndexError:",
        f"    raise _error({type_const}, {names_const}, tag, pos, "
        "'truncated: the input ends inside this field') from None",
        "except UnicodeDecodeError:",
        f"    raise _error({type_const}, {names_const}, tag, pos, "
        "'invalid UTF-8 in a string field') from None",
        "except _Malformed as exc:",
        f"    raise _malformed({type_const}, {names_const}, tag, pos, exc) from None",
        "except _DecodeError as exc:",
        f"    exc._enter({type_const}, _field_name({names_const}, tag))",
        "    raise",
    ]


def _decoder_source(msg: type[Message]) -> list[str]:
    name = msg.__name__
    fields = msg.DESCRIPTOR.fields
    branches = [b for f in fields for b in _decode_branches(msg, f)]
    body = ["tag = 0", "try:", *_indent(_parse_loop(branches)),
            *_error_handlers(f"_TYPE_{name}", f"_NAMES_{name}")]

    def default(f: FieldDescriptor) -> str:
        if f.label is Label.REPEATED:
            return "[]"
        if f.label is Label.MAP:
            return "{}"
        return repr(None if f.is_message else SCALARS[f.type][1])

    new = [f"def _new_{name}(buf, pos, end):"]
    new += _indent([f"f_{f.name} = {default(f)}" for f in fields])
    new += _indent(body)
    new += _indent([f"o = _object_new(_C_{name})"] + [f"o.{f.name} = f_{f.name}" for f in fields])
    new += ["    return o", ""]

    merge = [f"def _merge_{name}(buf, pos, end, o):"]
    for f in fields:
        merge += _indent([f"f_{f.name} = o.{f.name}"])
        if f.label is Label.REPEATED:
            # The encoder accepts tuples; merging appends, so make it a list.
            merge += _indent([f"if f_{f.name}.__class__ is not list:",
                              f"    f_{f.name} = list(f_{f.name})"])
        elif f.label is Label.MAP:
            merge += _indent([f"if f_{f.name}.__class__ is not dict:",
                              f"    f_{f.name} = dict(f_{f.name})"])
    merge += _indent(body)
    merge += _indent([f"o.{f.name} = f_{f.name}" for f in fields])
    merge += ["    return None", ""]

    entries: list[str] = []
    for f in fields:
        if f.label is not Label.MAP:
            continue
        assert f.key_type is not None
        entry = f"{name}_{f.name}"
        branches = [
            (_tag(1, SCALARS[f.key_type][0]), _read_scalar_into_v(f.key_type, "k")),
            (_tag(2, SCALARS[f.type][0]), _read_scalar_into_v(f.type, "val")),
        ]
        entries += [
            f"def _entry_{entry}(buf, pos, end):",
            f"    k = {SCALARS[f.key_type][1]!r}",
            f"    val = {SCALARS[f.type][1]!r}",
            "    tag = 0",
            "    try:",
            *_indent(_parse_loop(branches), 2),
            *_indent(_error_handlers(f"_TYPE_{entry}", "_ENTRY_NAMES"), 1),
            "    return k, val",
            "",
        ]
    return new + merge + entries


# --- encoding --------------------------------------------------------------------------
#
# Strategy: one list of byte pieces for the whole message tree, joined once at the end.
# A sub-message's length prefix is not known until its fields are encoded, so a slot is
# reserved for it (``ap(None)``), its pieces appended after, and the slot filled once the
# size, summed as the pieces go, is known.  No piece is ever copied into an intermediate
# bytes object, which is what a "encode the child, then prefix it" scheme spends its time
# on.  Each message's encoder inlines those of the messages it contains (the schema is
# acyclic, so this ends), with locals suffixed by nesting depth.  Tags and one-byte
# lengths (or one-byte varint values) come pre-joined from tables.  Before each field,
# ``w`` is set to a constant naming it, which is all the error path needs.

_LENGTH_PREFIX: Final = "(_V1[n] if n < 128 else _venc(n))"


class _Tables:
    """Tag tables the generated code needs: ``_Tn[i]`` is tag ``n`` followed by byte ``i``."""

    def __init__(self) -> None:
        self.namespace: dict[str, tuple[bytes, ...]] = {}

    def __call__(self, number: int, wire_type: int) -> str:
        tag = _tag(number, wire_type)
        name = f"_T{tag}"
        if name not in self.namespace:
            prefix = _wire.encode_varint(tag)
            self.namespace[name] = tuple(prefix + bytes((i,)) for i in range(128))
        return name


class _Out:
    """Where encoded pieces go: appended to the shared list ``p`` (with the size kept in
    ``size``), or, for a leaf message, concatenated into the bytes local ``target``."""

    def __init__(self, size: str | None = None, target: str | None = None) -> None:
        self.size = size
        self.target = target

    def put(self, expr: str) -> str:
        return f"{self.target} += {expr}" if self.target else f"ap({expr})"

    def grow(self, expr: str) -> list[str]:
        return [f"{self.size} += {expr}"] if self.size else []


def _append_scalar(type_name: str, src: str, number: int, out: _Out, tables: _Tables) -> list[str]:
    """Statements putting field ``number`` holding scalar ``src`` out."""
    wire_type = SCALARS[type_name][0]
    tag = _tag_literal(number, wire_type)
    table = tables(number, wire_type)
    tag_length = len(_wire.encode_varint(_tag(number, wire_type)))
    if type_name in ("string", "bytes"):
        if type_name == "string":
            convert = [f"e = {src}.encode()"]
        else:
            convert = [
                f"if not isinstance({src}, (bytes, bytearray)):",
                f"    raise _Invalid('expected bytes, got ' + type({src}).__name__)",
                f"e = bytes({src})",
            ]
        return [*convert, *_append_payload(number, out, tables)]
    if type_name == "bool":
        return [
            f"if {src} is True:",
            f"    {out.put(f'{table}[1]')}",
            f"elif {src} is False:",
            f"    {out.put(f'{table}[0]')}",
            "else:",
            f"    raise _Invalid('expected bool, got ' + type({src}).__name__)",
            *out.grow(str(tag_length + 1)),
        ]
    low, high = _INT_RANGES[type_name]
    return [
        f"if {src}.__class__ is int and 0 <= {src} < 128:",
        f"    {out.put(f'{table}[{src}]')}",
        *_indent(out.grow(str(tag_length + 1))),
        f"elif not isinstance({src}, int):",
        f"    raise _Invalid('expected int, got ' + type({src}).__name__)",
        f"elif {low} <= {src} <= {high}:",
        f"    e = {tag} + _venc({src} & 0xFFFFFFFFFFFFFFFF)",
        f"    {out.put('e')}",
        *_indent(out.grow("len(e)")),
        "else:",
        f"    raise _Invalid(repr({src}) + ' is out of range for {type_name}')",
    ]


def _prefix(number: int, length: str, tables: _Tables, store: str, grow: _Out) -> list[str]:
    """Store (with the ``store`` format) the tag and length prefix of a length-delimited
    field whose payload is ``length`` bytes long; ``grow`` counts prefix and payload."""
    tag_length = len(_wire.encode_varint(_tag(number, _wire.WIRETYPE_LENGTH_DELIMITED)))
    return [
        f"if {length} < 128:",
        f"    {store.format(f'{tables(number, 2)}[{length}]')}",
        *_indent(grow.grow(f"{length} + {tag_length + 1}")),
        "else:",
        f"    t = {_tag_literal(number, 2)} + _venc({length})",
        f"    {store.format('t')}",
        *_indent(grow.grow(f"{length} + len(t)")),
    ]


def _append_payload(number: int, out: _Out, tables: _Tables, payload: str = "e") -> list[str]:
    """Put field ``number`` whose length-delimited payload is ``payload`` out."""
    return [
        f"n = len({payload})",
        *_prefix(number, "n", tables, out.put("{}"), out),
        out.put(payload),
    ]


def _is_leaf(msg: type[Message]) -> bool:
    return all(f.label is Label.SINGULAR and not f.is_message for f in msg.DESCRIPTOR.fields)


def _scalar_bytes(type_name: str, src: str, out: str) -> list[str]:
    """Statements setting ``out`` to the encoding of scalar ``src``, without a tag."""
    if type_name == "string":
        return [f"e = {src}.encode()", "n = len(e)", f"{out} = {_LENGTH_PREFIX} + e"]
    if type_name == "bytes":
        return [
            f"if not isinstance({src}, (bytes, bytearray)):",
            f"    raise _Invalid('expected bytes, got ' + type({src}).__name__)",
            f"n = len({src})",
            f"{out} = {_LENGTH_PREFIX} + bytes({src})",
        ]
    if type_name == "bool":
        return [
            f"if {src} is True:",
            f"    {out} = b'\\x01'",
            f"elif {src} is False:",
            f"    {out} = b'\\x00'",
            "else:",
            f"    raise _Invalid('expected bool, got ' + type({src}).__name__)",
        ]
    low, high = _INT_RANGES[type_name]
    return [
        f"if not isinstance({src}, int):",
        f"    raise _Invalid('expected int, got ' + type({src}).__name__)",
        f"if {low} <= {src} <= {high}:",
        f"    {out} = _venc({src} & 0xFFFFFFFFFFFFFFFF)",
        "else:",
        f"    raise _Invalid(repr({src}) + ' is out of range for {type_name}')",
    ]


def _append_length_delimited(number: int, size: str, outer_size: str, slot: str,
                             tables: _Tables) -> list[str]:
    """Fill the slot reserved for a length prefix, once the payload size is known."""
    return _prefix(number, size, tables, f"p[{slot}] = {{}}", _Out(size=outer_size))


def _check_class(type_name: str, src: str) -> list[str]:
    return [f"if {src}.__class__ is not _C_{type_name}:", "    raise _Invalid"]


def _check_list(src: str) -> list[str]:
    return [
        f"if {src}.__class__ is not list and not isinstance({src}, _SEQUENCES):",
        f"    raise _Invalid('expected a list, got ' + type({src}).__name__)",
    ]


def _encode_message(
    msg: type[Message], obj: str, depth: int, classes: Mapping[str, type[Message]],
    tables: _Tables, *, leaf: bool = False,
) -> list[str]:
    """Statements encoding the fields of message ``obj``.

    Normally they append to ``p`` and leave the size in ``s<depth>``; with ``leaf`` (a
    message of singular scalars only: no slots needed) they concatenate into the bytes
    local ``q<depth>`` instead, which is cheaper for a few small pieces.
    """
    size = f"s{depth}"
    x = f"x{depth}"
    out = _Out(target=f"q{depth}") if leaf else _Out(size=size)
    lines = [f"q{depth} = b''" if leaf else f"{size} = 0"]
    for f in msg.DESCRIPTOR.fields:
        lines.append(f"{x} = {obj}.{f.name}")
        if f.is_message:
            # A singular message is encoded straight from ``x``; list elements get ``m``.
            sub = f"m{depth + 1}" if f.label is Label.REPEATED else x
            slot = f"i{depth + 1}"
            child = classes[f.type]
            child_code = _encode_message(child, sub, depth + 1, classes, tables,
                                         leaf=_is_leaf(child))
            if _is_leaf(child):
                body = [
                    *_check_class(f.type, sub),
                    *child_code,
                    *_append_payload(f.number, out, tables, f"q{depth + 1}"),
                ]
            else:
                body = [
                    *_check_class(f.type, sub),
                    f"{slot} = len(p)",
                    "ap(None)",
                    *child_code,
                    *_append_length_delimited(f.number, f"s{depth + 1}", size, slot, tables),
                ]
            if f.label is Label.REPEATED:
                lines += [*_check_list(x), f"for {sub} in {x}:", *_indent(body)]
            else:
                lines += [f"if {x} is not None:", *_indent(body)]
        elif f.label is Label.MAP:
            assert f.key_type is not None
            key_tag = _tag_literal(1, SCALARS[f.key_type][0])
            value_tag = _tag_literal(2, SCALARS[f.type][0])
            lines += [
                f"if not isinstance({x}, _Mapping):",
                f"    raise _Invalid('expected a dict, got ' + type({x}).__name__)",
                f"for key, value in {x}.items():",
                *_indent(_scalar_bytes(f.key_type, "key", "kb")),
                *_indent(_scalar_bytes(f.type, "value", "vb")),
                f"    e = {key_tag} + kb + {value_tag} + vb",
                *_indent(_append_payload(f.number, out, tables)),
            ]
        elif f.label is Label.REPEATED:
            lines += _check_list(x)
            if SCALARS[f.type][0] == _wire.WIRETYPE_VARINT:
                # proto3 packs repeated scalars by default.
                lines += [
                    f"if {x}:",
                    "    chunks = []",
                    f"    for item in {x}:",
                    *_indent(_scalar_bytes(f.type, "item", "e"), 2),
                    "        chunks.append(e)",
                    "    e = b''.join(chunks)",
                    *_indent(_append_payload(f.number, out, tables)),
                ]
            else:
                lines += [
                    f"for item in {x}:",
                    *_indent(_append_scalar(f.type, "item", f.number, out, tables)),
                ]
        else:
            default = SCALARS[f.type][1]
            test = f"{x} is not False" if f.type == "bool" else f"{x} != {default!r}"
            lines += [
                f"if {test}:",
                *_indent(_append_scalar(f.type, x, f.number, out, tables)),
            ]
    return lines


def _encoder_source(
    msg: type[Message], classes: Mapping[str, type[Message]], tables: _Tables
) -> list[str]:
    name = msg.DESCRIPTOR.name
    body = _encode_message(msg, "m0", 0, classes, tables)
    return [
        f"def _enc_{name}(m0):",
        "    p = []",
        "    ap = p.append",
        "    try:",
        *_indent(body, 2),
        "    except (_Invalid, AttributeError, TypeError, ValueError) as exc:",
        "        raise _encode_error(m0, exc) from None",
        "    return b''.join(p)",
        "",
    ]


# --- assembly --------------------------------------------------------------------------


class _Invalid(Exception):
    """Internal: the fast encoder met a value it refuses; :func:`_encode_error` finds it."""


def _field_name(names: Mapping[int, str], tag: int) -> str:
    if tag < 0:
        return "tag"
    return names.get(tag >> 3, f"field {tag >> 3}")


def _map_entry_name(field_name: str) -> str:
    """The nested type protoc makes for a map field: ``cdi_devices`` -> ``CdiDevicesEntry``.

    protoc's ToCamelCase: drop underscores, upper-case the first letter and each letter
    after an underscore, leave everything else as it is.
    """
    out = []
    upper_next = True
    for char in field_name:
        if char == "_":
            upper_next = True
        else:
            out.append(char.upper() if upper_next else char)
            upper_next = False
    return "".join(out) + "Entry"


def _error(
    message_type: str, names: Mapping[int, str], tag: int, pos: int, reason: str
) -> _wire.DecodeError:
    return _wire.DecodeError(message_type, _field_name(names, tag), pos, reason)


def _malformed(
    message_type: str, names: Mapping[int, str], tag: int, pos: int, exc: _wire.Malformed
) -> _wire.DecodeError:
    offset = pos if exc.offset is None else exc.offset
    return _wire.DecodeError(message_type, _field_name(names, tag), offset, exc.reason)


# The generated encoders keep no record of where they are, which would cost a store per
# field on every message.  When one fails, this walks the message again, slowly and with
# the same rules, to find the first bad value and name it.


def _scalar_problem(type_name: str, value: object) -> str | None:
    """Why the encoder refuses ``value`` for a field of ``type_name``, or None."""
    if type_name == "string":
        if not isinstance(value, str):
            return f"expected str, got {type(value).__name__}"
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            return f"UnicodeEncodeError: {exc}"
        return None
    if type_name == "bytes":
        ok = isinstance(value, (bytes, bytearray))
        return None if ok else f"expected bytes, got {type(value).__name__}"
    if type_name == "bool":
        ok = value is True or value is False
        return None if ok else f"expected bool, got {type(value).__name__}"
    if not isinstance(value, int):
        return f"expected int, got {type(value).__name__}"
    low, high = _INT_RANGES[type_name]
    return None if low <= value <= high else f"{value!r} is out of range for {type_name}"


def _find_bad_value(msg: Message, path: tuple[str, ...]) -> tuple[str, str, tuple[str, ...], str] | None:
    """(message type, field, path, reason) of the first value the encoder refuses."""
    descriptor = type(msg).DESCRIPTOR
    for f in descriptor.fields:
        here = (descriptor.full_name, f.name, path)
        try:
            value = getattr(msg, f.name)
        except AttributeError as exc:
            return (*here, f"AttributeError: {exc}")
        if f.label is Label.MAP:
            if not isinstance(value, Mapping):
                return (*here, f"expected a dict, got {type(value).__name__}")
            assert f.key_type is not None
            for key, item in value.items():
                problem = _scalar_problem(f.key_type, key) or _scalar_problem(f.type, item)
                if problem:
                    return (*here, problem)
            continue
        if f.label is Label.REPEATED:
            if not isinstance(value, (list, tuple)):
                return (*here, f"expected a list, got {type(value).__name__}")
            items = list(value)
        elif f.is_message:
            items = [] if value is None else [value]
        elif value is False if f.type == "bool" else value == SCALARS[f.type][1]:
            continue  # the default: not encoded, so not checked
        else:
            items = [value]
        for item in items:
            if f.is_message:
                expected = f"{descriptor.package}.{f.type}"
                if not isinstance(item, Message) or type(item).DESCRIPTOR.full_name != expected:
                    return (*here, f"expected {f.type}, got {type(item).__name__}")
                found = _find_bad_value(item, (*path, f.name))
                if found:
                    return found
            else:
                problem = _scalar_problem(f.type, item)
                if problem:
                    return (*here, problem)
    return None


def _encode_error(msg: Message, exc: Exception) -> _wire.EncodeError:
    outer = type(msg).DESCRIPTOR.full_name
    found = _find_bad_value(msg, ())
    if found is None:  # pragma: no cover - the two walks follow the same rules
        return _wire.EncodeError(outer, "?", f"{type(exc).__name__}: {exc}")
    message_type, field, path, reason = found
    error = _wire.EncodeError(message_type, field, reason)
    error.path = list(path)
    error.outer_type = outer
    return error


def _check_acyclic(classes: Mapping[str, type[Message]]) -> None:
    state: dict[str, int] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise TypeError(f"recursive message types are not supported: {' -> '.join(trail)}")
        state[name] = 1
        for f in classes[name].DESCRIPTOR.fields:
            if f.is_message:
                if f.type not in classes:
                    raise TypeError(f"{name}.{f.name}: unknown message type {f.type!r}")
                visit(f.type, (*trail, f.type))
        state[name] = 2

    for name in classes:
        visit(name, (name,))


def compile_package(classes: Iterable[type[Message]]) -> None:
    """Generate and attach the codec of every message class of one proto package.

    All message types a field refers to must be among ``classes``.
    """
    by_name = {cls.__name__: cls for cls in classes}
    packages = {cls.DESCRIPTOR.package for cls in by_name.values()}
    if len(packages) != 1:
        raise TypeError(f"compile one package at a time, got {sorted(packages)}")
    for name, cls in by_name.items():
        if cls.DESCRIPTOR.name != name:
            raise TypeError(f"class {name} is declared as {cls.DESCRIPTOR.full_name}")
    _check_acyclic(by_name)

    namespace: dict[str, Any] = {
        "_read_varint": _wire.read_varint,
        "_read_tag": _wire.read_tag,
        "_skip_field": _wire.skip_field,
        "_venc": _wire.encode_varint,
        "_V1": _wire.VARINT_1,
        "_Malformed": _wire.Malformed,
        "_DecodeError": _wire.DecodeError,
        "_Invalid": _Invalid,
        "_error": _error,
        "_malformed": _malformed,
        "_encode_error": _encode_error,
        "_field_name": _field_name,
        "_object_new": object.__new__,
        "_Mapping": Mapping,
        "_SEQUENCES": (list, tuple),
        "_ENTRY_NAMES": {1: "key", 2: "value"},
    }
    source: list[str] = []
    tables = _Tables()
    for name, cls in by_name.items():
        namespace[f"_C_{name}"] = cls
        namespace[f"_TYPE_{name}"] = cls.DESCRIPTOR.full_name
        namespace[f"_NAMES_{name}"] = {f.number: f.name for f in cls.DESCRIPTOR.fields}
        for f in cls.DESCRIPTOR.fields:
            if f.label is Label.MAP:
                entry_type = f"{cls.DESCRIPTOR.full_name}.{_map_entry_name(f.name)}"
                namespace[f"_TYPE_{name}_{f.name}"] = entry_type
        source.append("\n".join(_encoder_source(cls, by_name, tables) + _decoder_source(cls)))
    namespace.update(tables.namespace)
    package = next(iter(packages))
    _SOURCES[package] = "\n".join(source)
    # One compile per message: CPython's compiler needs several times the source's size
    # in transient memory, and the allocator keeps what it took.  Compiling the whole
    # package at once cost the process about 10 MiB of resident memory for good.
    for name, text in zip(by_name, source, strict=True):
        exec(compile(text, f"<trio_gpu_plugin.proto codec for {package}.{name}>", "exec"),
             namespace)

    for name, cls in by_name.items():
        new = namespace[f"_new_{name}"]
        merge = namespace[f"_merge_{name}"]
        cls._encode = staticmethod(namespace[f"_enc_{name}"])
        cls._decode_new = staticmethod(_top_level_new(new))
        cls._decode_merge = staticmethod(_top_level_merge(merge))


def _top_level_new(new: Any) -> Any:
    def decode_new(data: bytes) -> Any:
        return new(data, 0, len(data))

    return decode_new


def _top_level_merge(merge: Any) -> Any:
    def decode_merge(data: bytes, target: Any) -> None:
        merge(data, 0, len(data), target)

    return decode_merge


def generated_source(package: str) -> str:
    """The Python source generated for ``package`` (for reading and debugging)."""
    return _SOURCES[package]
