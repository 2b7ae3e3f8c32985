"""gRPC over Unix sockets on trio: a server for our services and a client channel.

Strategy: one :class:`_Link` per connection owns the socket and the HTTP/2 state
(:class:`~trio_gpu_plugin._grpc.GrpcConnection`).  A reader task feeds received bytes
to the state machine and dispatches the events; a writer task is the only one that
writes to the socket, so a call that is cancelled half-way through a write can never
leave half an HTTP/2 frame behind.  Calls only queue bytes in the state machine and
wake the writer, which costs no await: a unary answer (headers, message, trailers) goes
out in one ``send``.

Server side, every call runs in its own task inside its connection's nursery, under a
cancel scope that is cancelled when the client resets the stream (RST_STREAM) and whose
deadline is the client's ``grpc-timeout``, counted from the request's headers; a call
whose deadline has passed by the time its request is complete (``grpc-timeout: 0S``)
is answered ``DEADLINE_EXCEEDED`` without running its handler.  When the client goes
away (EOF), the connection's nursery is cancelled, so every call it had is cancelled
and the socket is closed.  A malformed request (see ``_grpc``) resets only its own
stream.  Handler errors become statuses: :class:`~trio_gpu_plugin.RpcError` its own
code and message, anything else ``UNKNOWN`` with the exception's text (the traceback
goes to the log); ``trio.Cancelled`` always propagates.

Client side, :func:`open_unix_channel` holds one connection; calls on it are bounded by
a timeout, and leaving a streaming call early resets its stream so the server's handler
is cancelled.
"""

from __future__ import annotations

import collections
import datetime
import errno
import itertools
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Generic, NoReturn, TypeVar, Union

import h2.errors
import h2.exceptions
import trio
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    ResponseReceived,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import GRPCError, ProtocolError, RpcFailedError

from ._grpc import (
    CONTENT_TYPE_SUFFIX,
    DEFAULT_MAX_MESSAGE_LENGTH,
    CallFailed,
    CallReset,
    GrpcConnection,
    MalformedRequest,
    RpcError,
    Status,
    StatusCode,
    frame_message,
)
from ._watch import Identity, identity
from .proto import DecodeError, EncodeError, Message, MethodDescriptor, ServiceDescriptor

__all__ = [
    "Channel",
    "DEFAULT_CALL_TIMEOUT",
    "ResponseStream",
    "Service",
    "SocketInUseError",
    "open_unix_channel",
    "serve_unix",
]

log = logging.getLogger("trio_gpu_plugin.transport")

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)

#: A unary handler: ``async def handler(request) -> response``.
UnaryHandler = Callable[[Any], Awaitable[Message]]
#: A server-streaming handler: ``async def handler(request, send) -> None``, calling
#: ``await send(response)`` for each message.
StreamHandler = Callable[[Any, Callable[[Any], Awaitable[None]]], Awaitable[None]]
Handler = Union[UnaryHandler, StreamHandler]

#: Bound on a unary client call when the caller gives none (seconds).
DEFAULT_CALL_TIMEOUT: Final = 30.0
# Bytes asked of the socket per receive: enough for a large ListAndWatch in one go.
RECEIVE_SIZE: Final = 65536
# How long a closing connection may spend flushing its last bytes (GOAWAY, trailers)
# to a peer that may have stopped reading.
CLOSE_GRACE: Final = 0.2
# Unix socket paths are limited by sockaddr_un.sun_path (108 bytes on Linux, with NUL).
MAX_UNIX_PATH: Final = 107
LISTEN_BACKLOG: Final = 128

_PROTOCOL_ERRORS = (h2.exceptions.ProtocolError, ProtocolError)


@dataclass(frozen=True)
class Service:
    """A service to serve: its descriptor and a handler per implemented method.

    Methods without a handler answer ``UNIMPLEMENTED``.
    """

    descriptor: ServiceDescriptor
    handlers: Mapping[str, Handler]

    def __post_init__(self) -> None:
        names = {m.name for m in self.descriptor.methods}
        unknown = sorted(set(self.handlers) - names)
        if unknown:
            raise ValueError(
                f"service {self.descriptor.full_name} has no method(s) {unknown}; "
                f"it has {sorted(names)}"
            )


@dataclass(frozen=True)
class _Route:
    path: str
    method: MethodDescriptor
    handler: Handler


def _build_routes(services: Iterable[Service]) -> dict[str, _Route]:
    routes: dict[str, _Route] = {}
    for service in services:
        for name, handler in service.handlers.items():
            path = service.descriptor.path(name)
            if path in routes:
                raise ValueError(f"two handlers for {path}")
            routes[path] = _Route(path, service.descriptor.method(name), handler)
    return routes


class _StreamGone(Exception):
    """Internal: the stream was reset or the connection lost while we were sending."""


class _Link:
    """One HTTP/2 connection: the socket, the state machine, the writer task."""

    def __init__(self, stream: trio.abc.Stream, conn: GrpcConnection, peer: str) -> None:
        self.stream = stream
        self.conn = conn
        self.peer = peer
        self._wake = trio.Event()
        self._window = trio.Event()
        self._closing = False
        self.broken = False
        self.protocol_error: str | None = None
        self.writer_done = trio.Event()

    def kick(self) -> None:
        """Wake the writer: the state machine holds bytes to send."""
        self._wake.set()

    def window_changed(self) -> None:
        self._window.set()
        self._window = trio.Event()

    def finish(self) -> None:
        """Let the writer send what is queued, then stop."""
        self._closing = True
        self._wake.set()

    async def writer(self, cancel_connection: trio.CancelScope) -> None:
        try:
            while True:
                data = self.conn.data_to_send()
                if data:
                    await self.stream.send_all(data)
                elif self._closing:
                    return
                else:
                    await self._wake.wait()
                    self._wake = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("%s: write failed (%s); closing the connection", self.peer, exc)
            self.broken = True
            cancel_connection.cancel()
        finally:
            self.writer_done.set()

    async def receive_events(self) -> list[object] | None:
        """The events of the next bytes received; ``None`` at EOF or on a protocol error.

        A protocol error is logged and kept in :attr:`protocol_error`; h2 has queued a
        GOAWAY for the writer to send by then.
        """
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            log.debug("%s: the peer closed the connection", self.peer)
            return None
        try:
            events: list[object] = self.conn.receive_data(data)
        except _PROTOCOL_ERRORS as exc:
            log.warning("%s: closing the connection: the peer broke the HTTP/2 protocol (%s)",
                        self.peer, exc)
            self.protocol_error = str(exc)
            return None
        return events

    async def send_message(self, stream_id: int, payload: bytes) -> None:
        """Queue one gRPC message on a stream, waiting for flow-control credit as needed."""
        data = frame_message(payload)
        while True:
            if self.broken:
                raise _StreamGone("connection lost")
            try:
                window = self.conn.flow_control_window(stream_id)
                if window >= len(data):
                    self.conn.send_data(stream_id, data)
                    self.kick()
                    return
                if window > 0:
                    self.conn.send_data(stream_id, data[:window])
                    data = data[window:]
                    self.kick()
                    continue
            except h2.exceptions.StreamClosedError as exc:
                raise _StreamGone(f"stream {stream_id} closed") from exc
            await self._window.wait()


# --- server ----------------------------------------------------------------------------


@dataclass(eq=False)
class _ServerCall:
    stream_id: int
    route: _Route
    timeout: datetime.timedelta | None
    deadline: float | None = None  # trio time, from the headers' arrival and timeout
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    request: bytes | None = None
    extra_messages: bool = False
    response_started: bool = False
    reset: bool = False


class _ServerConnection:
    def __init__(
        self, stream: trio.abc.Stream, routes: Mapping[str, _Route], max_message_length: int,
        peer: str,
    ) -> None:
        self.routes = routes
        self.link = _Link(
            stream, GrpcConnection(client_side=False, max_message_length=max_message_length), peer
        )
        self.calls: dict[int, _ServerCall] = {}

    async def run(self) -> None:
        link = self.link
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.writer, nursery.cancel_scope)
            link.conn.initiate_connection()
            link.kick()
            try:
                await self._read_loop(nursery)
            finally:
                # EOF or a protocol error: flush what is queued (a GOAWAY, say), briefly,
                # then cancel every call still running on this connection.
                link.finish()
                with trio.move_on_after(CLOSE_GRACE):
                    await link.writer_done.wait()
                nursery.cancel_scope.cancel()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while (events := await self.link.receive_events()) is not None:
            for event in events:
                self._dispatch(event, nursery)
            self.link.kick()

    def _dispatch(self, event: object, nursery: trio.Nursery) -> None:
        if isinstance(event, MessageReceived):
            self.link.conn.acknowledge_received_data(event.stream_id, event.flow_controlled_length)
            call = self.calls.get(event.stream_id)
            if call is not None:
                if call.request is None:
                    call.request = event.data
                else:
                    call.extra_messages = True
        elif isinstance(event, RequestReceived):
            self._request_received(event)
        elif isinstance(event, RequestEnded):
            call = self.calls.get(event.stream_id)
            if call is not None:
                nursery.start_soon(self._run_call, call)
        elif isinstance(event, WindowUpdated):
            self.link.window_changed()
        elif isinstance(event, CallReset):
            call = self.calls.pop(event.stream_id, None)
            if call is not None:
                log.debug("%s: client reset %s", self.link.peer, call.route.path)
                call.reset = True
                call.scope.cancel()
        elif isinstance(event, CallFailed):
            call = self.calls.pop(event.stream_id, None)
            if call is not None:
                call.reset = True  # its answer is this status; nothing else may follow
                call.scope.cancel()
            log.warning("%s: failing a call: %s", self.link.peer, event.status)
            self._answer(event.stream_id, event.status, response_started=False,
                         http_status=event.http_status)
        elif isinstance(event, MalformedRequest):
            # The state machine has reset the stream (PROTOCOL_ERROR): no answer can follow.
            call = self.calls.pop(event.stream_id, None)
            if call is not None:
                call.reset = True
                call.scope.cancel()
            log.warning("%s: resetting stream %d: malformed request: %s",
                        self.link.peer, event.stream_id, event.reason)

    def _request_received(self, event: RequestReceived) -> None:
        path = f"/{event.service_name}/{event.method_name}"
        route = self.routes.get(path)
        if route is None:
            log.info("%s: %s is not implemented here", self.link.peer, path)
            self.link.conn.message_read_buffers.pop(event.stream_id, None)
            self._answer(
                event.stream_id,
                Status(StatusCode.UNIMPLEMENTED, f"method {path} is not implemented"),
                response_started=False,
            )
            return
        deadline = (None if event.timeout is None
                    else trio.current_time() + event.timeout.total_seconds())
        self.calls[event.stream_id] = _ServerCall(event.stream_id, route, event.timeout, deadline)

    def _answer(
        self, stream_id: int, status: Status, *, response_started: bool, http_status: int = 200
    ) -> None:
        """Queue the trailers that end a call with ``status`` (under ``:status``
        ``http_status`` when nothing was sent yet)."""
        conn = self.link.conn
        try:
            if response_started:
                conn.end_response(stream_id, status)
            else:
                conn.respond_status(stream_id, status, CONTENT_TYPE_SUFFIX, http_status=http_status)
        except h2.exceptions.StreamClosedError:
            return  # reset meanwhile: nobody is listening
        conn.message_read_buffers.pop(stream_id, None)
        h2_stream = conn.h2_connection.streams.get(stream_id)
        if h2_stream is not None and not h2_stream.closed:
            # The client has not finished its request: tell it to stop sending, as gRPC
            # servers do after an early answer.
            try:
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.StreamClosedError:
                pass
        self.link.kick()

    async def _run_call(self, call: _ServerCall) -> None:
        if call.deadline is not None:
            if trio.current_time() >= call.deadline:
                # Expired on arrival (grpc-timeout 0) or while the request came in: the
                # client has stopped waiting, so the handler is not run at all (one that
                # never reaches a checkpoint would otherwise answer OK).
                self.calls.pop(call.stream_id, None)
                self._answer(call.stream_id, Status(
                    StatusCode.DEADLINE_EXCEEDED,
                    f"{call.route.path}: the client's deadline "
                    f"({call.timeout.total_seconds() if call.timeout else 0:g} s) passed "
                    "before the call could start",
                ), response_started=False)
                return
            call.scope.deadline = call.deadline
        status: Status | None = None
        with call.scope:
            status = await self._invoke(call)
        self.calls.pop(call.stream_id, None)
        if call.reset:
            return
        if call.scope.cancelled_caught:
            status = Status(
                StatusCode.DEADLINE_EXCEEDED,
                f"{call.route.path} did not finish within the client's deadline "
                f"({call.timeout.total_seconds() if call.timeout else 0:g} s)",
            )
        if status is None:  # the stream went away while we were sending
            return
        self._answer(call.stream_id, status, response_started=call.response_started)

    async def _invoke(self, call: _ServerCall) -> Status | None:
        route = call.route
        if call.request is None or call.extra_messages:
            got = "none" if call.request is None else "several"
            return Status(StatusCode.INTERNAL, f"{route.path} takes one request message, got {got}")
        try:
            request = route.method.request_type.FromString(call.request)
        except DecodeError as exc:
            log.warning("%s: %s: bad request: %s", self.link.peer, route.path, exc)
            return Status(StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            if route.method.server_streaming:
                await route.handler(request, _Sender(self, call))  # type: ignore[call-arg]
            else:
                response = await route.handler(request)  # type: ignore[call-arg]
                await self._send(call, response)
        except RpcError as exc:
            return exc.status
        except RpcFailedError as exc:  # purerpc's own error types, raised by handlers used to them
            return exc.status
        except _StreamGone:
            return None
        except _BadResponse as exc:
            log.error("%s: %s: %s", self.link.peer, route.path, exc)
            return Status(StatusCode.INTERNAL, str(exc))
        except Exception as exc:
            log.exception("%s: %s failed", self.link.peer, route.path)
            return Status(StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
        return Status(StatusCode.OK)

    async def _send(self, call: _ServerCall, response: object) -> None:
        expected = call.route.method.response_type
        if type(response) is not expected:
            raise _BadResponse(
                f"the handler returned {type(response).__name__}, expected {expected.__name__}"
            )
        try:
            payload = response.SerializeToString()
        except EncodeError as exc:
            raise _BadResponse(f"the handler's response cannot be encoded: {exc}") from None
        if call.reset:
            raise _StreamGone("reset")
        if not call.response_started:
            self.link.conn.start_response(call.stream_id, CONTENT_TYPE_SUFFIX)
            call.response_started = True
        await self.link.send_message(call.stream_id, payload)


class _BadResponse(Exception):
    """Internal: a handler gave something that is not its method's response message."""


class _Sender:
    """The ``send`` a server-streaming handler awaits for each message."""

    __slots__ = ("_connection", "_call")

    def __init__(self, connection: _ServerConnection, call: _ServerCall) -> None:
        self._connection = connection
        self._call = call

    async def __call__(self, message: Message) -> None:
        await self._connection._send(self._call, message)


def _check_unix_path(path: str) -> None:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ValueError(f"Unix socket path is longer than {MAX_UNIX_PATH} bytes: {path!r}")


class SocketInUseError(OSError):
    """A socket file we were to serve on is being served by another process (a second
    plugin instance given the same socket, say): it is left alone.

    An :class:`OSError` with errno ``EADDRINUSE``, as ``bind`` gives for a socket that is
    in use, so that callers retrying failed binds (the runtime) retry this too, and
    serve once the other process has gone.  Its message names the path; so does
    :attr:`path`.
    """

    def __init__(self, path: str) -> None:
        super().__init__(
            errno.EADDRINUSE,
            f"{path}: another process serves this socket (a second instance given the "
            "same socket?); refusing to replace it",
        )
        #: The socket file another process serves.
        self.path = path


def _served_by_another(path: str) -> bool:
    """Whether a process accepts connections on the socket file at ``path``; ``False``
    for a stale file (left by a process that was killed) or one gone meanwhile.

    Raises :class:`OSError` when it cannot tell (no permission to connect, say): a
    socket we cannot probe is not ours to delete.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # Non-blocking: a Unix connect completes or fails at once, except when the
        # listener's backlog is full (EAGAIN), which also means somebody listens.
        probe.setblocking(False)
        error = probe.connect_ex(path)
    if error in (0, errno.EAGAIN, errno.EINPROGRESS):
        return True
    if error in (errno.ECONNREFUSED, errno.ENOENT):
        return False
    raise OSError(error, f"{path}: cannot tell whether another process serves this socket "
                         f"({os.strerror(error)}); refusing to replace it")


async def _bind_unix(path: str) -> tuple[trio.socket.SocketType, Identity]:
    """A socket listening at ``path``, replacing a stale socket file there; and the
    identity of its file, to remove it on exit only if it is still ours."""
    _check_unix_path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        if _served_by_another(path):
            raise SocketInUseError(path)
        # A socket file left by an earlier instance: nobody can be served through it.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # removed meanwhile, which is all we wanted
    # Bound with the stdlib socket: trio's bind() of a Unix path hops to a worker thread
    # for the filesystem lookup, which costs a thread and a scheduler round trip on every
    # (re)registration for what is a quick local operation, like the unlink above.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            raw.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # A socket bound at the path since we looked: another process serving it
            # (two instances started together, or racing to serve again after the
            # kubelet cleared the directory).  Said as such, not as a bare errno.
            raise SocketInUseError(path) from exc
        # Straight after bind, so that the file is the one we bound all but certainly.
        bound = identity(path)
        raw.listen(LISTEN_BACKLOG)
    except BaseException:
        raw.close()
        raise
    await trio.lowlevel.checkpoint()
    return trio.socket.from_stdlib_socket(raw), bound


def _unlink_if_ours(path: str, ours: Identity) -> None:
    """Remove the socket file at ``path`` if it is still the one we bound.

    Compared by the full identity, not the inode number: ext4 gives a socket bound at
    the path after ours was removed (a successor's) our freed inode number at once;
    only the change time tells it apart (see :mod:`._watch`).
    """
    if ours is not None and identity(path) == ours:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


async def serve_unix(
    path: str | os.PathLike[str],
    services: Iterable[Service],
    *,
    max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
    remove_on_exit: Callable[[], bool] = lambda: True,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve gRPC ``services`` on a Unix socket at ``path`` until cancelled.

    Use it with ``await nursery.start(serve_unix, path, services)``, which returns the
    path once the socket accepts connections.  A stale socket file at ``path`` (nobody
    accepting connections on it) is replaced; a socket another process serves raises
    :class:`SocketInUseError` and any other file :class:`FileExistsError`, leaving them
    alone.  The socket file is removed on exit unless something else has been bound there
    since (told apart by device, inode number and change time, as the watch does), or
    ``remove_on_exit()`` (asked then) says no: the test kit's killed kubelet leaves its
    file, as a killed process does.

    Resource handling: each connection runs in a task of this server; cancelling the
    server cancels every call and closes every connection.  Error handling: failures of
    one connection (protocol errors, a peer that vanished) are logged and close that
    connection only.
    """
    path = os.fspath(path)
    routes = _build_routes(services)
    sock, bound = await _bind_unix(path)
    listener = trio.SocketListener(sock)

    connection_numbers = itertools.count(1)

    async def handle(stream: trio.SocketStream) -> None:
        peer = f"{path} connection {next(connection_numbers)}"
        try:
            await _ServerConnection(stream, routes, max_message_length, peer).run()
        except Exception:
            # A bug in one connection must not take the server down with it.
            log.exception("%s: connection failed; closing it", peer)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, [listener])
            log.info("serving %s on %s", ", ".join(sorted(routes)) or "nothing", path)
            task_status.started(path)
    finally:
        if remove_on_exit():
            _unlink_if_ours(path, bound)
    raise AssertionError("trio.serve_listeners returned")  # pragma: no cover


# --- client ----------------------------------------------------------------------------


@dataclass(eq=False)
class _ClientCall:
    stream_id: int
    path: str
    response_type: type[Message]
    messages: collections.deque[tuple[bytes, int]] = field(default_factory=collections.deque)
    status: Status | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class ResponseStream(Generic[_Resp]):
    """The messages of a server-streaming call, as an async iterator."""

    def __init__(self, channel: Channel, call: _ClientCall) -> None:
        self._channel = channel
        self._call = call

    def __aiter__(self) -> ResponseStream[_Resp]:
        return self

    async def __anext__(self) -> _Resp:
        message = await self._channel._receive(self._call)
        if message is None:
            raise StopAsyncIteration
        return message  # type: ignore[return-value]


class Channel:
    """A client connection to a gRPC server on a Unix socket.

    Made by :func:`open_unix_channel`.  Any number of calls may run on it at once.
    """

    def __init__(self, stream: trio.abc.Stream, path: str, max_message_length: int) -> None:
        self.path = path
        self._link = _Link(
            stream, GrpcConnection(client_side=True, max_message_length=max_message_length),
            f"server {path}",
        )
        self._calls: dict[int, _ClientCall] = {}
        self._lost: Status | None = None

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        link = self._link
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.writer, nursery.cancel_scope)
            link.conn.initiate_connection()
            link.kick()
            task_status.started()
            try:
                await self._read_loop()
            finally:
                self._connection_lost(f"connection to {self.path} closed")
                nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        link = self._link
        while (events := await link.receive_events()) is not None:
            for event in events:
                self._dispatch(event)
            link.kick()
        if link.protocol_error is not None:
            self._connection_lost(f"protocol error from {self.path}: {link.protocol_error}")

    def _dispatch(self, event: object) -> None:
        if isinstance(event, WindowUpdated):
            self._link.window_changed()
            return
        stream_id = getattr(event, "stream_id", None)
        call = self._calls.get(stream_id) if stream_id is not None else None
        if call is None:
            if isinstance(event, MessageReceived):
                self._link.conn.acknowledge_received_data(stream_id, event.flow_controlled_length)
            return
        if isinstance(event, MessageReceived):
            call.messages.append((event.data, event.flow_controlled_length))
        elif isinstance(event, ResponseEnded):
            call.status = event.status
        elif isinstance(event, CallFailed):
            call.status = event.status
        elif isinstance(event, CallReset):
            if call.status is None:
                call.status = event.status()
        elif not isinstance(event, ResponseReceived):
            return
        call.notify()

    def _connection_lost(self, reason: str) -> None:
        if self._lost is None:
            self._lost = Status(StatusCode.UNAVAILABLE, reason)
        for call in self._calls.values():
            if call.status is None:
                call.status = self._lost
                call.notify()

    async def _start(
        self, service: ServiceDescriptor, name: str, request: Message, timeout: float | None
    ) -> _ClientCall:
        method = service.method(name)
        if type(request) is not method.request_type:
            raise TypeError(
                f"{service.path(name)} takes {method.request_type.__name__}, "
                f"not {type(request).__name__}"
            )
        if self._lost is not None:
            raise RpcError(self._lost.status_code, self._lost.status_message)
        payload = request.SerializeToString()
        conn = self._link.conn
        try:
            stream_id = conn.get_next_available_stream_id()
            conn.start_request(
                stream_id, "http", service.full_name, method.name,
                message_type=method.request_type.DESCRIPTOR.full_name,
                authority="localhost",
                timeout=None if timeout is None else datetime.timedelta(seconds=timeout),
                content_type_suffix=CONTENT_TYPE_SUFFIX,
            )
        except h2.exceptions.H2Error as exc:  # the server sent GOAWAY, or stream IDs ran out
            raise RpcError(StatusCode.UNAVAILABLE, f"{service.path(name)}: {exc}") from None
        call = _ClientCall(stream_id, service.path(name), method.response_type)
        self._calls[stream_id] = call
        try:
            await self._link.send_message(stream_id, payload)
            conn.end_request(stream_id)
        except (_StreamGone, GRPCError):
            pass  # the answer (or the loss) arrives as the call's status
        self._link.kick()
        return call

    def _end(self, call: _ClientCall) -> None:
        self._calls.pop(call.stream_id, None)
        if self._lost is not None:
            call.messages.clear()
            return
        conn = self._link.conn
        if call.status is None:
            # Leaving before the server finished: reset the stream so the server
            # cancels its handler.
            try:
                conn.reset_stream(call.stream_id, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.StreamClosedError:
                pass
        # What arrived for this call and will never be read (a stream left early, a call
        # cancelled or failed with messages queued, part of a message still coming) holds
        # connection-level credit: hand it back, or every abandoned call shrinks the
        # window all later calls share.  DATA arriving after the reset is h2's to
        # acknowledge (or _dispatch's, for a call no longer known).
        unread = sum(length for _, length in call.messages)
        call.messages.clear()
        if unread:
            conn.acknowledge_received_data(call.stream_id, unread)
        conn.drop_buffer(call.stream_id)
        self._link.kick()

    async def _receive(self, call: _ClientCall) -> Message | None:
        while True:
            if call.messages:
                data, length = call.messages.popleft()
                # Hand the flow-control credit back only as messages are consumed, so a
                # slow reader holds back a fast server instead of buffering without end.
                # Even when the call has ended (its trailers usually come in the same
                # read as its message): the stream's window is gone then, but h2 still
                # returns the credit to the connection's window, which every later call
                # on this channel shares.
                self._link.conn.acknowledge_received_data(call.stream_id, length)
                self._link.kick()
                try:
                    return call.response_type.FromString(data)
                except DecodeError as exc:
                    raise RpcError(StatusCode.INTERNAL, f"{call.path}: bad response: {exc}") from None
            if call.status is not None:
                if call.status.status_code is StatusCode.OK:
                    return None
                raise RpcError(call.status.status_code, call.status.status_message)
            await call.changed.wait()

    async def unary(
        self,
        service: ServiceDescriptor,
        name: str,
        request: Message,
        *,
        timeout: float | None = DEFAULT_CALL_TIMEOUT,
    ) -> Any:
        """Call a unary method and return its response.

        ``timeout`` (seconds) is sent as ``grpc-timeout`` and enforced here as well;
        ``None`` sends no deadline and waits as long as the connection lives (what the
        kubelet does for Allocate), so pass it only where that is what you mean.
        Raises :class:`RpcError` for any status but OK, ``DEADLINE_EXCEEDED`` when the
        time is up and ``UNAVAILABLE`` when the connection is lost.
        """
        method = service.method(name)
        if method.server_streaming:
            raise TypeError(f"{service.path(name)} is server-streaming; use server_stream()")
        try:
            with trio.fail_after(float("inf") if timeout is None else timeout):
                call = await self._start(service, name, request, timeout)
                try:
                    response = await self._receive(call)
                    if response is None:
                        raise RpcError(StatusCode.INTERNAL, f"{call.path}: no response message")
                    if await self._receive(call) is not None:
                        raise RpcError(StatusCode.INTERNAL, f"{call.path}: several response messages")
                finally:
                    self._end(call)
        except trio.TooSlowError:
            raise RpcError(
                StatusCode.DEADLINE_EXCEEDED,
                f"{service.path(name)}: no answer within {timeout or 0:g} s",
            ) from None
        return response

    @asynccontextmanager
    async def server_stream(
        self,
        service: ServiceDescriptor,
        name: str,
        request: Message,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[ResponseStream[Any]]:
        """Start a server-streaming call; iterate the messages inside the block.

        Leaving the block before the stream ended cancels the call on the server.  With
        ``timeout`` the whole call is bounded (a ListAndWatch has none by design; the
        server ending or the connection closing ends the iteration or raises
        :class:`RpcError`).
        """
        method = service.method(name)
        if not method.server_streaming:
            raise TypeError(f"{service.path(name)} is unary; use unary()")
        with trio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            call = await self._start(service, name, request, timeout)
            try:
                yield ResponseStream(self, call)
            finally:
                self._end(call)
        if scope.cancelled_caught:
            raise RpcError(
                StatusCode.DEADLINE_EXCEEDED,
                f"{service.path(name)}: did not end within {timeout:g} s",
            )


@asynccontextmanager
async def open_unix_channel(
    path: str | os.PathLike[str],
    *,
    connect_timeout: float = 10.0,
    max_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
) -> AsyncIterator[Channel]:
    """Connect to a gRPC server on a Unix socket; the connection closes with the block.

    Raises :class:`RpcError` ``UNAVAILABLE`` if the socket cannot be reached within
    ``connect_timeout`` seconds (missing, refused, or nobody accepting), and
    ``ValueError`` for a path too long for a Unix socket (a configuration error).
    """
    path = os.fspath(path)
    _check_unix_path(path)
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_unix_socket(path)
    except (OSError, trio.TooSlowError) as exc:
        reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
        raise RpcError(StatusCode.UNAVAILABLE, f"cannot connect to {path}: {reason}") from None
    channel = Channel(stream, path, max_message_length)
    async with stream:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(channel._run)
                try:
                    yield channel
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The channel's own task ends quietly (it records a lost connection as the
            # calls' status), so a group holding one exception holds the caller's: give
            # it back unwrapped, as if no nursery were involved.
            if len(group.exceptions) == 1:
                only = group.exceptions[0]
                raise only from only.__cause__
            raise
