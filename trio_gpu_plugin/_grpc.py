"""gRPC over HTTP/2 without I/O: purerpc's state machine, hardened for a device plugin.

purerpc splits into an I/O-free protocol layer (``purerpc.grpclib``: ``GRPCConnection``
turns bytes from h2 into gRPC events and gRPC actions into bytes) and an anyio layer on
top.  We keep the first and replace the second (see ``_transport``), because the stock
anyio layer swallows ``Cancelled``, ignores RST_STREAM and EOF, never enforces
``grpc-timeout`` and sets TCP options that fail on Unix sockets (measured; tests/test_transport.py
pins each fix).

:class:`GrpcConnection` changes what purerpc (and h2 under it) does with bad input so
that it fails one call, not the whole connection, and answers it as the gRPC-over-HTTP/2
spec and grpc-go do:

* a malformed request header block (RFC 9113 §8.2-8.3, see
  :func:`malformed_request_headers`), or a body that disagrees with its
  ``content-length``, resets that stream with PROTOCOL_ERROR and becomes
  :class:`MalformedRequest`: a stream error, as RFC 9113 §8.1.1 says (h2 3.x closed the
  whole connection).  A header block that HPACK cannot decode still closes the
  connection, with COMPRESSION_ERROR (§4.3: the decoder's state is lost);
* a request whose content type is not ``application/grpc[+codec][;params]`` is answered
  ``:status 415`` with INTERNAL, a malformed ``grpc-timeout`` (not 1-8 ASCII digits and
  a unit) ``:status 400`` with INTERNAL, a method other than POST ``:status 405`` with
  INTERNAL; other request or response headers that purerpc cannot parse (no
  ``te: trailers``, a request with no body) become :class:`CallFailed` for that stream;
* a request message cut short by the end of the stream (a length prefix promising more
  than was sent, or part of a prefix) becomes :class:`CallFailed` INTERNAL, where purerpc
  dropped the partial message and let the call run without it;
* a message over the size limit, or compressed with an encoding we did not accept,
  becomes :class:`CallFailed` (purerpc raised, killing the connection);
* DATA for a stream we already answered is dropped, its flow-control credit returned
  (purerpc raised ``KeyError``);
* RST_STREAM becomes :class:`CallReset` (purerpc dropped it).

This module touches purerpc's private handler names and message buffers, which is why
setup.cfg pins ``purerpc==0.8.0``, and h2's private header-frame handling, which that pin
holds too: purerpc 0.8.0 requires h2 3.x, whose last release (3.2.0) is the one followed
here.
"""

from __future__ import annotations

import re
import struct
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.stream
from purerpc.grpclib.buffers import MessageReadBuffer
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import MessageReceived
from purerpc.grpclib.exceptions import ProtocolError
from purerpc.grpclib.status import Status, StatusCode

__all__ = ["RpcError", "Status", "StatusCode"]

# gRPC's own default limit for received messages (grpc-go, grpcio): 4 MiB.
DEFAULT_MAX_MESSAGE_LENGTH: Final = 4 * 1024 * 1024
# We never compress, and refuse compressed input: a 4 MiB gzip bomb can inflate to
# gigabytes, and neither the kubelet nor any sane peer compresses on a Unix socket.
ACCEPTED_ENCODINGS: Final = (None, "identity")
CONTENT_TYPE_SUFFIX: Final = "+proto"
GRPC_CONTENT_TYPE: Final = "application/grpc"

_FRAME_HEADER = struct.Struct(">BI")
# RFC 9113 §6.9.2: every flow-control window starts at 65,535 bytes.
_HTTP2_INITIAL_WINDOW: Final = 65_535
# gRPC over HTTP/2: TimeoutValue is at most 8 ASCII digits, TimeoutUnit one of H M S m u n.
_GRPC_TIMEOUT = re.compile(r"[0-9]{1,8}[HMSmun]")
# RFC 9113 §8.2.1: a field name is lowercase visible ASCII without ":" (a pseudo-header's
# leading colon aside); RFC 9110 §5.1 narrows it to a token.
_FIELD_NAME = re.compile(r":?[!#$%&'*+\-.^_`|~0-9a-z]+")
_FORBIDDEN_IN_VALUES = re.compile(r"[\r\n\x00]")
_REQUEST_PSEUDO_HEADERS = frozenset({":method", ":scheme", ":path", ":authority"})
_REQUIRED_PSEUDO_HEADERS = (":method", ":scheme", ":path")
# RFC 9113 §8.2.2: fields of HTTP/1.1 connections, which HTTP/2 has no use for.
_CONNECTION_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection",
                                 "transfer-encoding", "upgrade"})
_DIGITS = re.compile(r"[0-9]+")


class RpcError(Exception):
    """A call failed with a gRPC status.

    Raise it from a handler to answer with that status; client calls raise it when the
    server answered with a status other than OK, or the call could not complete.
    """

    def __init__(self, code: StatusCode, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    @property
    def status(self) -> Status:
        """The call's gRPC status (code and message), as purerpc's :class:`Status`."""
        return Status(self.code, self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name


@dataclass(frozen=True)
class CallFailed:
    """This stream cannot go on; answer (server) or end the call (client) with ``status``.

    A server answers with ``:status`` ``http_status``: 200 but where grpc-go answers a
    request it refuses otherwise (415 for a content type that is not gRPC's, say).
    """

    stream_id: int
    status: Status
    http_status: int = 200


@dataclass(frozen=True)
class MalformedRequest:
    """The request on this stream was malformed (RFC 9113 §8.1.1); the state machine has
    reset the stream with PROTOCOL_ERROR, so nothing more may be sent on it."""

    stream_id: int
    reason: str


@dataclass(frozen=True)
class CallReset:
    """The peer reset the stream (RST_STREAM) with an HTTP/2 error code."""

    stream_id: int
    error_code: int

    def status(self) -> Status:
        """The status a client reports for a reset, as grpc-go maps them."""
        if self.error_code == h2.errors.ErrorCodes.CANCEL:
            return Status(StatusCode.CANCELLED, "stream cancelled by the server")
        if self.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
            return Status(StatusCode.UNAVAILABLE, "stream refused by the server")
        return Status(StatusCode.INTERNAL, f"stream reset by the server (HTTP/2 error {self.error_code})")


def frame_message(payload: bytes) -> bytes:
    """The 5-byte gRPC length prefix (uncompressed) plus ``payload``."""
    return _FRAME_HEADER.pack(0, len(payload)) + payload


def is_grpc_content_type(value: str) -> bool:
    """Whether ``value`` is gRPC's content type: ``application/grpc``, then nothing, a
    ``+codec`` or ``;parameters`` (what grpc-go accepts; an unknown codec is read as proto,
    as grpc-go does)."""
    if not value.startswith(GRPC_CONTENT_TYPE):
        return False
    rest = value[len(GRPC_CONTENT_TYPE):]
    return not rest or rest[0] in "+;"


def malformed_request_headers(
    headers: Sequence[tuple[bytes, bytes]], *, trailers: bool = False
) -> str | None:
    """Why a received request header block (or its trailers) is malformed, or ``None``.

    The rules of RFC 9113 §8.2-8.3 (RFC 7540 §8.1.2): names lowercase tokens; values
    without CR, LF or NUL and not padded with whitespace; the request pseudo-headers
    ``:method``, ``:scheme`` and ``:path`` present, each once, and all pseudo-headers
    ahead of the regular ones (none in trailers); ``:path`` starting with "/"; no
    connection-specific field; ``te`` only ``trailers``; ``content-length`` digits.
    Values must also be UTF-8, the encoding this stack reads them in.  ``:authority`` is
    optional, as it is for gRPC (h2 wanted it or ``host``).
    """
    seen: dict[str, str] = {}
    regular: str | None = None
    for raw_name, raw_value in headers:
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            return f"header name {raw_name!r} is not ASCII"
        try:
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            return f"header {name} has a value that is not UTF-8: {raw_value!r}"
        if name != name.lower():
            return f"header name {name!r} has uppercase letters"
        if not _FIELD_NAME.fullmatch(name):
            return f"header name {name!r} is not a token"
        if _FORBIDDEN_IN_VALUES.search(value):
            return f"header {name} has CR, LF or NUL in its value {value!r}"
        if value != value.strip(" \t"):
            return f"header {name} has a value padded with whitespace: {value!r}"
        if name.startswith(":"):
            if trailers:
                return f"pseudo-header {name} in trailers"
            if name not in _REQUEST_PSEUDO_HEADERS:
                return f"{name} is not a request pseudo-header"
            if name in seen:
                return f"pseudo-header {name} given twice"
            if regular is not None:
                return f"pseudo-header {name} after the regular header {regular}"
            seen[name] = value
            continue
        regular = regular or name
        if name in _CONNECTION_HEADERS:
            return f"connection-specific header {name}"
        if name == "te" and value != "trailers":
            return f"te is {value!r}; only 'trailers' is allowed"
        if name == "content-length" and not _DIGITS.fullmatch(value):
            return f"content-length {value!r} is not a number"
    if trailers:
        return None
    missing = [name for name in _REQUIRED_PSEUDO_HEADERS if name not in seen]
    if missing:
        return f"no {', '.join(missing)} pseudo-header"
    if not seen[":path"].startswith("/"):
        return f":path {seen[':path']!r} does not start with '/'"
    return None


class _CompressionError(h2.exceptions.ProtocolError):  # type: ignore[misc]  # h2 has no hints
    """A header block HPACK could not decode: a connection error (RFC 9113 §4.3)."""

    error_code = h2.errors.ErrorCodes.COMPRESSION_ERROR


class _MalformedStreamReset(h2.events.StreamReset):  # type: ignore[misc]
    """h2's event for a stream it reset itself, saying why: a malformed request."""

    def __init__(self, stream_id: int, reason: str) -> None:
        super().__init__()
        self.stream_id = stream_id
        self.error_code = h2.errors.ErrorCodes.PROTOCOL_ERROR
        self.remote_reset = False
        self.reason = reason


class _ServerH2Connection(h2.connection.H2Connection):  # type: ignore[misc]
    """h2 3.x's server connection, with a malformed request a stream error.

    h2 raises a connection-level ``ProtocolError`` for any header block it finds
    malformed, and for a body that disagrees with its content-length: RFC 9113 §8.1.1
    makes both stream errors.  Built with ``validate_inbound_headers=False``, this
    connection checks each request header block itself (:func:`malformed_request_headers`)
    once HPACK has decoded it; a malformed one still moves the stream's state machine
    (with no headers, so nothing in them can trip h2) and then resets the stream with
    PROTOCOL_ERROR, reporting a :class:`_MalformedStreamReset`.
    """

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        # h2 3.2.0's own _receive_headers_frame, with the header block checked between
        # decoding and the stream's state machine.
        if frame.stream_id not in self.streams:
            max_open_streams = self.local_settings.max_concurrent_streams
            if self.open_inbound_streams + 1 > max_open_streams:
                raise h2.exceptions.TooManyStreamsError(
                    f"max inbound streams is {max_open_streams}, "
                    f"{self.open_inbound_streams} open")
        try:
            headers = h2.connection._decode_headers(self.decoder, frame.data)
        except h2.exceptions.DenialOfServiceError:
            raise  # an oversized header list: ENHANCE_YOUR_CALM, as h2 has it
        except h2.exceptions.ProtocolError as exc:
            raise _CompressionError(str(exc)) from exc
        trailers = frame.stream_id in self.streams
        events: list[Any] = self.state_machine.process_input(
            h2.connection.ConnectionInputs.RECV_HEADERS)
        stream = self._get_or_create_stream(
            frame.stream_id, h2.connection.AllowedStreamIDs(not self.config.client_side))
        reason = malformed_request_headers(headers, trailers=trailers)
        try:
            frames, stream_events = stream.receive_headers(
                headers if reason is None else [], "END_STREAM" in frame.flags,
                self.config.header_encoding)
        except h2.exceptions.ProtocolError as exc:
            if stream.state_machine.state == h2.stream.StreamState.CLOSED:
                raise  # the state machine refused the frame: not about what it holds
            reason = reason or str(exc)  # trailers without END_STREAM, say
        if reason is not None:
            return [], [*events, self._reset_malformed(frame.stream_id, reason)]
        if "PRIORITY" in frame.flags:
            p_frames, p_events = self._receive_priority_frame(frame)
            stream_events[0].priority_updated = p_events[0]
            stream_events.extend(p_events)
            frames.extend(p_frames)
        return frames, events + stream_events

    def _receive_data_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        try:
            return super()._receive_data_frame(frame)  # type: ignore[no-any-return]
        except h2.exceptions.InvalidBodyLengthError as exc:
            reset = self._reset_malformed(
                frame.stream_id,
                f"content-length is {exc.expected_length} but the body has "
                f"{exc.actual_length} bytes or more")
            # h2 counted this frame against the connection's window before it raised;
            # nobody will read it, so hand the credit back now (the stream is closed, so
            # only the connection's window grows).
            self.acknowledge_received_data(frame.flow_controlled_length, frame.stream_id)
            return [], [reset]

    def _reset_malformed(self, stream_id: int, reason: str) -> _MalformedStreamReset:
        self.reset_stream(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        return _MalformedStreamReset(stream_id, reason)


def _unfinished_message(buffer: MessageReadBuffer) -> tuple[int | None, int, int] | None:
    """What ``buffer`` holds of a message it has not completed: its announced length
    (``None`` while the 5-byte prefix is incomplete), the bytes received of it (of the
    prefix, while incomplete) and their flow-controlled length; ``None`` if nothing."""
    pending = buffer._buffer  # purerpc's ByteBuffer: a deque of (bytes, flow-controlled length)
    flow_controlled = sum(length for _, length in pending._deque)
    if buffer._message_length is not None:
        return buffer._message_length, len(pending), flow_controlled + buffer._flow_controlled_length
    if len(pending):
        return None, len(pending), flow_controlled
    return None


class GrpcConnection(GRPCConnection):  # type: ignore[misc]  # purerpc has no type hints
    """purerpc's ``GRPCConnection`` with per-call failure instead of per-connection."""

    #: The connection-level receive window we advertise, in bytes: HTTP/2's initial
    #: 65,535 plus the 2**30 that purerpc's ``initiate_connection`` adds.  Received data
    #: must be acknowledged (``acknowledge_received_data``) to hand it back, or the peer
    #: stalls once this much has arrived.  A class attribute so that tests can shrink it
    #: and cross it in a few calls rather than a gigabyte.
    CONNECTION_WINDOW: int = _HTTP2_INITIAL_WINDOW + 2**30

    def __init__(self, *, client_side: bool, max_message_length: int) -> None:
        from purerpc.grpclib.config import GRPCConfiguration

        super().__init__(
            GRPCConfiguration(client_side=client_side, max_message_length=max_message_length)
        )
        if not client_side:
            # What purerpc's __init__ does, with our h2 connection (see _ServerH2Connection).
            self.h2_connection = _ServerH2Connection(h2.config.H2Configuration(
                client_side=False, header_encoding="utf-8", validate_inbound_headers=False))
            self.h2_connection.clear_outbound_data_buffer()
            self._set_h2_connection_local_settings()

    def initiate_connection(self) -> None:
        """Send the connection preface and settings, and open the connection's receive
        window to :attr:`CONNECTION_WINDOW` (purerpc's own opens it by a fixed 2**30)."""
        self.h2_connection.initiate_connection()
        increment = self.CONNECTION_WINDOW - _HTTP2_INITIAL_WINDOW
        if increment > 0:  # a WINDOW_UPDATE of 0 is a protocol error
            self.h2_connection.increment_flow_control_window(increment)

    def respond_status(
        self, stream_id: int, status: Status, content_type_suffix: str = "", *,
        http_status: int = 200,
    ) -> None:
        """Answer a call with ``status`` alone (gRPC's Trailers-Only response), under
        ``:status`` ``http_status``; purerpc's own always says 200."""
        headers = [
            (":status", str(http_status)),
            ("content-type", GRPC_CONTENT_TYPE + content_type_suffix),
            ("grpc-status", str(status.int_value)),
        ]
        if status.status_message:
            headers.append(("grpc-message", urllib.parse.quote(status.status_message, safe="")))
        self.h2_connection.send_headers(stream_id, headers, end_stream=True)

    def drop_buffer(self, stream_id: int) -> None:
        """Forget a stream's partial message, handing its flow-control credit back (for a
        stream nobody will read any more: reset, answered early, or ended mid-message)."""
        buffer = self.message_read_buffers.pop(stream_id, None)
        unfinished = None if buffer is None else _unfinished_message(buffer)
        if unfinished is not None and unfinished[2]:
            self.h2_connection.acknowledge_received_data(unfinished[2], stream_id)

    def _headers_received(
        self, event: Any, parse: Any, what: str, unsupported: StatusCode
    ) -> list[Any]:
        """Run purerpc's ``parse`` of request or response headers, failing only this call
        when they are malformed or name an encoding we do not accept."""
        try:
            events: list[Any] = parse(event)
        except (ProtocolError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # AttributeError: a header purerpc reads as one value given twice (a list).
            self.message_read_buffers.pop(event.stream_id, None)
            return [CallFailed(event.stream_id, Status(StatusCode.INTERNAL, f"malformed {what}: {exc}"))]
        encoding = events[0].message_encoding
        if encoding not in ACCEPTED_ENCODINGS:
            self.message_read_buffers.pop(event.stream_id, None)
            return [CallFailed(event.stream_id, Status(
                unsupported, f"{what} encoding {encoding!r} is not supported"))]
        return events

    def _request_received(self, event: h2.events.RequestReceived) -> list[Any]:
        refused = _refuse_request(event)
        if refused is not None:
            return [refused]
        return self._headers_received(
            event, super()._request_received, "request", StatusCode.UNIMPLEMENTED)

    def _response_received(self, event: h2.events.ResponseReceived) -> list[Any]:
        return self._headers_received(
            event, super()._response_received, "response", StatusCode.INTERNAL)

    def _trailers_received(self, event: h2.events.TrailersReceived) -> list[Any]:
        try:
            return super()._trailers_received(event)  # type: ignore[no-any-return]
        except (ProtocolError, ValueError, KeyError, TypeError) as exc:
            return [CallFailed(event.stream_id, Status(StatusCode.INTERNAL, f"malformed trailers: {exc}"))]

    def _data_received(self, event: h2.events.DataReceived) -> list[Any]:
        stream_id = event.stream_id
        buffer = self.message_read_buffers.get(stream_id)
        if buffer is None:
            # A stream we already answered or never accepted: drop the bytes but give the
            # flow-control credit back, or the connection window would shrink for good.
            self.h2_connection.acknowledge_received_data(event.flow_controlled_length, stream_id)
            return []
        try:
            buffer.data_received(event.data, event.flow_controlled_length)
            messages = buffer.read_all_complete_messages_flowcontrol()
        except ProtocolError as exc:  # MessageTooLargeError, UnsupportedMessageEncodingError
            del self.message_read_buffers[stream_id]
            self.h2_connection.acknowledge_received_data(event.flow_controlled_length, stream_id)
            code = StatusCode.RESOURCE_EXHAUSTED if "larger than max" in str(exc) else StatusCode.INTERNAL
            return [CallFailed(stream_id, Status(code, str(exc)))]
        return [MessageReceived(stream_id, data, length) for data, length in messages]

    def _stream_ended(self, event: h2.events.StreamEnded) -> list[Any]:
        buffer = self.message_read_buffers.get(event.stream_id)
        unfinished = None if buffer is None else _unfinished_message(buffer)
        if unfinished is None or self.config.client_side:
            return super()._stream_ended(event)  # type: ignore[no-any-return]
        # The request ended inside a message: grpc-go fails the call ("failed to receive
        # the whole message") rather than run it without the message.
        self.drop_buffer(event.stream_id)
        announced, received, _ = unfinished
        where = (f"its length prefix announced {announced} bytes, the stream ended after {received}"
                 if announced is not None
                 else f"the stream ended {received} bytes into a 5-byte length prefix")
        return [CallFailed(event.stream_id, Status(
            StatusCode.INTERNAL, f"request message truncated: {where}"))]

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Any]:
        self.drop_buffer(event.stream_id)
        if isinstance(event, _MalformedStreamReset):
            return [MalformedRequest(event.stream_id, event.reason)]
        return [CallReset(event.stream_id, event.error_code)]


def _refuse_request(event: h2.events.RequestReceived) -> CallFailed | None:
    """The answer grpc-go gives a well-formed HTTP/2 request that gRPC refuses, if any:
    a content type other than gRPC's (415), a malformed grpc-timeout (400), a method
    other than POST (405), each with INTERNAL."""
    def values(name: str) -> list[str]:
        return [value for key, value in event.headers if key == name]

    def refuse(http_status: int, message: str) -> CallFailed:
        return CallFailed(event.stream_id, Status(StatusCode.INTERNAL, message), http_status)

    content_types = values("content-type")
    if len(content_types) != 1 or not is_grpc_content_type(content_types[0]):
        given = (repr(content_types[0]) if len(content_types) == 1
                 else f"given {len(content_types)} times" if content_types else "missing")
        return refuse(415, f"invalid gRPC request content-type {given}: expected "
                           f"{GRPC_CONTENT_TYPE}, alone or followed by +codec or ;parameters")
    timeouts = values("grpc-timeout")
    if len(timeouts) > 1:
        return refuse(400, f"malformed grpc-timeout: given {len(timeouts)} times")
    if timeouts and not _GRPC_TIMEOUT.fullmatch(timeouts[0]):
        return refuse(400, f"malformed grpc-timeout {timeouts[0]!r}: expected 1 to 8 ASCII "
                           "digits and a unit (H, M, S, m, u or n)")
    (method,) = values(":method")  # exactly one: a block without is malformed
    if method != "POST":
        return refuse(405, f"invalid gRPC request method {method!r}: gRPC calls are POST")
    return None
