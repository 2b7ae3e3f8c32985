"""The plugin runtime: serve each resource, register it, and start over when the kubelet does.

Strategy: each resource lives through *registration epochs*.  An epoch is a cancel scope
holding the resource's gRPC server (on its own socket in the kubelet's directory), a
watch on ``kubelet.sock`` and on that socket, and the registration.  Anything that means
"the kubelet has forgotten us" (kubelet.sock recreated or removed, our socket removed or
replaced, the directory recreated, or :meth:`DevicePlugin.restart`) cancels the epoch:
every connection and ListAndWatch stream of it ends and our socket is removed *before*
the next epoch starts and registers again.  That order matters: kubelets 1.25-1.36 let
the end of an old stream tear down a newer registration of the same resource
(kubernetes#121994), so no old stream may outlive a new Register.

The device sources run outside the epochs, for the plugin's whole life: a kubelet restart
does not make a GPU forget its health.

Registration: serve first, then Register, since the kubelet dials back and calls
GetDevicePluginOptions inside Register, and may open ListAndWatch before Register returns.
A refused or failed Register is retried with capped exponential back-off and jitter; the
kubelet's reason is logged once per distinct reason.  A kubelet.sock that does not answer
(connection refused: a crashed kubelet's file, until the new kubelet replaces it) is what
a kubelet restart looks like for a moment: logged at INFO, and as a WARNING only once it
has lasted :data:`KUBELET_GONE_GRACE`.

Another process serving our socket (a second instance, or NVIDIA's plugin, which uses the
same socket names) is never displaced: the resource waits, neither serving nor
registering, and takes the socket once that process has gone (see
:meth:`DevicePlugin._in_use`).

Health: :meth:`DevicePlugin.check` looks at a resource *now* rather than recalling how
its registration went: it dials the resource's socket and asks GetDevicePluginOptions,
and checks that the kubelet is watching (a ListAndWatch stream is open) and that
kubelet.sock is still the one we registered with.  The runtime hands it to the observer
(:meth:`~trio_gpu_plugin._observe.Observer.set_live_check`) for ``/healthz`` and
``/readyz``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import random
from collections.abc import Sequence
from typing import Final, NoReturn

import trio

from ._config import ConfigError
from ._devices import Resource
from ._grpc import RpcError, StatusCode
from ._logging import Reminder
from ._observe import Observer, Problem
from ._service import DevicePluginService
from ._transport import MAX_UNIX_PATH, SocketInUseError, open_unix_channel, serve_unix
from ._watch import Identity, PathWatcher, identity
from .proto import v1beta1

__all__ = ["DevicePlugin", "check_kubelet_socket_path"]

log = logging.getLogger("trio_gpu_plugin.runtime")

#: Bound on one Register call (seconds).  The kubelet spends up to 10 s dialling back
#: inside Register, then calls GetDevicePluginOptions: a shorter bound would give up on
#: registrations the kubelet is about to complete.
REGISTER_TIMEOUT: Final = 30.0
#: First retry delay after a failed Register, doubled on each failure up to the cap.
RETRY_INITIAL: Final = 0.1
RETRY_CAP: Final = 30.0
#: Cap on the delay between attempts to serve our socket when that fails (a directory
#: that is unwritable for a while): each attempt is one cheap syscall, and serving again
#: soon after the cause goes away matters more.
SERVE_RETRY_CAP: Final = 5.0
#: Default bound on :meth:`DevicePlugin.check`'s dial and call (seconds).
CHECK_TIMEOUT: Final = 1.0
#: How long a kubelet.sock that does not answer (connection refused, or the connection
#: lost mid-Register) is taken for a kubelet restarting, in seconds, before it is worth a
#: WARNING.  A crashed kubelet's successor removes our socket a few milliseconds before
#: it replaces the stale kubelet.sock (v1.32's device manager), and a dial in that gap is
#: refused: 4 of 20 crash restarts did.  A kubelet takes a second or two to come back;
#: one still refusing after 10 s is down, which an operator should hear about.
KUBELET_GONE_GRACE: Final = 10.0


def _backoff(attempt: int, cap: float = RETRY_CAP) -> float:
    # "Full jitter" keeps several plugins restarted together from retrying in lockstep.
    return random.uniform(0.5, 1.0) * min(cap, RETRY_INITIAL * 2.0**attempt)


@dataclasses.dataclass
class _Registration:
    """Where one resource's registration stands, for :meth:`DevicePlugin.check`."""

    registered: bool
    #: Why not registered, as of the latest step (waiting for the kubelet, retrying).
    reason: str
    #: trio time since which the resource has been registered, or not registered.  Not
    #: moved by the steps of one outage (starting over, retrying), so that a plugin stuck
    #: in a loop of them still shows how long it has been out; but a new kubelet starts
    #: the clock again (see _registering).
    since: float
    #: kubelet.sock as it was when the registration was made (or, while not
    #: registered, the last kubelet we registered or tried to register with).
    kubelet: Identity = None
    #: When a check first saw kubelet.sock differ from :attr:`kubelet`.
    stale_since: float | None = None


def check_kubelet_socket_path(path: str | os.PathLike[str],
                              given_as: str = "--kubelet-socket") -> None:
    """Refuse a kubelet socket path no Unix socket can be at, raising
    :class:`ConfigError` naming ``given_as`` (the flag, or its environment twin) and the
    path: empty, too long for a Unix socket, or a directory.  Otherwise the plugin would
    wait forever for a kubelet that cannot appear there.

    The kubelet's socket directory is the likely mistake for its socket: the plugin's
    sockets would then go in the directory above, and every Register be refused
    ("connection refused", from a directory), which names nothing to fix.  A path that
    does not exist yet is fine: the kubelet creates its socket when it starts.
    """
    if not os.fspath(path):
        raise ConfigError(f"{given_as} '': an empty path (the kubelet's is "
                          f"{v1beta1.KUBELET_SOCKET})")
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH:
        raise ConfigError(f"{given_as} {os.fspath(path)}: {size} bytes, longer than the "
                          f"{MAX_UNIX_PATH} a Unix socket path can hold")
    path = pathlib.Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{given_as} {path}: is a directory, not a socket path; give the kubelet's "
            f"registration socket, such as {path / 'kubelet.sock'} (the kubelet's own is "
            f"{v1beta1.KUBELET_SOCKET}); the plugin's sockets go in its directory")


def _registration_failure(exc: RpcError) -> str:
    """Why a resource is not registered after ``exc``, for the health endpoints: the
    kubelet's own reason where it refused, our side's failure otherwise."""
    if exc.code in (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED):
        return f"registration failed (retrying): {exc}"
    return f"the kubelet refused the registration (retrying): {exc.message or exc}"


async def _no_answer(path: pathlib.Path, timeout: float) -> str | None:
    """Why the gRPC server at ``path`` does not answer a cheap call, or ``None``."""
    with trio.move_on_after(timeout):
        try:
            async with open_unix_channel(path, connect_timeout=timeout) as channel:
                await channel.unary(v1beta1.DEVICE_PLUGIN, "GetDevicePluginOptions",
                                    v1beta1.Empty(), timeout=timeout)
        except (RpcError, OSError, trio.BrokenResourceError) as exc:
            return str(exc)
        return None
    return f"no reply to GetDevicePluginOptions within {timeout:g} s"


class DevicePlugin:
    """Serves one or more resources to the kubelet, and keeps them registered.

    Run it in your nursery: ``await nursery.start(plugin.run)`` returns once every
    resource is registered; cancel the nursery to stop (sockets are removed).

    Args:
        resources: what to advertise; names and socket names must be distinct.
        kubelet_socket: the kubelet's registration socket; our sockets go in its directory.
        register_timeout: bound on each Register call, in seconds.
        watch_poll_interval: safety-net re-check of the sockets, in seconds, on top of
            inotify (or the polling period where inotify is unavailable).
        observer: receives registrations, kubelet restarts and DevicePlugin calls, and
            each resource's live check (:meth:`check`) for the health endpoints.
    """

    def __init__(
        self,
        resources: Sequence[Resource],
        *,
        kubelet_socket: str | os.PathLike[str] = v1beta1.KUBELET_SOCKET,
        register_timeout: float = REGISTER_TIMEOUT,
        watch_poll_interval: float = 10.0,
        observer: Observer | None = None,
    ) -> None:
        if not resources:
            raise ValueError("a device plugin needs at least one resource")
        for attribute in ("name", "socket_name"):
            values = [getattr(r, attribute) for r in resources]
            if len(set(values)) != len(values):
                raise ValueError(f"resources share a {attribute}: {values}")
        self.kubelet_socket = pathlib.Path(kubelet_socket)
        self.socket_dir = self.kubelet_socket.parent
        self.register_timeout = register_timeout
        self.watch_poll_interval = watch_poll_interval
        #: Told about registrations, restarts and calls (metrics, health endpoints).
        self.observer = observer or Observer()
        self.services = {r.name: DevicePluginService(r, self.observer) for r in resources}
        #: Accepted registrations so far, by resource name.
        self.registrations = {r.name: 0 for r in resources}
        self._epochs: dict[str, trio.CancelScope] = {}
        self._restart_reasons: dict[str, str] = {}
        # Why serving each resource's socket last failed (logged once per cause).
        self._serve_failures: dict[str, str] = {}
        # Per resource: another process serving its socket, logged once, then now and then.
        self._in_use_reminders = {r.name: Reminder() for r in resources}
        self._registered = {r.name: trio.Event() for r in resources}
        # For check(); filled in by run(), which has a trio clock to stamp it with.
        self._state: dict[str, _Registration] = {}

    def socket_path(self, resource: Resource) -> pathlib.Path:
        """Where ``resource`` is served."""
        return self.socket_dir / resource.socket_name

    def restart(self, reason: str = "restart requested") -> None:
        """End every resource's epoch: serve and register again (what SIGHUP does)."""
        for name, scope in self._epochs.items():
            self._restart_reasons[name] = reason
            scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Serve and register every resource until cancelled.

        Reports started once every resource has been registered for the first time
        (after the kubelet's socket appears, if it is not there yet).  Gives the
        observer each resource's live check (:meth:`check`) first.

        Raises:
            ConfigError: ``kubelet_socket`` is a directory (the kubelet's socket
                directory given instead of the socket in it), before anything is served.
        """
        check_kubelet_socket_path(self.kubelet_socket)
        for name in self.services:
            self._not_registered(name, "starting: serving and registering")
            self.observer.set_live_check(name, functools.partial(self.check, name))
        try:
            async with trio.open_nursery() as nursery:
                for service in self.services.values():
                    await nursery.start(service.resource.source.run, service.publish)
                for service in self.services.values():
                    nursery.start_soon(self._keep_registered, service)
                for event in self._registered.values():
                    await event.wait()
                task_status.started()
        finally:
            # Our checks stay with the observer until a successor replaces them (a
            # reload runs a new DevicePlugin), and must not claim we still serve.
            for name in self.services:
                self._not_registered(name, "the plugin stopped serving it")
        raise AssertionError("unreachable: _keep_registered never returns")  # pragma: no cover

    async def check(self, resource_name: str, timeout: float = CHECK_TIMEOUT) -> list[Problem]:
        """What is wrong with serving ``resource_name`` now; an empty list when nothing.

        Looks rather than remembers.  While the resource is registered: dials its socket
        and calls GetDevicePluginOptions (connect and call within ``timeout`` seconds),
        checks that a ListAndWatch stream is open (the kubelet watches it), and that
        kubelet.sock is still the one the registration was made with.  Otherwise it
        reports why it is not registered.  States the runtime repairs by itself (not
        registered yet, no stream yet) carry the time they began in
        :attr:`Problem.since`; a socket that does not answer carries none.  Raises
        :class:`KeyError` for a resource this plugin does not serve.
        """
        service = self.services[resource_name]
        state = self._state.get(resource_name)
        if state is None:
            return [Problem("not served: DevicePlugin.run() has not started")]
        if not state.registered:
            return [self._not_registered_problem(state)]
        path = self.socket_path(service.resource)
        failure = await _no_answer(path, timeout)
        current = self._state[resource_name]
        if current is not state:
            # The registration ended while we dialled (our socket going away is part of
            # starting over): that, not the dial, is the news.
            return [self._not_registered_problem(current)]
        problems = []
        if failure is not None:
            problems.append(Problem(f"socket {path} does not answer: {failure}"))
        now = trio.current_time()
        if not service.watchers:
            # Any client's stream counts: on a node only the kubelet opens one.
            since = max(state.since, service.unwatched_since or state.since)
            problems.append(Problem(
                f"no ListAndWatch stream from the kubelet for {now - since:.0f} s: the "
                f"kubelet is not watching {path}, so it has no devices of "
                f"{resource_name} to allocate", since))
        try:
            kubelet = identity(self.kubelet_socket)
        except OSError as exc:
            problems.append(Problem(f"cannot look at {self.kubelet_socket}: {exc}"))
        else:
            if kubelet != state.kubelet:
                if state.stale_since is None:
                    state.stale_since = now
                problems.append(Problem(
                    f"registered with a kubelet that is gone: {self.kubelet_socket} was "
                    f"{'removed' if kubelet is None else 'replaced'} (the kubelet restarted) "
                    "and the plugin has not registered again yet", state.stale_since))
        return problems

    @staticmethod
    def _not_registered_problem(state: _Registration) -> Problem:
        age = trio.current_time() - state.since
        return Problem(f"not registered with the kubelet for {age:.0f} s: {state.reason}",
                       state.since)

    def _not_registered(self, name: str, reason: str) -> None:
        state = self._state.get(name)
        if state is not None and not state.registered:
            state.reason = reason  # the same outage goes on: keep when it began
        else:
            self._state[name] = _Registration(False, reason, trio.current_time(),
                                              None if state is None else state.kubelet)

    def _registering(self, name: str, kubelet: Identity) -> None:
        state = self._state.get(name)
        reason = f"registering with the kubelet at {self.kubelet_socket}"
        if state is not None and not state.registered and state.kubelet == kubelet:
            state.reason = reason
        else:
            # A kubelet we have not tried yet: the time without one is not ours to
            # count (no kubelet, no probes), and this one gets its own grace.
            self._state[name] = _Registration(False, reason, trio.current_time(), kubelet)

    async def _keep_registered(self, service: DevicePluginService) -> NoReturn:
        failures = 0
        # One inotify instance for the resource's whole life: closing one costs
        # milliseconds, which would land right in the re-registration's path.
        with PathWatcher(poll_interval=self.watch_poll_interval) as watcher:
            while True:
                failures = await self._next_epoch(service, watcher, failures)

    async def _next_epoch(self, service: DevicePluginService, watcher: PathWatcher,
                          failures: int) -> int:
        """Wait for the kubelet, then run one epoch; return the count of failed epochs."""
        name = service.resource.name
        kubelet = identity(self.kubelet_socket)
        if kubelet is None:
            if self.registrations[name]:
                # The usual gap in a kubelet restart, between its removing and recreating
                # the socket: nothing for anyone to act on.
                log.info("%s: waiting for the kubelet to come back", name)
            else:
                log.warning("%s: waiting for the kubelet: %s does not exist (is --kubelet-socket "
                            "right, and is the kubelet running?)", name, self.kubelet_socket)
            self._not_registered(name, f"waiting for the kubelet: {self.kubelet_socket} "
                                       "does not exist")
            await watcher.wait_for_change({str(self.kubelet_socket): None})
            return failures
        failure: OSError | None = None
        try:
            reason = await self._epoch(service, kubelet, watcher)
        except* OSError as group:
            # The directory vanished under us (the kubelet mid-restart), or the socket
            # cannot be bound or removed (the directory unwritable for a while), or
            # another process serves it.
            failure = group.exceptions[0]  # type: ignore[assignment]
        if isinstance(failure, SocketInUseError):
            await self._in_use(service, failure, watcher, failures)
            return failures + 1
        if failure is not None:
            self._in_use_reminders[name].clear()  # another failure now: that is the news
            delay = _backoff(failures, SERVE_RETRY_CAP)
            cause = f"{type(failure).__name__}: {failure}"
            self._not_registered(name, f"cannot serve {self.socket_path(service.resource)}: "
                                       f"{cause}")
            if self._serve_failures.get(name) != cause:
                self._serve_failures[name] = cause
                log.warning("%s: cannot serve %s: %s; retrying every few seconds (the same "
                            "failure again is logged at debug level)",
                            name, self.socket_path(service.resource), failure)
            else:
                log.debug("%s: still cannot serve (attempt %d): %s; next in %.1f s",
                          name, failures + 1, failure, delay)
            await trio.sleep(delay)
            return failures + 1
        log.info("%s: starting over: %s", name, reason)
        return 0

    async def _in_use(self, service: DevicePluginService, failure: SocketInUseError,
                      watcher: PathWatcher, failures: int) -> None:
        """Another process serves our socket: say so, then wait a while for it to go.

        Wait and take over, rather than exit: two instances overlap for a moment in
        ordinary operations (an old pod still stopping while its replacement starts, a
        rolling update with maxSurge), and a plugin that exits then goes into
        CrashLoopBackOff, whose growing delay keeps it down long after the other has
        gone.  Never replace the socket either: the other process would see its socket
        replaced and take it back, each registration tearing down the other's, dozens of
        times a second.  So the other keeps serving, and we serve once its socket is
        gone (removed when it exits: the watch sees that at once) or no longer answers
        (a killed process's file: the next try replaces it), trying every few seconds.
        (With maxSurge the DaemonSet deletes the old pod only once the new one is ready,
        which it is not while it waits here: hence k8s/daemonset.yaml's maxUnavailable.)
        """
        name = service.resource.name
        path = self.socket_path(service.resource)
        self._not_registered(name, f"{path} is served by another process (another instance "
                                   "of the plugin, or NVIDIA's device plugin): not serving or "
                                   "registering until it has gone")
        reminders = self._in_use_reminders[name]
        due = reminders.due(str(path))
        if due == "first":
            log.error("%s: %s is served by another process, so %s is neither served nor "
                      "registered by this one: another instance of this plugin given the same "
                      "socket (a second DaemonSet, or the old pod of a rolling update), or "
                      "NVIDIA's device plugin still running (it serves nvidia-gpu.sock too: "
                      "remove it before deploying this one).  Not replacing it; serving as "
                      "soon as that process has gone (repeated every %.0f min while it lasts)",
                      name, path, name, reminders.interval / 60)
        elif due == "reminder":
            log.error("%s: %s is still served by another process, after %.0f min; %s is not "
                      "registered by this instance until that process has gone", name, path,
                      reminders.lasted / 60, name)
        else:
            log.debug("%s: %s is still served by another process (attempt %d)", name, path,
                      failures + 1)
        with trio.move_on_after(_backoff(failures, SERVE_RETRY_CAP)):
            await watcher.wait_for_change({str(path): identity(path)})

    async def _epoch(self, service: DevicePluginService, kubelet: Identity,
                     watcher: PathWatcher) -> str:
        """Serve and register until something says the kubelet forgot us; return what."""
        resource = service.resource
        path = self.socket_path(resource)
        why: list[str] = []
        with trio.CancelScope() as epoch:
            self._epochs[resource.name] = epoch
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_unix, path, [service.service()])
                failed = self._serve_failures.pop(resource.name, None)
                in_use = self._in_use_reminders[resource.name]
                if in_use.active:
                    log.info("%s: %s is no longer served by another process (after %.0f s): "
                             "serving and registering it now", resource.name, path,
                             in_use.lasted)
                    in_use.clear()
                elif failed is not None:
                    log.info("%s: serving %s again (it had failed with %s)",
                             resource.name, path, failed)
                baseline = {str(self.kubelet_socket): kubelet, str(path): identity(path)}
                nursery.start_soon(self._watch, watcher, baseline, epoch, why)
                self._registering(resource.name, kubelet)
                await self._register(resource)
                self._state[resource.name] = _Registration(True, "", trio.current_time(),
                                                           kubelet)
                self.registrations[resource.name] += 1
                self.observer.registered(resource.name)
                self.observer.set_resource(resource.name, True, True, "")
                self._registered[resource.name].set()
                await trio.sleep_forever()
        del self._epochs[resource.name]
        reason = why[0] if why else self._restart_reasons.pop(resource.name, "restart requested")
        if "the kubelet restarted" in reason:
            self.observer.kubelet_restart(resource.name)
        self.observer.set_resource(resource.name, False, False, f"starting over: {reason}")
        self._not_registered(resource.name, f"starting over: {reason}")
        return reason

    async def _watch(self, watcher: PathWatcher, baseline: dict[str, Identity],
                     epoch: trio.CancelScope, why: list[str]) -> None:
        now = await watcher.wait_for_change(baseline)
        kubelet, own = (str(self.kubelet_socket), *(p for p in baseline if p != str(self.kubelet_socket)))
        if now[kubelet] != baseline[kubelet]:
            why.append(f"{kubelet} was {'removed' if now[kubelet] is None else 'recreated'} "
                       "(the kubelet restarted)")
        else:
            why.append(f"our socket {own} was {'removed' if now[own] is None else 'replaced'}")
        epoch.cancel()

    async def _register(self, resource: Resource) -> None:
        request = v1beta1.RegisterRequest(
            version=v1beta1.VERSION,
            endpoint=resource.socket_name,
            resource_name=resource.name,
            options=resource.options,
        )
        attempt = 0
        # The last failure logged at INFO (the kubelet restarting) and as a WARNING.
        last_info = last_warned = None
        # When the kubelet stopped answering, while it does not (see KUBELET_GONE_GRACE).
        gone_since: float | None = None
        while True:
            started = trio.current_time()
            try:
                async with open_unix_channel(self.kubelet_socket) as channel:
                    await channel.unary(v1beta1.REGISTRATION, "Register", request,
                                        timeout=self.register_timeout)
            except RpcError as exc:
                delay = _backoff(attempt)
                attempt += 1
                reason = str(exc)
                self._not_registered(resource.name, _registration_failure(exc))
                # UNAVAILABLE: no connection, or it was lost (the kubelet died mid-call).
                # Anything else is the kubelet's answer, which no wait will change.
                gone = exc.code is StatusCode.UNAVAILABLE
                if not gone:
                    gone_since = None
                elif gone_since is None:
                    gone_since = started
                gone_for = 0.0 if gone_since is None else trio.current_time() - gone_since
                if gone and gone_for < KUBELET_GONE_GRACE:
                    # Expected in a kubelet restart: the watch starts over as soon as the
                    # new kubelet.sock appears, and the retries go on meanwhile.
                    log.log(logging.INFO if reason != last_info else logging.DEBUG,
                            "%s: the kubelet at %s does not answer (%s): it is probably "
                            "restarting; retrying until it does (a warning follows if it "
                            "does not within %g s)", resource.name, self.kubelet_socket,
                            reason, KUBELET_GONE_GRACE)
                    last_info = reason
                elif reason != last_warned:
                    log.warning("%s: registration with the kubelet failed%s: %s (retrying with "
                                "back-off; further identical failures are logged at debug level)",
                                resource.name,
                                f" for {gone_for:.0f} s" if gone else "",
                                reason)
                    last_warned = reason
                else:
                    log.debug("%s: registration failed again (attempt %d): %s; next in %.1f s",
                              resource.name, attempt, reason, delay)
                await trio.sleep(delay)
                continue
            log.info("%s: registered with the kubelet as %s (%.1f ms)", resource.name,
                     self.socket_path(resource), (trio.current_time() - started) * 1000)
            return
