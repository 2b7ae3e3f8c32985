"""A fake kubelet: the client side of the device-plugin API, as kubelet 1.25–1.36 does it.

It serves ``v1beta1.Registration`` on ``<socket_dir>/kubelet.sock`` and, for every
accepted ``Register``, dials the plugin back, asks ``GetDevicePluginOptions``, and keeps a
``ListAndWatch`` stream open; :meth:`FakeKubelet.admit` plays pod admission
(``GetPreferredAllocation`` and ``Allocate``) and :meth:`FakeKubelet.pre_start` a container
start.  Error texts are the kubelet's, byte for byte, and reach the plugin as gRPC status
``UNKNOWN`` the way grpc-go turns a Go error into a status.  Every rule here is the
kubelet's own code (kubernetes/kubernetes, ``pkg/kubelet/cm/devicemanager/``): the
Registration server in ``plugin/v1beta1/server.go``, the dial-back and stream in
``plugin/v1beta1/handler.go`` and ``client.go``, admission in ``manager.go``; a comment
citing a rule names the kubelet function it comes from.

Structure: :meth:`FakeKubelet.run` owns a nursery.  Each *serving generation* (one
kubelet process, in effect) is a task in it with its own nursery holding the
Registration server and one task per plugin connection; :meth:`~FakeKubelet.restart`,
:meth:`~FakeKubelet.stop` and :meth:`~FakeKubelet.kill` cancel a generation, which closes
every connection it made, exactly as a dying kubelet process does.  The state that a kubelet keeps in its
checkpoint (which resources exist, which devices are allocated) outlives generations.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import posixpath
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from .._grpc import RpcError, StatusCode
from .._transport import Channel, Service, open_unix_channel, serve_unix
from ..proto.v1beta1 import (
    DEVICE_PLUGIN,
    HEALTHY,
    REGISTRATION,
    VERSION,
    AllocateRequest,
    AllocateResponse,
    ContainerAllocateRequest,
    ContainerAllocateResponse,
    ContainerPreferredAllocationRequest,
    DevicePluginOptions,
    Empty,
    ListAndWatchResponse,
    PreferredAllocationRequest,
    PreferredAllocationResponse,
    PreStartContainerRequest,
    RegisterRequest,
)

__all__ = [
    "Admission",
    "AdmissionError",
    "FakeKubelet",
    "PreStartError",
    "RegistrationRecord",
    "ResourceState",
    "StreamEnd",
]

log = logging.getLogger("trio_gpu_plugin.testing.kubelet")

KUBELET_SOCKET_NAME: Final = "kubelet.sock"
#: Versions the kubelet accepts (``SupportedVersions`` in constants.go).
SUPPORTED_VERSIONS: Final = (VERSION,)
#: grpc-go's WithBlock dial retries with backoff until the deadline; we retry this often.
DIAL_RETRY_INTERVAL: Final = 0.1
#: The kubelet sets no deadline on GetDevicePluginOptions, GetPreferredAllocation and
#: Allocate.  The transport needs one, and a test must not hang on a plugin that never
#: answers, so these calls get a generous bound instead (seconds).
UNBOUNDED_CALL_TIMEOUT: Final = 60.0
#: ``KubeletPreStartContainerRPCTimeoutInSecs``.
PRE_START_TIMEOUT: Final = 30.0

# grpc-go's codes.Code.String(): how a status code reads inside a Go error text.
_GO_CODE_NAMES: Final = {
    StatusCode.OK: "OK",
    StatusCode.CANCELLED: "Canceled",
    StatusCode.UNKNOWN: "Unknown",
    StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    StatusCode.NOT_FOUND: "NotFound",
    StatusCode.ALREADY_EXISTS: "AlreadyExists",
    StatusCode.PERMISSION_DENIED: "PermissionDenied",
    StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    StatusCode.ABORTED: "Aborted",
    StatusCode.OUT_OF_RANGE: "OutOfRange",
    StatusCode.UNIMPLEMENTED: "Unimplemented",
    StatusCode.INTERNAL: "Internal",
    StatusCode.UNAVAILABLE: "Unavailable",
    StatusCode.DATA_LOSS: "DataLoss",
    StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

# k8s.io/apimachinery validation: IsQualifiedName's name part and IsDNS1123Subdomain.
_QUALIFIED_NAME: Final = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_QUALIFIED_NAME_MAX: Final = 63
_DNS1123_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
_DNS1123_SUBDOMAIN_MAX: Final = 253
_REQUESTS_PREFIX: Final = "requests."
_NATIVE_NAMESPACE: Final = "kubernetes.io/"


# --- what the fake saw ---------------------------------------------------------------


@dataclass(frozen=True)
class RegistrationRecord:
    """One ``Register`` call, as the kubelet handled it.

    ``endpoint``, ``version`` and ``options`` are what the plugin sent (the kubelet
    ignores ``options`` since 1.25: only ``GetDevicePluginOptions`` counts).
    ``error`` is the text the plugin got with status ``UNKNOWN``, ``None`` if accepted.
    ``at`` is ``trio.current_time()`` when the call arrived.
    """

    resource_name: str
    endpoint: str
    version: str
    options: DevicePluginOptions | None
    accepted: bool
    error: str | None
    at: float


@dataclass
class ResourceState:
    """What the kubelet knows of one extended resource (live: the fake updates it).

    ``healthy``/``unhealthy`` are the device IDs of the latest ListAndWatch message
    (after a disconnect or a kubelet restart, all of them are unhealthy);
    ``topology`` maps each listed device to its NUMA node IDs; ``options`` is the
    latest ``GetDevicePluginOptions`` answer; ``endpoint`` is the socket path of the
    latest accepted registration; ``updates`` counts ListAndWatch messages over all
    registrations; ``allocated`` holds the devices of admitted, unreleased containers.
    """

    endpoint: str
    options: DevicePluginOptions | None = None
    connected: bool = False
    healthy: set[str] = field(default_factory=set)
    unhealthy: set[str] = field(default_factory=set)
    topology: dict[str, list[int]] = field(default_factory=dict)
    updates: int = 0
    allocated: set[str] = field(default_factory=set)

    @property
    def capacity(self) -> int:
        """Node capacity for the resource: healthy plus unhealthy (as ``GetCapacity``)."""
        return len(self.healthy) + len(self.unhealthy)

    @property
    def allocatable(self) -> int:
        """Node allocatable for the resource: the healthy devices."""
        return len(self.healthy)


@dataclass(frozen=True)
class StreamEnd:
    """A ListAndWatch stream that ended while the kubelet was running.

    ``endpoint`` is the socket path of the registration whose stream ended, ``reason``
    how it ended (``"OK"`` for a clean end, else the Go-style RPC error), ``at``
    ``trio.current_time()``.  A kubelet restart or stop is not recorded here.
    """

    resource_name: str
    endpoint: str
    reason: str
    at: float


@dataclass(eq=False)
class Admission:
    """One container admitted with devices of one resource.

    ``device_ids`` were sent to ``Allocate`` (empty when ``count`` was 0, in which
    case, like the kubelet, no RPC was made and ``response`` is empty);
    ``response`` is ``container_responses[0]`` of the answer; ``preferred`` is the
    plugin's ``GetPreferredAllocation`` answer as given, or ``None`` if not asked.
    """

    resource: str
    pod: str
    container: str
    device_ids: list[str]
    response: ContainerAllocateResponse
    preferred: list[str] | None


class AdmissionError(Exception):
    """The kubelet rejected a pod at admission (reason ``UnexpectedAdmissionError``).

    Raised by :meth:`FakeKubelet.admit` wherever the real kubelet would fail the pod:
    the resource is unregistered or has no healthy or not enough free devices, or
    ``GetPreferredAllocation``/``Allocate`` failed or answered nothing.  ``error`` is
    the device manager's error, e.g. ``cannot allocate unregistered device
    nvidia.com/gpu``; ``message`` (also ``str()``) is what the pod status says,
    ``Allocate failed due to <error>, which is unexpected``.  No device was allocated.
    """

    reason: Final = "UnexpectedAdmissionError"

    def __init__(self, error: str) -> None:
        self.error = error
        self.message = f"Allocate failed due to {error}, which is unexpected"
        super().__init__(self.message)


class PreStartError(Exception):
    """``PreStartContainer`` failed, so the kubelet would not create the container.

    Raised by :meth:`FakeKubelet.pre_start`.  ``message`` (also ``str()``) is the
    kubelet's text, e.g. ``device plugin PreStartContainer rpc failed with err: rpc
    error: code = ... desc = ...``.  The devices stay allocated: the kubelet retries
    the start later with the same devices.
    """

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


# --- helpers -------------------------------------------------------------------------


def go_quote(text: str) -> str:
    """``text`` as Go's ``%q`` (strconv.Quote) writes it."""
    escapes = {"\a": r"\a", "\b": r"\b", "\f": r"\f", "\n": r"\n", "\r": r"\r",
               "\t": r"\t", "\v": r"\v", '"': r"\"", "\\": "\\\\"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def go_rpc_error(exc: RpcError) -> str:
    """An RPC failure as grpc-go's ``status.Error`` prints it inside a kubelet error."""
    code = _GO_CODE_NAMES.get(exc.code, f"Code({exc.code.value})")
    return f"rpc error: code = {code} desc = {exc.message}"


def is_extended_resource_name(name: str) -> bool:
    """``v1helper.IsExtendedResourceName`` (``pkg/apis/core/v1/helper/helpers.go``)."""
    if "/" not in name or _NATIVE_NAMESPACE in name or name.startswith(_REQUESTS_PREFIX):
        return False
    # IsQualifiedName("requests." + name)
    parts = (_REQUESTS_PREFIX + name).split("/")
    if len(parts) != 2:
        return False
    prefix, short = parts
    if len(prefix) > _DNS1123_SUBDOMAIN_MAX or not _DNS1123_SUBDOMAIN.fullmatch(prefix):
        return False
    return 0 < len(short) <= _QUALIFIED_NAME_MAX and bool(_QUALIFIED_NAME.fullmatch(short))


def _go_join(directory: str, name: str) -> str:
    """Go's ``filepath.Join(dir, name)``: no validation; an absolute ``name`` stays inside."""
    return posixpath.normpath(f"{directory}/{name}" if name else directory)


class _Failure(Exception):
    """Internal: a kubelet-side failure whose text is the Go error the kubelet returns."""


@dataclass(eq=False)
class _Generation:
    """One serving lifetime of the kubelet (from start or restart to stop)."""

    nursery: trio.Nursery
    done: trio.Event
    #: Killed rather than stopped: ``kubelet.sock`` is left behind.
    killed: bool = False


@dataclass(eq=False)
class _Client:
    """The kubelet's client of one registration: connection, options, stream."""

    request: RegisterRequest
    path: str
    at: float
    outcome: trio.Event = field(default_factory=trio.Event)
    error: str | None = None
    record: RegistrationRecord | None = None
    channel: Channel | None = None
    options: DevicePluginOptions | None = None
    # Cancelled to disconnect: ends the stream, then the task closes the connection.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: bool = False
    updates: int = 0

    @property
    def resource(self) -> str:
        return self.request.resource_name


# --- the fake ------------------------------------------------------------------------


class FakeKubelet:
    """A kubelet device manager (1.25–1.36 mainline) for device-plugin tests.

    Use it as ``await nursery.start(kubelet.run)``; point the plugin at
    :attr:`kubelet_socket` and its socket directory at :attr:`socket_dir`.  Then watch
    :attr:`registrations`, :attr:`resources` and :attr:`stream_ends`, waiting with
    :meth:`wait_until` or :meth:`wait_registered`, and drive admissions, restarts and
    stops.

    ``dial_timeout`` is how long ``Register`` keeps dialing the plugin's socket (the
    kubelet's 10 s).  ``stale_stream_teardown`` reproduces kubernetes#121994: when an
    older ListAndWatch stream of a resource ends, the kubelet disconnects whichever
    client is *current* for that resource, a newer registration included.  Turn it off
    to get per-registration teardown (roughly the 1.37 behaviour).
    """

    def __init__(
        self,
        socket_dir: str | os.PathLike[str],
        *,
        dial_timeout: float = 10.0,
        stale_stream_teardown: bool = True,
    ) -> None:
        self.socket_dir = pathlib.Path(socket_dir)
        self.kubelet_socket = self.socket_dir / KUBELET_SOCKET_NAME
        self.dial_timeout = dial_timeout
        self.stale_stream_teardown = stale_stream_teardown
        #: Every ``Register`` call, in the order the kubelet answered them.
        self.registrations: list[RegistrationRecord] = []
        #: What the kubelet knows per resource name (kept across restarts).
        self.resources: dict[str, ResourceState] = {}
        #: Every ListAndWatch stream that ended on its own or by a disconnect.
        self.stream_ends: list[StreamEnd] = []
        # The server's client per resource (s.clients): set on a successful
        # registration, removed on disconnect.  Streams of older clients may still run.
        self._clients: dict[str, _Client] = {}
        # The manager's endpoint per resource (m.endpoints): never removed, only stopped.
        self._endpoints: dict[str, _Client] = {}
        # Accepted registrations per resource, for wait_registered.
        self._accepted: dict[str, list[_Client]] = {}
        self._admissions: list[Admission] = []
        self._run_nursery: trio.Nursery | None = None
        self._generation: _Generation | None = None
        self._lifecycle = trio.Lock()
        self._admission_lock = trio.Lock()
        self._change = trio.Event()
        self._kill_in_register = False
        self._killed: _Generation | None = None

    # --- life cycle ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start like the kubelet's device manager and serve until cancelled.

        Creates :attr:`socket_dir`, deletes every socket file in it (the kubelet's
        ``CleanupPluginDirectory``), then serves ``v1beta1.Registration`` on
        :attr:`kubelet_socket`; ``task_status.started()`` once it accepts.

        Resource handling: every connection to a plugin is a task of this call; on
        exit all are closed and ``kubelet.sock`` is removed.  Error handling: whatever a
        plugin does wrong (not serving, failing calls, ending streams, bad messages)
        is recorded and logged like the kubelet does, never raised here.
        """
        if self._run_nursery is not None:
            raise RuntimeError("FakeKubelet.run() is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._run_nursery = nursery
                async with self._lifecycle:
                    await self._start_serving(nursery)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._run_nursery = None
            self._generation = None
            self._mark_stopped()

    async def restart(self) -> None:
        """Restart the kubelet; return once the new ``kubelet.sock`` accepts.

        Stops serving (the Registration server and every connection to plugins close,
        so their ListAndWatch streams end), marks every resource stopped (allocatable 0,
        capacity kept), deletes every socket file in :attr:`socket_dir` (plugin sockets
        and ``kubelet.sock``; other files stay), then serves a new ``kubelet.sock``.
        Works after :meth:`stop` too.  The registrations :meth:`wait_registered` counts
        are kept: to wait for the plugin's next one, pass ``after=`` a
        :meth:`registration_count` taken before the restart.
        """
        nursery = self._require_running()
        async with self._lifecycle:
            await self._reap()
            if self._generation is not None:
                log.info("kubelet restarting: closing every plugin connection")
                await self._stop_serving()
            await self._start_serving(nursery)
            log.info("kubelet restarted: plugins must serve their sockets again and call "
                     "Register; the kubelet never dials them by itself")

    async def stop(self) -> None:
        """Take the kubelet down without restarting it.

        Every connection closes and ``kubelet.sock`` is removed; plugin sockets stay.
        :meth:`restart` brings the kubelet back.
        """
        self._require_running()
        async with self._lifecycle:
            await self._reap()
            if await self._stop_serving():
                log.info("kubelet stopped: %s removed; plugin sockets left in place",
                         self.kubelet_socket)

    async def kill(self) -> None:
        """The kubelet is killed (SIGKILL): every connection, to plugins and to
        ``kubelet.sock``, drops at once, mid-call or not, and nothing is cleaned up:
        ``kubelet.sock`` stays behind, refusing connections, and plugin sockets stay.
        An admission in flight fails.  :meth:`restart` starts a new kubelet, which (as
        the real one) deletes every socket file first.
        """
        self._require_running()
        async with self._lifecycle:
            self.kill_now()
            await self._reap()

    def kill_now(self) -> None:
        """:meth:`kill` from synchronous code (a plugin-side callback, say), at this very
        moment: every task of this kubelet is cancelled at its next checkpoint, so an
        answer the plugin is sending now is never read.  The kubelet's bookkeeping
        (endpoints stopped) follows as soon as the tasks are gone."""
        nursery = self._require_running()
        generation = self._generation
        if generation is None:
            return
        generation.killed = True
        self._generation = None
        self._killed = generation
        log.info("kubelet killed: every connection drops; %s is left behind",
                 self.kubelet_socket)
        generation.nursery.cancel_scope.cancel(reason="the kubelet is killed")
        nursery.start_soon(self._reap_locked)

    async def _reap_locked(self) -> None:
        async with self._lifecycle:
            await self._reap()

    async def _reap(self) -> None:
        """Once a killed generation is gone, mark what it leaves (lifecycle lock held)."""
        generation, self._killed = self._killed, None
        if generation is not None:
            await generation.done.wait()
            self._mark_stopped()

    def kill_during_next_register(self) -> None:
        """Arm a crash: the next ``Register`` is handled (the plugin dialled back, its
        stream opened) and then, before ``Register`` answers, the kubelet is killed
        (:meth:`kill`)."""
        self._kill_in_register = True

    def _require_running(self) -> trio.Nursery:
        if self._run_nursery is None:
            raise RuntimeError("FakeKubelet.run() is not running; start it first with "
                               "await nursery.start(kubelet.run)")
        return self._run_nursery

    async def _start_serving(self, nursery: trio.Nursery) -> None:
        # MkdirAll, CleanupPluginDirectory, listen: the server's Start (server.go).
        self.socket_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        removed = self._cleanup_plugin_directory()
        if removed:
            log.info("removed %d socket file(s) from %s: %s", len(removed), self.socket_dir,
                     ", ".join(removed))
        await nursery.start(self._serve_generation)

    async def _stop_serving(self) -> bool:
        """End the current generation, if any; True if there was one."""
        generation = self._generation
        if generation is None:
            return False
        self._generation = None
        generation.nursery.cancel_scope.cancel(reason="the kubelet stops serving")
        await generation.done.wait()
        self._mark_stopped()
        return True

    def _cleanup_plugin_directory(self) -> list[str]:
        # Like the kubelet: os.Stat (which follows links), skip directories and
        # anything that is not a socket; the checkpoint and a stale DEPRECATION stay.
        removed = []
        for entry in sorted(os.scandir(self.socket_dir), key=lambda e: e.name):
            try:
                if stat.S_ISSOCK(os.stat(entry.path).st_mode):
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except FileNotFoundError:
                continue  # a dangling link, or gone meanwhile
        return removed

    async def _serve_generation(self, task_status: trio.TaskStatus[None]) -> None:
        done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                generation = _Generation(nursery, done)

                async def register(request: RegisterRequest) -> Empty:
                    return await self._register(generation, request)

                await nursery.start(functools.partial(
                    serve_unix, self.kubelet_socket,
                    [Service(REGISTRATION, {"Register": register})],
                    remove_on_exit=lambda: not generation.killed))
                self._generation = generation
                log.info("kubelet serving v1beta1.Registration on %s", self.kubelet_socket)
                task_status.started()
        finally:
            done.set()

    def _mark_stopped(self) -> None:
        """What a kubelet (re)start leaves: every endpoint stopped, no device healthy."""
        self._clients.clear()
        for client in self._endpoints.values():
            client.stopped = True
        for name, state in self.resources.items():
            if state.healthy or state.connected:
                log.info("%s: endpoint stopped; %d device(s) now unhealthy (allocatable 0, "
                         "capacity %d)", name, len(state.healthy), state.capacity)
            state.unhealthy |= state.healthy
            state.healthy = set()
            state.connected = False
        self._changed()

    # --- registration ----------------------------------------------------------------

    async def _register(self, generation: _Generation, request: RegisterRequest) -> Empty:
        at = trio.current_time()
        name = request.resource_name
        log.info("Register: resource %r, endpoint %r, version %r", name, request.endpoint,
                 request.version)
        # The version first, then the name: the server's Register (server.go).
        error: str | None = None
        if request.version not in SUPPORTED_VERSIONS:
            error = (f"requested API version {go_quote(request.version)} is not supported by "
                     f"kubelet. Supported version is "
                     f"[{', '.join(go_quote(v) for v in SUPPORTED_VERSIONS)}]")
        elif not is_extended_resource_name(name):
            error = f"the ResourceName {go_quote(name)} is invalid"
        if error is not None:
            self._record(request, at, error)
            raise RpcError(StatusCode.UNKNOWN, error)
        client = _Client(request, _go_join(os.fspath(self.socket_dir), request.endpoint), at)
        # The connection belongs to the kubelet, not to this call: if the plugin gives
        # up on Register (its deadline), the kubelet still completes the registration,
        # as the 1.25–1.3x kubelet (which dials with a context of its own) does.
        generation.nursery.start_soon(self._run_client, client)
        await client.outcome.wait()
        if self._kill_in_register:
            self._kill_in_register = False
            log.info("Register of %r: killing the kubelet before it answers", name)
            self.kill_now()
            await trio.sleep_forever()  # ends with the generation
        if client.error is not None:
            raise RpcError(StatusCode.UNKNOWN, client.error)
        return Empty()

    def _record(
        self, request: RegisterRequest, at: float, error: str | None
    ) -> RegistrationRecord:
        record = RegistrationRecord(
            resource_name=request.resource_name,
            endpoint=request.endpoint,
            version=request.version,
            options=request.options,
            accepted=error is None,
            error=error,
            at=at,
        )
        self.registrations.append(record)
        if error is not None:
            log.warning("Register of %r (endpoint %r) rejected: %s", request.resource_name,
                        request.endpoint, error)
        self._changed()
        return record

    async def _run_client(self, client: _Client) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    channel = await self._dial(stack, client.path)
                    options = await self._get_options(channel)
                except _Failure as exc:
                    client.error = str(exc)
                    self._record(client.request, client.at, client.error)
                    return
                except trio.Cancelled:
                    client.error = "the kubelet stopped while handling this registration"
                    self._record(client.request, client.at, client.error)
                    raise
                self._connected(client, channel, options)
                await self._list_and_watch(client, channel)
        finally:
            client.stopped = True
            # The connection is closed: drop it, or the registration history (kept for
            # tests to inspect) holds every closed connection's HTTP/2 state forever.
            client.channel = None
            if not client.outcome.is_set():
                if client.error is None:
                    client.error = "the kubelet failed while handling this registration"
                client.outcome.set()
            self._changed()

    async def _dial(self, stack: contextlib.AsyncExitStack, path: str) -> Channel:
        # grpc.DialContext(WithBlock) with a 10 s timeout: connection attempts go on
        # until the deadline, so a socket that appears within it still works.
        deadline = trio.current_time() + self.dial_timeout
        attempts = 0
        while True:
            attempts += 1
            try:
                return await stack.enter_async_context(open_unix_channel(
                    path, connect_timeout=max(deadline - trio.current_time(), 0.001)))
            except (RpcError, ValueError) as exc:  # ValueError: path too long for AF_UNIX
                last = str(exc)
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            await trio.sleep(min(DIAL_RETRY_INTERVAL, remaining))
        log.warning("cannot reach the device plugin at %s within %g s (%d attempt(s), last: %s); "
                    "a plugin must serve its socket before it calls Register", path,
                    self.dial_timeout, attempts, last)
        raise _Failure("failed to dial device plugin: context deadline exceeded")

    async def _get_options(self, channel: Channel) -> DevicePluginOptions:
        try:
            options: DevicePluginOptions = await channel.unary(
                DEVICE_PLUGIN, "GetDevicePluginOptions", Empty(), timeout=UNBOUNDED_CALL_TIMEOUT)
        except RpcError as exc:
            raise _Failure(f"failed to get device plugin options: {go_rpc_error(exc)}") from None
        return options

    def _connected(self, client: _Client, channel: Channel, options: DevicePluginOptions) -> None:
        name = client.resource
        client.channel = channel
        client.options = options
        # Overwrites any previous client and endpoint of the name without closing them
        # (the server's registerClient and the manager's PluginConnected): an older
        # stream keeps running and keeps updating the table.
        previous = self._clients.get(name)
        self._clients[name] = client
        self._endpoints[name] = client
        self._accepted.setdefault(name, []).append(client)
        state = self.resources.get(name)
        if state is None:
            state = self.resources[name] = ResourceState(endpoint=client.path)
        state.endpoint = client.path
        state.options = options
        state.connected = True
        client.record = self._record(client.request, client.at, None)
        log.info("registered device plugin %s at %s (pre_start_required=%s, "
                 "get_preferred_allocation_available=%s)%s", name, client.path,
                 options.pre_start_required, options.get_preferred_allocation_available,
                 f"; replaces {previous.path}, whose stream is left running"
                 if previous is not None else "")
        client.outcome.set()

    async def _list_and_watch(self, client: _Client, channel: Channel) -> None:
        # Started right away, without waiting for Register's answer to go out: the
        # plugin may see ListAndWatch before its Register call returns (the server's
        # connectClient starts runClient, the stream, before Register answers).
        reason = "OK"
        with client.scope:
            try:
                async with channel.server_stream(DEVICE_PLUGIN, "ListAndWatch", Empty()) as stream:
                    async for message in stream:
                        self._apply(client, message)
            except RpcError as exc:
                reason = go_rpc_error(exc)
        if client.scope.cancelled_caught:
            reason = "the kubelet closed the connection"
        self._stream_ended(client, reason)

    def _apply(self, client: _Client, message: ListAndWatchResponse) -> None:
        if client.stopped:
            return  # queued before a disconnect; the kubelet would not read it any more
        name = client.resource
        state = self.resources[name]
        # Each message replaces the table; only the exact string "Healthy" is healthy.
        healthy: set[str] = set()
        unhealthy: set[str] = set()
        topology: dict[str, list[int]] = {}
        for device in message.devices:
            (healthy if device.health == HEALTHY else unhealthy).add(device.ID)
            topology[device.ID] = (
                [node.ID for node in device.topology.nodes] if device.topology else [])
        changed = (healthy, unhealthy) != (state.healthy, state.unhealthy)
        state.healthy, state.unhealthy, state.topology = healthy, unhealthy, topology
        state.updates += 1
        client.updates += 1
        (log.info if changed else log.debug)(
            "%s: %d device(s), %d healthy, %d unhealthy (ListAndWatch update from %s)",
            name, len(healthy) + len(unhealthy), len(healthy), len(unhealthy), client.path)
        self._changed()

    def _stream_ended(self, client: _Client, reason: str) -> None:
        name = client.resource
        log.warning("ListAndWatch ended unexpectedly for device plugin %s (%s: %s)", name,
                    client.path, reason)
        self.stream_ends.append(StreamEnd(name, client.path, reason, trio.current_time()))
        current = self._clients.get(name)
        if self.stale_stream_teardown:
            # runClient looks the client up by name (kubernetes#121994).
            if current is not None and current is not client:
                log.warning("%s: the ended stream was from the older registration at %s; "
                            "tearing down the current one at %s (kubernetes#121994); that "
                            "plugin must register again", name, client.path, current.path)
            target = current
        else:
            target = client if current is client else None
        if target is not None:
            self._disconnect(target)
        else:
            self._changed()

    def _disconnect(self, client: _Client) -> None:
        name = client.resource
        if self._clients.get(name) is client:
            del self._clients[name]
        client.stopped = True
        # Ends its stream; its task then closes the connection.
        client.scope.cancel(reason=f"the kubelet disconnects {client.path}")
        state = self.resources[name]
        log.info("disconnected device plugin %s at %s: %d device(s) now unhealthy "
                 "(allocatable 0, capacity %d); the kubelet will not reconnect, the plugin "
                 "must call Register again", name, client.path, len(state.healthy),
                 state.capacity)
        state.unhealthy |= state.healthy
        state.healthy = set()
        state.connected = False
        self._changed()

    # --- waiting ---------------------------------------------------------------------

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` is true, re-checking it on every state change.

        State changes are registrations, ListAndWatch messages, stream ends and
        disconnects, restarts, admissions and releases.  Raises ``trio.TooSlowError``
        after ``timeout`` seconds.
        """
        with trio.fail_after(timeout):
            while not predicate():
                await self._change.wait()

    def registration_count(self, resource: str) -> int:
        """How many registrations of ``resource`` the kubelet has accepted so far, across
        restarts: the mark to pass as ``after=`` to :meth:`wait_registered`."""
        return len(self._accepted.get(resource, []))

    async def wait_registered(
        self, resource: str, *, count: int = 1, after: int = 0, timeout: float = 10.0
    ) -> RegistrationRecord:
        """Wait for ``count`` accepted registrations of ``resource`` beyond the first
        ``after``, and for the first ListAndWatch message of the latest; return that
        registration's record.

        Registrations are counted from the kubelet's start, restarts included, so once
        a plugin has registered, ``wait_registered(r)`` returns at once.  To wait for
        the *next* one (after :meth:`restart`, say), take the mark before causing it::

            mark = kubelet.registration_count(r)
            await kubelet.restart()
            await kubelet.wait_registered(r, after=mark)
        """
        if count < 1 or after < 0:
            raise ValueError(f"wait_registered needs count >= 1 and after >= 0, "
                             f"not count={count}, after={after}")
        needed = after + count

        def ready() -> bool:
            accepted = self._accepted.get(resource, [])
            return len(accepted) >= needed and accepted[-1].updates > 0

        await self.wait_until(ready, timeout=timeout)
        record = self._accepted[resource][-1].record
        assert record is not None  # set when the client was accepted
        return record

    # --- admission and container start -----------------------------------------------

    async def admit(
        self, resource: str, count: int, *, pod: str = "pod", container: str = "ctr"
    ) -> Admission:
        """Admit one container asking for ``count`` devices of ``resource``.

        The kubelet's ``devicesToAllocate`` without topology hints (``manager.go``):
        the checks, ``GetPreferredAllocation`` if the plugin's options ask
        for it, then one ``Allocate``.  Admissions are serial, as in the kubelet's sync
        loop.  Raises :class:`AdmissionError` with the kubelet's text when the pod
        would be rejected.  The chosen devices stay allocated until :meth:`release`.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        async with self._admission_lock:
            try:
                admission = await self._admit(resource, count, pod, container)
            except _Failure as exc:
                error = AdmissionError(str(exc))
                log.warning("pod %s container %s rejected: %s", pod, container, error.message)
                raise error from None
            self._admissions.append(admission)
        self._changed()
        return admission

    async def _admit(self, resource: str, count: int, pod: str, container: str) -> Admission:
        state = self.resources.get(resource)
        # "Registered" means the kubelet holds a device table for it: from the first
        # ListAndWatch message on (or restored from its checkpoint).
        if state is None or state.updates == 0:
            raise _Failure(f"cannot allocate unregistered device {resource}")
        # Checked even when count is 0 (kubernetes#128854).
        if not state.healthy:
            raise _Failure("no healthy devices present; cannot allocate unhealthy devices "
                           f"{resource}")
        if count == 0:
            # Nothing to allocate: the kubelet makes no call.
            return Admission(resource, pod, container, [], ContainerAllocateResponse(), None)
        available = sorted(state.healthy - state.allocated)
        if len(available) < count:
            raise _Failure(f"requested number of devices unavailable for {resource}. "
                           f"Requested: {count}, Available: {len(available)}")
        endpoint = self._endpoints[resource]
        options = endpoint.options or DevicePluginOptions()
        preferred: list[str] | None = None
        if options.get_preferred_allocation_available:
            preferred = await self._preferred(endpoint, available, count)
        # The preferred devices that are available, up to count; then the rest.
        chosen: list[str] = []
        candidates = set(available)
        for device in [*(preferred or []), *available]:
            if len(chosen) == count:
                break
            if device in candidates and device not in chosen:
                chosen.append(device)
        response = await self._allocate(endpoint, chosen)
        state.allocated.update(chosen)
        log.info("pod %s container %s admitted with %s %s", pod, container, resource, chosen)
        return Admission(resource, pod, container, chosen, response, preferred)

    async def _preferred(self, endpoint: _Client, available: list[str], count: int) -> list[str]:
        prefix = "device plugin GetPreferredAllocation rpc failed with err: "
        channel = self._channel(endpoint, prefix)
        request = PreferredAllocationRequest(container_requests=[
            ContainerPreferredAllocationRequest(
                available_deviceIDs=list(available), must_include_deviceIDs=[],
                allocation_size=count)])
        try:
            response: PreferredAllocationResponse = await channel.unary(
                DEVICE_PLUGIN, "GetPreferredAllocation", request, timeout=UNBOUNDED_CALL_TIMEOUT)
        except RpcError as exc:
            raise _Failure(prefix + go_rpc_error(exc)) from None
        if not response.container_responses:
            return []
        return list(response.container_responses[0].deviceIDs)

    async def _allocate(
        self, endpoint: _Client, device_ids: list[str]
    ) -> ContainerAllocateResponse:
        channel = self._channel(endpoint, "")
        request = AllocateRequest(container_requests=[ContainerAllocateRequest(
            devices_ids=list(device_ids))])
        try:
            response: AllocateResponse = await channel.unary(
                DEVICE_PLUGIN, "Allocate", request, timeout=UNBOUNDED_CALL_TIMEOUT)
        except RpcError as exc:
            raise _Failure(go_rpc_error(exc)) from None
        if not response.container_responses:
            # The kubelet prints the Go struct here; this is the Python repr.
            raise _Failure(f"no containers return in allocation response {response!r}")
        return response.container_responses[0]

    @staticmethod
    def _channel(endpoint: _Client, prefix: str) -> Channel:
        if endpoint.stopped or endpoint.channel is None:
            raise _Failure(f"{prefix}endpoint {endpoint.path} has been stopped")
        return endpoint.channel

    def release(self, admission: Admission) -> None:
        """The container is gone: its devices are free for later admissions."""
        for index, active in enumerate(self._admissions):
            if active is admission:
                del self._admissions[index]
                break
        else:
            raise ValueError(f"{admission!r} is not an active admission of this kubelet")
        state = self.resources.get(admission.resource)
        if state is not None:
            state.allocated.difference_update(admission.device_ids)
        log.info("pod %s container %s released %s %s", admission.pod, admission.container,
                 admission.resource, admission.device_ids)
        self._changed()

    async def pre_start(self, admission: Admission) -> None:
        """Start the admitted container: ``PreStartContainer`` first if the plugin's
        options ask for it (30 s timeout, like the kubelet).

        Raises :class:`PreStartError` with the kubelet's text if the call fails.
        """
        if not any(active is admission for active in self._admissions):
            raise ValueError(f"{admission!r} is not an active admission of this kubelet")
        if not admission.device_ids:
            return  # a limit of 0: the kubelet does not look at the resource
        endpoint = self._endpoints.get(admission.resource)
        if endpoint is None:
            raise PreStartError(
                f"endpoint not found in cache for a registered resource: {admission.resource}")
        if endpoint.options is None or not endpoint.options.pre_start_required:
            return
        prefix = "device plugin PreStartContainer rpc failed with err: "
        try:
            channel = self._channel(endpoint, prefix)
        except _Failure as exc:
            raise PreStartError(str(exc)) from None
        deadline = trio.current_time() + PRE_START_TIMEOUT
        try:
            await channel.unary(DEVICE_PLUGIN, "PreStartContainer",
                                PreStartContainerRequest(devices_ids=list(admission.device_ids)),
                                timeout=PRE_START_TIMEOUT)
        except RpcError as exc:
            if exc.code is StatusCode.DEADLINE_EXCEEDED and trio.current_time() >= deadline:
                # Our own deadline, as grpc-go reports a context timeout.
                text = "rpc error: code = DeadlineExceeded desc = context deadline exceeded"
            else:
                text = go_rpc_error(exc)
            log.warning("pod %s container %s cannot start: %s%s", admission.pod,
                        admission.container, prefix, text)
            raise PreStartError(prefix + text) from None
