"""``--metrics-address``: Prometheus metrics and liveness/readiness probes over HTTP/1.1.

Optional: this module imports ``h11`` and ``prometheus_client`` (the ``metrics`` extra) at
import time, so the runtime must import it only when ``--metrics-address`` is given; the
plugin runs without either package when the feature is off.

Three pieces:

* :class:`Metrics`: the plugin's counters, gauges and histogram on a registry of its own
  (never prometheus_client's global one: an embedder may run several plugins in one
  process), recorded through plain, fast methods that do no I/O.  Labels are bounded:
  resource names, gRPC method names, event kinds and XID codes, never device IDs.
* :class:`HealthStatus`: what ``/healthz`` and ``/readyz`` answer (available as
  :attr:`Metrics.health`): on each probe it runs every resource's live check, which the
  runtime hands over (:meth:`Metrics.set_live_check`), and applies the probe's rules.
* :func:`serve_metrics`: an h11 server on trio answering ``GET``/``HEAD`` for
  ``/healthz``, ``/readyz`` and ``/metrics``, one task per connection, with keep-alive,
  bounded requests and an idle timeout.  :func:`parse_address` parses the flag's
  ``HOST:PORT``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from typing import Final, Literal, NoReturn

import h11
import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ._observe import LiveCheck, Observer, Problem
from ._version import __version__

__all__ = [
    "IDLE_TIMEOUT",
    "LIVENESS_GRACE",
    "LIVE_CHECK_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "NVML_EVENT_KINDS",
    "RPC_BUCKETS",
    "HealthStatus",
    "Metrics",
    "parse_address",
    "serve_metrics",
]

log = logging.getLogger("trio_gpu_plugin.metrics")

#: Histogram buckets for gRPC handling time, in seconds: sub-millisecond to seconds.
RPC_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)

#: The ``kind`` label values of ``trio_gpu_plugin_nvml_events_total``; anything else is
#: counted as ``"other"`` so the label stays bounded.
NVML_EVENT_KINDS: Final = frozenset({"xid", "ecc-dbe", "gpu-unavailable"})

#: Seconds a connection may take to send a complete request (or sit idle between
#: keep-alive requests) before it is closed.
IDLE_TIMEOUT: Final = 30.0

#: Largest request line plus headers accepted (h11 answers 431/400 beyond it).
MAX_HEADER_BYTES: Final = 8 * 1024

#: Largest request body read (the probes take none); beyond it the answer is 413.
MAX_BODY_BYTES: Final = 64 * 1024

#: Bound on one resource's live check, in seconds: its dial and its gRPC call.  Below the
#: probes' ``timeoutSeconds`` (2 s in k8s/daemonset.yaml) with room for the HTTP
#: exchange, so that a server that does not answer shows up as a 503 naming it rather
#: than as a probe timeout that names nothing.  GetDevicePluginOptions is answered from
#: memory: a dial and the call take milliseconds even on a node throttled to the
#: DaemonSet's 200m CPU, so 1 s does not fail a server that is merely slow.
LIVE_CHECK_TIMEOUT: Final = 1.0

#: How long liveness forgives a state the plugin repairs by itself (not registered yet,
#: the kubelet not watching yet, a kubelet.sock replaced but not yet re-registered
#: with), in seconds; readiness forgives nothing.  After a kubelet restart the plugin
#: normally registers again within milliseconds, but one Register may legitimately take
#: up to REGISTER_TIMEOUT (30 s: the kubelet dials back for up to 10 s inside it), and a
#: refused one is retried with back-off capped at 30 s.  Failing liveness inside that
#: window would restart a plugin that is about to succeed, and the restart costs another
#: registration.  With the DaemonSet's liveness (every 10 s, failureThreshold 3) a state
#: that lasts restarts the pod some 50 to 60 s after it began.
LIVENESS_GRACE: Final = 30.0

# A check that ignores its timeout is abandoned this much later (seconds).
_CHECK_SLACK: Final = 0.5
_RECEIVE_SIZE: Final = 16 * 1024
_CLOSE_GRACE: Final = 2.0
_TEXT: Final = b"text/plain; charset=utf-8"
_SERVER: Final = f"trio-gpu-plugin/{__version__}".encode("ascii", "replace")


# --- health state ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ResourceState:
    registered: bool
    serving: bool
    reason: str


@dataclasses.dataclass(eq=False)
class _Flight:
    """One round of live checks, which every probe arriving meanwhile shares."""

    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    #: By resource; ``None`` if the request running the round was cancelled first.
    found: dict[str, list[Problem]] | None = None


class HealthStatus:
    """What the probes answer: live checks, run on each probe, and reported state.

    Each resource either has a live check (:meth:`set_live_check`; what
    :class:`~trio_gpu_plugin.DevicePlugin` gives) or only reported flags
    (:meth:`set_resource`); a live check, when there is one, decides.  Every probe runs
    the checks anew, all resources at once, each within ``check_timeout`` seconds;
    probes that arrive while a round is running share it, so concurrent probes never
    add dials.  The round runs in the probing request's own task: a slow one holds up
    only the probes waiting for it, never the server's other requests.

    Until a resource is known the probes fail with why: ``NVML unavailable: <error>``
    while NVML was last reported down (the plugin builds its resources from what NVML
    finds, so none can come before it answers), else ``starting: no resource known yet``.
    Once resources are known, each resource's lines name it and say why (its live check
    waits for the kubelet, names the kubelet's refusal, a socket another process holds).

    Liveness (:meth:`healthz`) is ok when at least one resource is known and none has a
    problem, except problems the plugin repairs by itself (:attr:`Problem.since`) that
    began less than ``grace`` seconds ago, once a probe has been answered ok: before
    that the first registration is what we wait for, and the startupProbe (which asks
    ``/healthz`` too) must not pass until it is done.  Readiness (:meth:`readyz`)
    forgives nothing and additionally fails while NVML was last reported down
    (:meth:`set_nvml`); NVML that was never reported (a simulated node, or before the
    first report) does not hold readiness back.  NVML is left out of liveness on
    purpose: restarting the plugin does not repair a driver.
    """

    def __init__(self, *, check_timeout: float = LIVE_CHECK_TIMEOUT,
                 grace: float = LIVENESS_GRACE) -> None:
        self.check_timeout = check_timeout
        self.grace = grace
        self._resources: dict[str, _ResourceState] = {}
        self._checks: dict[str, LiveCheck] = {}
        self._nvml_up: bool | None = None
        self._nvml_reason = ""
        self._flight: _Flight | None = None
        # Whether /healthz last answered ok, to log when that changes (the kubelet's
        # probe events never show our answer, only "statuscode: 503").
        self._live_ok: bool | None = None
        self._failure_logged = False
        # Set once a probe has been answered ok: the grace applies from then on.
        self._started = False

    def set_resource(self, resource: str, registered: bool, serving: bool, reason: str) -> None:
        """Record the state of ``resource`` (for example ``nvidia.com/gpu``): whether it is
        registered with the kubelet, whether its server answers, and why not (may be
        empty).  Used only while ``resource`` has no live check."""
        self._resources[resource] = _ResourceState(registered, serving, reason)

    def set_live_check(self, resource: str, check: LiveCheck) -> None:
        """Ask ``check`` about ``resource`` on every probe (replacing any earlier one)."""
        self._checks[resource] = check

    def forget_resource(self, resource: str) -> None:
        """Stop accounting for ``resource`` (it was removed from the configuration)."""
        self._resources.pop(resource, None)
        self._checks.pop(resource, None)

    def set_nvml(self, up: bool, reason: str = "") -> None:
        """Record whether NVML answers (readiness only)."""
        self._nvml_up = up
        self._nvml_reason = reason

    async def _look(self) -> dict[str, list[Problem]]:
        """Every live check's problems, from a round started now or already running."""
        while True:
            flight = self._flight
            if flight is None:
                flight = self._flight = _Flight()
                try:
                    flight.found = await self._round(dict(self._checks))
                finally:
                    # Even when this request is cancelled: the probes sharing the round
                    # must not wait for ever (they see no result and run their own).
                    self._flight = None
                    flight.done.set()
            else:
                await flight.done.wait()
            if flight.found is not None:
                return flight.found

    async def _round(self, checks: dict[str, LiveCheck]) -> dict[str, list[Problem]]:
        found: dict[str, list[Problem]] = {}
        async with trio.open_nursery() as nursery:
            for name, check in checks.items():
                nursery.start_soon(self._check_one, name, check, found)
        return found

    async def _check_one(self, name: str, check: LiveCheck,
                         found: dict[str, list[Problem]]) -> None:
        limit = self.check_timeout + _CHECK_SLACK
        with trio.move_on_after(limit):
            try:
                found[name] = await check(self.check_timeout)
            except Exception as exc:
                # A bug in a check must not take the HTTP server (and the plugin with
                # it) down; failing the probe, saying why, is the right answer.
                log.exception("%s: the live health check failed", name)
                found[name] = [Problem(f"the health check failed: {type(exc).__name__}: {exc}")]
            return
        found[name] = [Problem(f"the health check did not finish within {limit:g} s")]

    async def _problems(self, probe: Literal["liveness", "readiness"]) -> list[str]:
        if not self._resources and not self._checks:
            await trio.lowlevel.checkpoint()
            if self._nvml_up is False:
                # The commonest reason a fresh pod has no resource: no driver.  It is what
                # `kubectl describe pod` shows of a failing probe, so say it.
                return [f"NVML unavailable: {self._nvml_reason or 'no reason given'}"]
            return ["starting: no resource known yet"]
        found = await self._look() if self._checks else {}
        now = trio.current_time()
        problems = []
        for name in sorted(self._resources.keys() | self._checks.keys()):
            if name in self._checks:
                # A check set while the round ran (a reload) is not in it: not known yet.
                unchecked = [Problem("not checked yet", since=now)]
                for problem in found.get(name, unchecked):
                    transient = (self._started and problem.since is not None
                                 and now - problem.since < self.grace)
                    if probe == "readiness" or not transient:
                        problems.append(f"{name}: {problem.text}")
                continue
            state = self._resources[name]
            what = [w for w, bad in (("not registered", not state.registered),
                                     ("not serving", not state.serving)) if bad]
            if what:
                line = f"{name}: {', '.join(what)}"
                if state.reason:
                    line += f": {state.reason}"
                problems.append(line)
        return problems

    async def healthz(self) -> tuple[bool, str]:
        """``(ok, text)`` for the liveness probe; ``text`` lists the problems, one a line."""
        ok, text = _verdict(await self._problems("liveness"))
        if not ok and self._live_ok:
            self._failure_logged = True
            log.warning("/healthz now fails, and the kubelet restarts the plugin if it goes on "
                        "failing (the livenessProbe's failureThreshold): %s",
                        "; ".join(text.splitlines()))
        elif ok and self._live_ok is False and self._failure_logged:
            log.info("/healthz is ok again")
        self._live_ok = ok
        self._started = self._started or ok
        return ok, text

    async def readyz(self) -> tuple[bool, str]:
        """``(ok, text)`` for the readiness probe: every problem, forgiving none, plus NVML
        down."""
        problems = await self._problems("readiness")
        if self._nvml_up is False and (self._resources or self._checks):
            problems.append(f"nvml: down: {self._nvml_reason}" if self._nvml_reason
                            else "nvml: down")
        ok, text = _verdict(problems)
        self._started = self._started or ok
        return ok, text


def _verdict(problems: list[str]) -> tuple[bool, str]:
    if problems:
        return False, "".join(f"{p}\n" for p in problems)
    return True, "ok\n"


# --- metrics -----------------------------------------------------------------------------


class Metrics(Observer):
    """The plugin's metrics on a :class:`prometheus_client.CollectorRegistry` of its own.

    Implements :class:`~trio_gpu_plugin._observe.Observer`.  Every recording method is
    synchronous, cheap and does no I/O, so the runtime can call it from any task.
    :attr:`health` holds the probe state served next to the metrics;
    :meth:`set_resource` and :meth:`forget_resource` update it.
    """

    def __init__(self) -> None:
        self.registry: Final = CollectorRegistry(auto_describe=True)
        self.health: Final = HealthStatus()
        r = self.registry
        self._registrations = Counter(
            "trio_gpu_plugin_registrations_total",
            "Successful registrations with the kubelet.", ["resource"], registry=r)
        self._kubelet_restarts = Counter(
            "trio_gpu_plugin_kubelet_restarts_total",
            "Registration epochs ended because kubelet.sock was recreated or removed.",
            ["resource"], registry=r)
        self._rpc_requests = Counter(
            "trio_gpu_plugin_rpc_requests_total",
            "Device plugin gRPC requests handled, by outcome.",
            ["method", "resource", "code"], registry=r)
        self._rpc_duration = Histogram(
            "trio_gpu_plugin_rpc_duration_seconds",
            "Time to handle a device plugin gRPC request.",
            ["method", "resource"], buckets=RPC_BUCKETS, registry=r)
        self._nvml_events = Counter(
            "trio_gpu_plugin_nvml_events_total",
            "NVML health events received (xid is empty when the event is not an XID).",
            ["kind", "xid"], registry=r)
        self._health_transitions = Counter(
            "trio_gpu_plugin_health_transitions_total",
            "Health unit transitions, by the state entered.", ["to"], registry=r)
        self._devices = Gauge(
            "trio_gpu_plugin_devices",
            "Devices advertised to the kubelet, by health.", ["resource", "health"],
            registry=r)
        self._nvml_up = Gauge(
            "trio_gpu_plugin_nvml_up", "1 when NVML answers, 0 otherwise.", registry=r)
        self._recovery_actions = Gauge(
            "trio_gpu_plugin_gpu_recovery_action",
            "The recovery action the driver asks for, per GPU (1 on the series of the "
            "current action; only where the driver reports NVML_FI_DEV_GET_GPU_RECOVERY_ACTION).",
            ["gpu", "action"], registry=r)
        self._action_of: dict[str, str] = {}
        for to in ("healthy", "unhealthy"):
            self._health_transitions.labels(to=to)

    def registered(self, resource: str) -> None:
        """Count a successful registration of ``resource`` with the kubelet."""
        self._registrations.labels(resource=resource).inc()

    def kubelet_restart(self, resource: str) -> None:
        """Count an epoch of ``resource`` ended by kubelet.sock being recreated/removed."""
        self._kubelet_restarts.labels(resource=resource).inc()

    def rpc(self, method: str, resource: str, seconds: float, ok: bool) -> None:
        """Record one gRPC request: ``method`` (e.g. ``"Allocate"``) took ``seconds``."""
        self._rpc_requests.labels(
            method=method, resource=resource, code="ok" if ok else "error").inc()
        self._rpc_duration.labels(method=method, resource=resource).observe(seconds)

    def nvml_event(self, xid: int | None, kind: str) -> None:
        """Count an NVML event of ``kind`` (``"xid"``, ``"ecc-dbe"``,
        ``"gpu-unavailable"``; others count as ``"other"``), with its XID code if any."""
        self._nvml_events.labels(
            kind=kind if kind in NVML_EVENT_KINDS else "other",
            xid="" if xid is None else str(xid)).inc()

    def health_transition(self, unit: str, healthy: bool, reason: str) -> None:
        """Count a health unit becoming healthy or unhealthy.

        ``unit`` and ``reason`` are accepted for the caller's convenience but not used as
        labels (unbounded cardinality); the runtime logs them.
        """
        del unit, reason
        self._health_transitions.labels(to="healthy" if healthy else "unhealthy").inc()

    def recovery_action(self, gpu: str, action: str) -> None:
        """Show GPU ``gpu``'s current recovery action (one series per GPU)."""
        previous = self._action_of.get(gpu)
        if previous is not None and previous != action:
            self._recovery_actions.remove(gpu, previous)
        self._action_of[gpu] = action
        self._recovery_actions.labels(gpu=gpu, action=action).set(1)

    def set_devices(self, resource: str, healthy: int, unhealthy: int) -> None:
        """Set how many devices of ``resource`` are advertised healthy and unhealthy."""
        self._devices.labels(resource=resource, health="healthy").set(healthy)
        self._devices.labels(resource=resource, health="unhealthy").set(unhealthy)

    def forget_devices(self, resource: str) -> None:
        """Drop ``resource``'s device gauges (the resource is gone)."""
        for health in ("healthy", "unhealthy"):
            try:
                self._devices.remove(resource, health)
            except KeyError:
                pass

    def set_resource(self, resource: str, registered: bool, serving: bool, reason: str) -> None:
        """Record ``resource``'s registration and server state for the probes
        (:meth:`HealthStatus.set_resource`)."""
        self.health.set_resource(resource, registered, serving, reason)

    def set_live_check(self, resource: str, check: LiveCheck) -> None:
        """Run ``check`` for ``resource`` on every probe
        (:meth:`HealthStatus.set_live_check`)."""
        self.health.set_live_check(resource, check)

    def forget_resource(self, resource: str) -> None:
        """``resource`` is no longer served: drop it from the probes and drop its device
        gauges (its counters stay, as counters do)."""
        self.health.forget_resource(resource)
        self.forget_devices(resource)

    def nvml_up(self, up: bool, reason: str = "") -> None:
        """Set ``trio_gpu_plugin_nvml_up`` and the readiness NVML state."""
        self._nvml_up.set(1 if up else 0)
        self.health.set_nvml(up, reason)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return prometheus_client.generate_latest(self.registry)


# --- address -----------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``:PORT`` (every interface: host ``""``) or ``[IPV6]:PORT``.

    Raises :class:`ValueError` naming the problem.
    """
    if not text:
        raise ValueError("empty address: expected HOST:PORT, :PORT or [IPV6]:PORT")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: missing ':PORT' after ']'")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: missing ':PORT' (expected HOST:PORT or :PORT)")
        if ":" in host:
            raise ValueError(f"{text!r}: an IPv6 address needs brackets, e.g. [::1]:PORT")
    if not port_text:
        raise ValueError(f"{text!r}: missing port after ':'")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range 1-65535")
    return host, port


# --- HTTP server -------------------------------------------------------------------------


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``/healthz``, ``/readyz`` and ``/metrics`` on ``host:port`` until cancelled.

    ``host`` ``""`` listens on every interface.  Reports the bound port through
    ``task_status.started`` (of the first listener, when ``host`` resolves to several
    addresses), so ``port`` 0 picks a free one.  Each connection runs in its own task; a
    client that misbehaves is answered 400 (or 413/431) and disconnected without
    disturbing the others, and one that sends nothing for ``idle_timeout`` seconds is
    disconnected.
    """
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    bound: int = listeners[0].socket.getsockname()[1]
    log.debug("serving metrics and probes on %s port %d", host or "*", bound)

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_connection(stream, metrics, idle_timeout)

    task_status.started(bound)
    await trio.serve_listeners(handler, listeners)


async def _serve_connection(
    stream: trio.abc.HalfCloseableStream, metrics: Metrics, idle_timeout: float
) -> None:
    """One client connection: requests answered in turn until either side closes."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    try:
        while True:
            keep_going = False  # stays False when the idle timeout strikes
            with trio.move_on_after(idle_timeout):
                keep_going = await _exchange(stream, conn, metrics)
            if not keep_going:
                break
        await _close_gracefully(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; serve_listeners closes the stream


async def _next_event(
    stream: trio.abc.ReceiveStream, conn: h11.Connection
) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(_RECEIVE_SIZE)))
            continue
        if event is h11.PAUSED:  # not reached: we answer before reading on
            raise h11.RemoteProtocolError("pipelined request while paused")
        assert isinstance(event, h11.Event)
        return event


async def _exchange(
    stream: trio.abc.HalfCloseableStream, conn: h11.Connection, metrics: Metrics
) -> bool:
    """Read one request and answer it; ``True`` if the connection can take another."""
    try:
        request = await _next_event(stream, conn)
        if not isinstance(request, h11.Request):  # ConnectionClosed: a clean goodbye
            return False
        body_size = 0
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.Data):
                body_size += len(event.data)
                if body_size > MAX_BODY_BYTES:
                    await _respond(stream, conn, 413, b"request body too large\n",
                                   close=True)
                    return False
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint
            await _respond(stream, conn, status, f"bad request: {exc}\n".encode(),
                           close=True)
        return False

    status, headers, body = await _route(request.method, request.target, metrics)
    await _respond(stream, conn, status, body, headers=headers,
                   head=request.method == b"HEAD")
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        return True
    return False


async def _route(
    method: bytes, target: bytes, metrics: Metrics
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``(status, extra headers, body)`` for a request; the body is dropped for HEAD.

    The probes wait for their live checks here, in this connection's task only."""
    path = target.split(b"?", 1)[0]
    if path not in (b"/healthz", b"/readyz", b"/metrics"):
        return 404, [], b"not found\n"
    if method not in (b"GET", b"HEAD"):
        return 405, [(b"allow", b"GET, HEAD")], b"method not allowed\n"
    if path == b"/metrics":
        content_type = prometheus_client.CONTENT_TYPE_LATEST.encode("ascii")
        return 200, [(b"content-type", content_type)], metrics.render()
    health = metrics.health
    ok, text = await (health.healthz() if path == b"/healthz" else health.readyz())
    return (200 if ok else 503), [], text.encode("utf-8", "replace")


async def _respond(
    stream: trio.abc.SendStream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
    head: bool = False,
) -> None:
    """Send a whole response (no body after ``HEAD``; h11 takes care of that framing)."""
    all_headers = [(b"server", _SERVER), (b"content-length", str(len(body)).encode())]
    extra = headers or []
    if not any(name == b"content-type" for name, _ in extra):
        all_headers.append((b"content-type", _TEXT))
    all_headers.extend(extra)
    if close:
        all_headers.append((b"connection", b"close"))
    data = conn.send(h11.Response(status_code=status, headers=all_headers))
    if body and not head:
        data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
    data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(data)

async def _close_gracefully(stream: trio.abc.HalfCloseableStream) -> None:
    """Half-close, then drain what the client still sends (briefly), so that closing with
    unread data does not reset the connection before the client has read our answer."""
    with trio.move_on_after(_CLOSE_GRACE):
        await stream.send_eof()
        while await stream.receive_some(_RECEIVE_SIZE):
            pass
    await stream.aclose()
