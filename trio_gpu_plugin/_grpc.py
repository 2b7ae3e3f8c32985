"""gRPC over HTTP/2 without I/O: purerpc's state machine, hardened for a device plugin.

purerpc splits into an I/O-free protocol layer (``purerpc.grpclib``: ``GRPCConnection``
turns bytes from h2 into gRPC events and gRPC actions into bytes) and an anyio layer on
top.  We keep the first and replace the second (see ``_transport``), because the stock
anyio layer swallows ``Cancelled``, ignores RST_STREAM and EOF, never enforces
``grpc-timeout`` and sets TCP options that fail on Unix sockets (measured, see
``shared/reference/python-stack.md``).

:class:`GrpcConnection` changes what purerpc does with bad input so that it fails one
call, not the whole connection:

* request or response headers that purerpc cannot parse (bad ``grpc-timeout``, wrong
  content type, a request with no body) become :class:`CallFailed` for that stream;
* a message over the size limit, or compressed with an encoding we did not accept,
  becomes :class:`CallFailed` (purerpc raised, killing the connection);
* DATA for a stream we already answered is dropped, its flow-control credit returned
  (purerpc raised ``KeyError``);
* RST_STREAM becomes :class:`CallReset` (purerpc dropped it).

This module touches purerpc's private handler names, which is why setup.cfg pins
``purerpc==0.8.0``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

import h2.errors
import h2.events
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

_FRAME_HEADER = struct.Struct(">BI")


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
        return Status(self.code, self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name


@dataclass(frozen=True)
class CallFailed:
    """This stream cannot go on; answer (server) or end the call (client) with ``status``."""

    stream_id: int
    status: Status


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


class GrpcConnection(GRPCConnection):  # type: ignore[misc]  # purerpc has no type hints
    """purerpc's ``GRPCConnection`` with per-call failure instead of per-connection."""

    def __init__(self, *, client_side: bool, max_message_length: int) -> None:
        from purerpc.grpclib.config import GRPCConfiguration

        super().__init__(
            GRPCConfiguration(client_side=client_side, max_message_length=max_message_length)
        )

    def _headers_received(
        self, event: Any, parse: Any, what: str, unsupported: StatusCode
    ) -> list[Any]:
        """Run purerpc's ``parse`` of request or response headers, failing only this call
        when they are malformed or name an encoding we do not accept."""
        try:
            events: list[Any] = parse(event)
        except (ProtocolError, ValueError, KeyError, TypeError) as exc:
            self.message_read_buffers.pop(event.stream_id, None)
            return [CallFailed(event.stream_id, Status(StatusCode.INTERNAL, f"malformed {what}: {exc}"))]
        encoding = events[0].message_encoding
        if encoding not in ACCEPTED_ENCODINGS:
            self.message_read_buffers.pop(event.stream_id, None)
            return [CallFailed(event.stream_id, Status(
                unsupported, f"{what} encoding {encoding!r} is not supported"))]
        return events

    def _request_received(self, event: h2.events.RequestReceived) -> list[Any]:
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

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Any]:
        self.message_read_buffers.pop(event.stream_id, None)
        return [CallReset(event.stream_id, event.error_code)]
