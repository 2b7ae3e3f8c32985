"""The NVML device source: discovery, the health event task, probes and recovery.

:class:`NvmlNode` owns NVML for the whole process.  Its ``run`` is a loop of *NVML
sessions*: ``nvmlInit``, discovery (one immutable :class:`NodeModel`), then two tasks in
one nursery until NVML fails:

* the event task: one event set for every GPU, waited on by one worker thread in short
  timed waits; events are handed to trio as they come, so an idle node costs nothing in
  the event loop, and cancelling takes at most one wait (the set is freed only once the
  waiting thread has returned);
* the probe task: every ``probe_interval`` seconds, asks NVML about each device; a GPU
  NVML can no longer reach goes Unhealthy, and an Unhealthy one comes back once NVML
  answers for it, no critical event arrived for ``recovery_window`` seconds and no page
  retirement or row remap is pending (NVIDIA's plugin never recovers, #234).

If NVML fails (init at start, or a wait or probe later), every device is marked Unhealthy,
one line is logged per back-off step, and the loop starts a new session once NVML
answers again.  Health lives in a :class:`HealthTracker` that outlives sessions.

NVML calls can hang (a GPU wedged in the driver).  A worker thread stuck in one cannot
be interrupted, so every call that may hang has a deadline (``call_timeout``) on the trio
side instead: a probe that does not return marks the GPU it is stuck on Unhealthy ("hung"),
leaves that thread behind and goes on with the other GPUs in a new one; the hung GPU is
not asked again until its thread returns, then it recovers like any other.  A start-up
(init and discovery) that does not return counts as NVML failing; the next one waits for
the hung one to return, and a session that comes back from it late is shut down.  So
other GPUs keep their health current, and stopping never waits on a hung call.

:class:`NvmlDeviceSource` is the :class:`~trio_gpu_plugin.DeviceSource` of one resource
over a node: a *selector* turns the model into logical devices (whole GPUs, MIG slices,
replicas), each built on health units (GPU and MIG UUIDs), so an event on a GPU marks
every logical device built on it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, NoReturn

import pynvml
import trio

from ._devices import DeviceInfo, Publish
from ._discovery import DiscoveryError, DiscoveryResult, discover
from ._health import (
    HealthChecks,
    HealthTracker,
    Transition,
    describe_xid,
    gpu_units,
    logical_health,
    mig_units,
    units_for_event,
)
from ._node_model import GpuInfo, NodeModel
from ._nvml import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_GPU_UNAVAILABLE,
    EVENT_XID,
    NVML,
    NVMLError,
    nvml_gone,
    text,
)
from ._observe import Observer
from .proto import v1beta1

__all__ = [
    "DeviceSelector",
    "LogicalDevice",
    "NvmlDeviceSource",
    "NvmlInitError",
    "NvmlNode",
    "mig_slices",
    "whole_gpus",
    "with_replicas",
]

log = logging.getLogger("trio_gpu_plugin.nvml")

#: Event waits time out this often (ms) so that cancellation is prompt.
WAIT_TIMEOUT_MS: Final = 250
RECOVERY_WINDOW: Final = 60.0
PROBE_INTERVAL: Final = 5.0
RETRY_INITIAL: Final = 0.5
RETRY_CAP: Final = 30.0
#: An NVML call (a probe, or init and discovery) not returned after this long is hung.
CALL_TIMEOUT: Final = 10.0
#: How long ending a session waits for probe threads still in NVML before nvmlShutdown.
SHUTDOWN_GRACE: Final = 0.5

_INIT_HINT: Final = (
    "check that the NVIDIA driver is loaded on this node (nvidia-smi works there), that the "
    "container runs with the NVIDIA runtime or has libnvidia-ml.so.1 mounted, and that "
    "NVIDIA_VISIBLE_DEVICES=all and NVIDIA_DRIVER_CAPABILITIES includes 'utility'; "
    "or set --fail-on-init-error=false to keep retrying")


class NvmlInitError(RuntimeError):
    """NVML could not be initialised (or the node not discovered) at start-up, and
    ``fail_on_init_error`` is set."""


class _StartHung(Exception):
    """NVML's start-up (init and discovery) has not returned within the call timeout."""


@dataclasses.dataclass(eq=False)
class _Call:
    """A blocking NVML job in a worker thread, shared by the thread and the trio side.

    The trio side gives up on it after a deadline (or when cancelled) and sets
    ``abandoned`` under ``lock``; the thread checks it, under the same lock, before
    handing back anything it would otherwise leak.
    """

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    abandoned: bool = False
    #: The GPU (UUID) the thread is asking NVML about now, for a per-GPU job.
    current: str | None = None
    #: Per-GPU results so far, for a per-GPU job.
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: A start-up job opened an NVML session that nobody has taken yet.
    session_open: bool = False


@dataclasses.dataclass
class _Stuck:
    """A GPU whose NVML call did not return: since when, in what, and its thread."""

    what: str
    since: float
    done: threading.Event


class _NvmlGone(Exception):
    """NVML failed as a whole during a session."""


@dataclasses.dataclass(frozen=True)
class LogicalDevice:
    """A device as one resource advertises it.

    Attributes:
        id: its ID in the resource (a UUID, ``<uuid>::<n>`` for a replica...).
        units: the health units (GPU and MIG UUIDs) it is built on; it is Healthy iff
            all of them are.
        numa_nodes: NUMA nodes it is attached to.
        visible: what the container runtime is told (``NVIDIA_VISIBLE_DEVICES``).
    """

    id: str
    units: tuple[str, ...]
    numa_nodes: tuple[int, ...]
    visible: str


#: ``selector(model) -> logical devices`` of one resource.
DeviceSelector = Callable[[NodeModel], Sequence[LogicalDevice]]


def whole_gpus(model: NodeModel) -> list[LogicalDevice]:
    """Every physical GPU, by UUID (MIG-enabled GPUs too: NVIDIA's ``none`` strategy)."""
    return [
        LogicalDevice(gpu.uuid, gpu_units(gpu),
                      () if gpu.numa_node is None else (gpu.numa_node,), gpu.uuid)
        for gpu in model.gpus
    ]


def mig_slices(model: NodeModel, profile: str | None = None) -> list[LogicalDevice]:
    """Every MIG device (of one profile, if given), by MIG UUID."""
    return [
        LogicalDevice(mig.uuid, mig_units(mig),
                      () if mig.numa_node is None else (mig.numa_node,), mig.uuid)
        for mig in model.mig_devices
        if profile is None or mig.profile == profile
    ]


def with_replicas(select: DeviceSelector, replicas: int) -> DeviceSelector:
    """Each device of ``select`` as ``replicas`` shared copies ``<id>::<n>``; all copies
    share the device's health units."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")

    def selector(model: NodeModel) -> list[LogicalDevice]:
        return [dataclasses.replace(d, id=f"{d.id}::{n}")
                for d in select(model) for n in range(replicas)]
    return selector


def _backoff(attempt: int, initial: float = RETRY_INITIAL, cap: float = RETRY_CAP) -> float:
    # "Full jitter" between half and all of the step: plugins on many nodes that lost
    # NVML together (a driver upgrade) do not retry in lockstep.
    return random.uniform(0.5, 1.0) * min(cap, initial * 2.0 ** min(attempt, 32))


def _handle_key(handle: Any) -> int:
    """What identifies a device handle: the pointer's value for pynvml's ctypes handles
    (each call returns a new pointer object), the object for others."""
    try:
        value = ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)
    return value if value is not None else id(handle)


@dataclasses.dataclass(frozen=True)
class _Event:
    uuid: str | None
    event_type: int
    data: int
    gi: int
    ci: int
    error: str = ""


class NvmlNode:
    """NVML on this node: the device model and the health of every GPU and MIG device.

    Run it in your nursery: ``await nursery.start(node.run)`` returns once NVML is up and
    the node discovered; then build sources with :meth:`source`.  Cancel to stop.

    Args:
        nvml: ``pynvml`` (see :func:`~trio_gpu_plugin._nvml.load_pynvml`) or a
            :class:`~trio_gpu_plugin.SimulatedNVML`.
        root: where ``sys/`` is read for NUMA nodes (``/``, or a simulated node's root).
        checks: which health checks run; default from ``DP_DISABLE_HEALTHCHECKS`` and
            ``DP_ENABLE_HEALTHCHECKS`` in the environment.
        recovery_window: seconds without a critical event before an Unhealthy device
            may come back; 0 never recovers (NVIDIA's behaviour).
        probe_interval: seconds between probes of every device.
        fail_on_init_error: raise :class:`NvmlInitError` if NVML cannot start; otherwise
            retry with capped back-off and report started once it works.
        limiter: bounds worker threads used for NVML calls.
        wait_timeout_ms: each event wait's timeout; cancellation waits for at most one.
        retry_initial, retry_cap: first and largest delay (seconds) between attempts
            to start NVML after it failed; each failure doubles the delay.
        call_timeout: seconds after which an NVML probe or start-up that has not
            returned is taken as hung (see the module docstring).
    """

    def __init__(
        self,
        nvml: NVML,
        *,
        root: str | os.PathLike[str] = "/",
        checks: HealthChecks | None = None,
        recovery_window: float = RECOVERY_WINDOW,
        probe_interval: float = PROBE_INTERVAL,
        fail_on_init_error: bool = True,
        limiter: trio.CapacityLimiter | None = None,
        wait_timeout_ms: int = WAIT_TIMEOUT_MS,
        retry_initial: float = RETRY_INITIAL,
        retry_cap: float = RETRY_CAP,
        observer: Observer | None = None,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        if not call_timeout > 0:
            raise ValueError(f"NVML call timeout must be > 0 seconds, got {call_timeout}")
        if recovery_window < 0:
            raise ValueError(f"recovery window must be >= 0 seconds, got {recovery_window}")
        if probe_interval <= 0:
            raise ValueError(f"probe interval must be > 0 seconds, got {probe_interval}")
        self.nvml = nvml
        self.root = root
        self.checks = checks if checks is not None else HealthChecks.from_env(os.environ)
        self.recovery_window = recovery_window
        self.probe_interval = probe_interval
        self.fail_on_init_error = fail_on_init_error
        self.wait_timeout_ms = wait_timeout_ms
        self.retry_initial = retry_initial
        self.retry_cap = retry_cap
        self.call_timeout = call_timeout
        #: Told about NVML events, health transitions and NVML going up or down.
        self.observer = observer or Observer()
        # Two threads: the event wait holds one for its whole life; probes use the other.
        self.limiter = limiter or trio.CapacityLimiter(2)
        self.tracker = HealthTracker(recovery_window)
        #: The node as last discovered (``None`` until NVML first answers).
        self.model: NodeModel | None = None
        #: NVML sessions started so far.
        self.sessions = 0
        self._listeners: list[Callable[[], None]] = []
        self._handles: dict[int, str] = {}
        self._ready = trio.Event()
        # GPU UUID -> the call it hung in; not asked again until that thread returns.
        self._stuck: dict[str, _Stuck] = {}
        # Probe threads abandoned by a cancellation while (probably) still in NVML.
        self._abandoned: list[threading.Event] = []
        # The start-up thread that hung, until it returns.
        self._hung_start: threading.Event | None = None

    # --- what sources see ---------------------------------------------------------------

    def healthy(self, units: Iterable[str]) -> bool:
        """Whether every given health unit is healthy."""
        return logical_health(self.tracker, units)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after every change of model or health; returns the
        unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def wait_model(self) -> NodeModel:
        """The model, once NVML has answered for the first time."""
        await self._ready.wait()
        assert self.model is not None
        return self.model

    def source(self, select: DeviceSelector = whole_gpus) -> NvmlDeviceSource:
        """A device source for one resource over this node."""
        return NvmlDeviceSource(self, select)

    def notify(self) -> None:
        """Tell every subscriber to look again (they publish only what changed)."""
        for listener in list(self._listeners):
            listener()

    # --- health bookkeeping -------------------------------------------------------------

    def _describe(self, unit: str) -> str:
        model = self.model
        if model is not None:
            for gpu in model.gpus:
                if gpu.uuid == unit:
                    return f"GPU {gpu.index} ({unit})"
                for mig in gpu.mig_devices:
                    if mig.uuid == unit:
                        return f"MIG {gpu.index}:{mig.index} {mig.profile} ({unit})"
        return unit

    def _log(self, transition: Transition | None) -> bool:
        if transition is None:
            return False
        self.observer.health_transition(transition.unit, transition.healthy, transition.reason)
        if transition.healthy:
            log.info("%s is healthy again: %s", self._describe(transition.unit), transition.reason)
        else:
            log.warning("%s is unhealthy: %s", self._describe(transition.unit), transition.reason)
        return True

    def _mark(self, units: Iterable[str], reason: str) -> bool:
        now = trio.current_time()
        changed = False
        for unit in units:
            changed |= self._log(self.tracker.mark(unit, reason, now))
        return changed

    def _all_units(self) -> list[str]:
        model = self.model
        if model is None:
            return []
        return [u for gpu in model.gpus for u in gpu_units(gpu)]

    # --- the session loop ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Keep NVML sessions going until cancelled (see the module docstring).

        Raises:
            NvmlInitError: the first init or discovery failed and ``fail_on_init_error``.
        """
        log.info("%s", self.checks.describe())
        for problem in self.checks.problems:
            log.warning("%s", problem)
        attempt = 0
        last_failure = ""
        reported = False

        def ready() -> None:
            # Started once, when the first session watches events: an XID injected (or
            # raised) right after start-up is not missed.
            nonlocal reported
            if not reported:
                reported = True
                task_status.started()

        while True:
            try:
                result = await self._start_session()
            except (NVMLError, DiscoveryError, _StartHung) as exc:
                failure = f"{type(exc).__name__}: {exc}" if isinstance(exc, DiscoveryError) else str(exc)
                if self.model is None and self.fail_on_init_error:
                    raise NvmlInitError(f"NVML could not start: {failure}; {_INIT_HINT}") from exc
                delay = _backoff(attempt, self.retry_initial, self.retry_cap)
                attempt += 1
                # One line per back-off step: the steps double up to the cap, so a
                # node whose driver is gone for a day logs a few thousand lines, not
                # millions (NVIDIA #669).
                log.warning("NVML unavailable: %s; retrying in %.1f s%s", failure, delay,
                            "" if failure == last_failure else f" ({_INIT_HINT})")
                last_failure = failure
                if self._mark(self._all_units(), f"NVML unavailable: {failure}"):
                    self.notify()
                await trio.sleep(delay)
                continue
            self._install(result)
            self.observer.nvml_up(True)
            began = trio.current_time()
            try:
                failure = await self._session(result.model, ready)
            finally:
                with trio.CancelScope(shield=True):
                    await self._shutdown()
            if trio.current_time() - began > self.retry_cap:
                # A session that lasted starts the back-off over; one that failed at once
                # (NVML flapping) keeps doubling it, so flapping cannot flood the log.
                attempt = 0
            self.observer.nvml_up(False)
            log.warning("NVML failed: %s; all devices marked Unhealthy until it answers again",
                        failure)
            if self._mark(self._all_units(), f"NVML failed: {failure}"):
                self.notify()
            delay = _backoff(attempt, self.retry_initial, self.retry_cap)
            attempt += 1
            log.warning("NVML: starting a new session in %.1f s", delay)
            await trio.sleep(delay)

    async def _start_session(self) -> DiscoveryResult:
        nvml = self.nvml
        if self._hung_start is not None:
            if not self._hung_start.is_set():
                raise _StartHung("the last NVML start-up (init and discovery) has still not "
                                 "returned: a GPU or the driver is hung")
            self._hung_start = None
        call = _Call()

        def start() -> DiscoveryResult:
            try:
                nvml.nvmlInit()
                try:
                    result = discover(nvml, self.root)
                except BaseException:
                    nvml.nvmlShutdown()
                    raise
                with call.lock:
                    if call.abandoned:
                        nvml.nvmlShutdown()  # nobody will use this session
                    else:
                        call.session_open = True
                return result
            finally:
                call.done.set()

        taken = False
        try:
            with trio.move_on_after(self.call_timeout):
                # Abandonable: a hung start-up must not hold up a stop, or the retry.
                result = await trio.to_thread.run_sync(start, limiter=self.limiter,
                                                       abandon_on_cancel=True)
                taken = True
                self.sessions += 1
                return result
        finally:
            if not taken:
                with call.lock:
                    call.abandoned = True
                    leaked = call.session_open
                if leaked:
                    # It returned just as we gave up on it: its session is ours to end.
                    with trio.CancelScope(shield=True):
                        await self._shutdown()
                elif not call.done.is_set():
                    self._hung_start = call.done
        raise _StartHung(f"NVML start-up (init and discovery) has not returned within "
                         f"{self.call_timeout:g} s: a GPU or the driver is hung")

    async def _shutdown(self) -> None:
        # A probe thread abandoned by the cancellation may still be in NVML for a moment:
        # let it finish before the library goes (hung ones are not waited for).
        deadline = trio.current_time() + SHUTDOWN_GRACE
        while any(not done.is_set() for done in self._abandoned) and trio.current_time() < deadline:
            await trio.sleep(0.01)
        self._abandoned = [done for done in self._abandoned if not done.is_set()]
        try:
            await trio.to_thread.run_sync(self.nvml.nvmlShutdown, limiter=self.limiter)
        except NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)

    def _install(self, result: DiscoveryResult) -> None:
        model = result.model
        first = self.model is None
        self.model = model
        self.tracker.forget(self._all_units())
        summary = ", ".join(
            f"{g.index}: {g.name} {g.uuid}"
            + (f" MIG [{', '.join(m.profile for m in g.mig_devices)}]" if g.mig_enabled else "")
            for g in model.gpus)
        log.info("NVML session %d: driver %s, %d GPU(s)%s%s", self.sessions, model.driver_version,
                 len(model.gpus), ": " if model.gpus else "", summary)
        for device, problem in result.problems.items():
            log.warning("discovery: %s: %s", device, problem)
            if not device.startswith("GPU "):
                gpu = model.gpu(device)
                self._mark(gpu_units(gpu), problem)
        self._ready.set()
        if not first or result.problems:
            self.notify()

    async def _session(self, model: NodeModel, ready: Callable[[], None]) -> str:
        """Run the event and probe tasks until NVML fails; return how it failed.  Calls
        ``ready`` once events are registered."""
        failure = ""
        try:
            async with trio.open_nursery() as nursery:
                if self.checks.watches_events:
                    await nursery.start(self._event_task, model)
                if not self.checks.off:
                    nursery.start_soon(self._probe_task, model)
                else:
                    # Nothing to watch, but the session (and NVML) stays up.
                    nursery.start_soon(trio.sleep_forever)
                ready()
        except* _NvmlGone as group:
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):  # nested nurseries nest groups
                first = first.exceptions[0]
            failure = str(first)
        return failure

    # --- events ---------------------------------------------------------------------------

    def _register(self, model: NodeModel, event_set: Any) -> dict[str, str]:
        """Register every GPU on the event set (blocking); GPU UUID -> failure.

        Also remembers which handle is which GPU: an event from a GPU that has fallen
        off the bus names a handle NVML can no longer answer for (NVIDIA then marks every
        GPU of the node Unhealthy; we mark the one).
        """
        failures = {}
        self._handles = {}
        for gpu in model.gpus:
            try:
                handle = self.nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
                self._handles[_handle_key(handle)] = gpu.uuid
                mask = self.checks.event_mask(self.nvml.nvmlDeviceGetSupportedEventTypes(handle))
                if mask:
                    self.nvml.nvmlDeviceRegisterEvents(handle, mask, event_set)
            except NVMLError as exc:
                if nvml_gone(exc):
                    raise
                if getattr(exc, "value", None) == pynvml.NVML_ERROR_NOT_SUPPORTED:
                    log.warning("GPU %d (%s) is too old to support health checking through NVML "
                                "events; probes still watch it", gpu.index, gpu.uuid)
                    continue
                failures[gpu.uuid] = f"cannot register for NVML events: {exc}"
        return failures

    def _wait(self, event_set: Any) -> _Event | None:
        """One event wait (blocking); the GPU's UUID is read in the same thread."""
        try:
            data = self.nvml.nvmlEventSetWait_v2(event_set, self.wait_timeout_ms)
        except pynvml.NVMLError_Timeout:
            return None
        uuid: str | None = self._handles.get(_handle_key(data.device))
        error = ""
        if uuid is None:
            try:
                uuid = text(self.nvml.nvmlDeviceGetUUID(data.device))
            except NVMLError as exc:
                error = str(exc)
        return _Event(uuid, int(data.eventType), int(data.eventData),
                      int(data.gpuInstanceId), int(data.computeInstanceId), error)

    def _watch(self, event_set: Any, stop: threading.Event,
               deliver: Callable[[_Event], None]) -> None:
        """The waiting thread: short waits until ``stop`` is set, each event handed to
        trio as it arrives.  Idle, it costs a timed wait inside NVML and nothing in the
        event loop (a trio round trip per timeout would cost ~1 ms of CPU each)."""
        while not stop.is_set():
            event = self._wait(event_set)
            if event is not None:
                trio.from_thread.run_sync(deliver, event)

    async def _event_task(self, model: NodeModel, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limiter = self.limiter
        event_set = await trio.to_thread.run_sync(self.nvml.nvmlEventSetCreate, limiter=limiter)
        try:
            try:
                failures = await trio.to_thread.run_sync(self._register, model, event_set,
                                                         limiter=limiter)
            except NVMLError as exc:
                raise _NvmlGone(f"registering for events: {exc}") from exc
            changed = False
            for uuid, failure in failures.items():
                changed |= self._mark(gpu_units(model.gpu(uuid)), failure)
            if changed:
                self.notify()
            task_status.started()

            def deliver(event: _Event) -> None:
                if self._on_event(model, event):
                    self.notify()

            stop = threading.Event()

            async def stop_on_cancel() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    stop.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_cancel)
                # Not abandon_on_cancel: the thread must be back before the set is freed.
                # Cancelling sets ``stop``; the thread sees it after its current wait, so
                # the short timeout bounds how long cancellation takes.
                try:
                    await trio.to_thread.run_sync(self._watch, event_set, stop, deliver,
                                                  limiter=limiter)
                except NVMLError as exc:
                    raise _NvmlGone(f"event wait failed: {exc}") from exc
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(self.nvml.nvmlEventSetFree, event_set,
                                                  limiter=limiter)
                except NVMLError as exc:
                    log.debug("nvmlEventSetFree: %s", exc)

    def _on_event(self, model: NodeModel, event: _Event) -> bool:
        """Apply one NVML event; whether any device changed health."""
        checks = self.checks
        if event.event_type & EVENT_XID:
            self.observer.nvml_event(event.data, "xid")
            if not checks.counts_xid(event.data):
                log.debug("ignoring XID %d on %s (not a health check here)", event.data, event.uuid)
                return False
            meaning = describe_xid(event.data)
            reason = f"XID {event.data}" + (f" ({meaning})" if meaning else "")
        elif event.event_type & EVENT_DOUBLE_BIT_ECC and checks.checks_dbe:
            self.observer.nvml_event(None, "ecc-dbe")
            reason = "double-bit ECC error"
        elif event.event_type & EVENT_GPU_UNAVAILABLE and checks.checks_lost:
            self.observer.nvml_event(None, "gpu-unavailable")
            reason = "GPU unavailable"
        else:
            log.debug("ignoring NVML event type 0x%x on %s", event.event_type, event.uuid)
            return False
        if event.uuid is None:
            # NVIDIA does the same: an event whose GPU cannot be named may be any of them.
            return self._mark(self._all_units(),
                              f"{reason} on a GPU NVML cannot name ({event.error})")
        units = units_for_event(model, event.uuid, event.gi, event.ci)
        if not units:
            log.info("%s on %s GI %d CI %d: not a device this plugin serves; ignored",
                     reason, event.uuid, event.gi, event.ci)
            return False
        return self._mark(units, reason)

    # --- probes ---------------------------------------------------------------------------

    def _probe_gpu(self, gpu: GpuInfo, unhealthy: frozenset[str]) -> tuple[str | None, str | None, NVMLError | None]:
        """Ask NVML about one GPU (blocking): (failure, pending, the error if NVML is gone)."""
        nvml = self.nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
            nvml.nvmlDeviceGetMemoryInfo(handle)
            pending = self._pending(handle) if unhealthy.intersection(gpu_units(gpu)) else None
            for mig in gpu.mig_devices:
                nvml.nvmlDeviceGetHandleByUUID(mig.uuid)
        except NVMLError as exc:
            return f"NVML cannot reach it: {exc}", None, exc if nvml_gone(exc) else None
        return None, pending, None

    def _each_gpu(self, gpus: Sequence[GpuInfo], ask: Callable[[GpuInfo], Any], call: _Call) -> None:
        """The worker thread of :meth:`_per_gpu`: ``ask`` each GPU in turn, noting where
        it is so that a hang can be pinned on the right GPU."""
        try:
            for gpu in gpus:
                if call.abandoned:
                    return
                call.current = gpu.uuid
                call.results[gpu.uuid] = ask(gpu)
            call.current = None
        finally:
            call.done.set()

    async def _per_gpu(self, what: str, gpus: Sequence[GpuInfo],
                       ask: Callable[[GpuInfo], Any]) -> dict[str, Any]:
        """``ask(gpu)`` for each GPU not hung, in a worker thread; GPU UUID -> answer.

        A GPU whose call has not returned within the call timeout is recorded as hung
        in ``what`` (and left out of the answers); the GPUs after it are asked in a new
        thread.  The hung thread is left behind with its limiter token, so the limiter
        gets one more token until it returns.
        """
        answers: dict[str, Any] = {}
        todo = [gpu for gpu in gpus if gpu.uuid not in self._stuck]
        while todo:
            call = _Call()
            finished = False
            try:
                with trio.move_on_after(self.call_timeout):
                    await trio.to_thread.run_sync(self._each_gpu, todo, ask, call,
                                                  limiter=self.limiter, abandon_on_cancel=True)
                    finished = True
            finally:
                if not finished:
                    call.abandoned = True
                    self._abandoned.append(call.done)
            answers.update(call.results)
            hung = call.current
            if finished or hung is None or hung in call.results:
                break  # done, or it returned right at the deadline
            self._abandoned.remove(call.done)  # hung: nothing to wait for at shutdown
            self._hung(hung, what, call.done)
            todo = todo[[g.uuid for g in todo].index(hung) + 1:]
        return answers

    def _hung(self, uuid: str, what: str, done: threading.Event) -> None:
        """Record that NVML hangs in ``what`` for the GPU ``uuid``: log it once, mark it."""
        self._stuck[uuid] = _Stuck(what, trio.current_time(), done)
        self.limiter.total_tokens += 1
        model = self.model
        gpu = model.gpu(uuid) if model is not None else None
        name = self._describe(uuid)
        log.warning("%s: NVML has not returned from %s for %g s; its devices are Unhealthy "
                    "until NVML answers for it again (a thread stays blocked in the driver; "
                    "if this lasts, the GPU needs a reset)", name, what, self.call_timeout)
        if gpu is not None:
            now = trio.current_time()
            for unit in gpu_units(gpu):
                transition = self.tracker.mark(unit, f"NVML hangs in {what}", now)
                if transition is not None:
                    self.observer.health_transition(unit, False, transition.reason)
            self.notify()

    def _check_hung(self) -> None:
        """Release GPUs whose hung call has returned; keep the others' windows open."""
        now = trio.current_time()
        for uuid, stuck in list(self._stuck.items()):
            if stuck.done.is_set():
                del self._stuck[uuid]
                self.limiter.total_tokens -= 1
                log.info("%s: NVML returned from %s after %.1f s; probing it again",
                         self._describe(uuid), stuck.what, now - stuck.since)
                continue
            model = self.model
            if model is not None and uuid in {g.uuid for g in model.gpus}:
                for unit in gpu_units(model.gpu(uuid)):
                    # Still hung: a bad signal now, so recovery counts from the end of it.
                    self.tracker.mark(unit, f"NVML hangs in {stuck.what}", now)

    def _pending(self, handle: Any) -> str | None:
        nvml = self.nvml
        try:
            if nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle) == pynvml.NVML_FEATURE_ENABLED:
                return "page retirement pending (the GPU needs a reset)"
        except NVMLError as exc:
            if nvml_gone(exc) or getattr(exc, "value", None) == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise
        try:
            if nvml.nvmlDeviceGetRemappedRows(handle)[2]:
                return "row remap pending (the GPU needs a reset)"
        except NVMLError as exc:
            if nvml_gone(exc) or getattr(exc, "value", None) == pynvml.NVML_ERROR_GPU_IS_LOST:
                raise
        return None

    async def _probe_task(self, model: NodeModel) -> None:
        while True:
            await trio.sleep(self.probe_interval)
            self._check_hung()
            unhealthy = frozenset(self.tracker.unhealthy_units())
            if not unhealthy and not self.checks.checks_lost:
                continue
            answers = await self._per_gpu("a health probe", model.gpus,
                                          functools.partial(self._probe_gpu, unhealthy=unhealthy))
            gone = [error for _, _, error in answers.values() if error is not None]
            if gone and len(gone) == len(model.gpus):
                raise _NvmlGone(f"probes failed: {gone[0]}")
            results: dict[str, tuple[str | None, str | None]] = {}
            for gpu in model.gpus:
                if gpu.uuid in answers:
                    failure, pending, _ = answers[gpu.uuid]
                    for unit in gpu_units(gpu):
                        results[unit] = (failure, pending)
            now = trio.current_time()
            changed = False
            for unit, (failure, pending) in results.items():
                if failure is not None:
                    if self.checks.checks_lost or unit in unhealthy:
                        changed |= self._log(self.tracker.mark(unit, failure, now))
                elif unit in unhealthy:
                    changed |= self._log(self.tracker.probe_ok(unit, now, pending))
            if changed:
                self.notify()


async def follow(node: NvmlNode, device_infos: Callable[[], list[DeviceInfo]], publish: Publish, *,
                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Publish ``device_infos()`` once ``node`` is up, then again whenever the node says
    something changed and the list differs; until cancelled.  The ``run`` of device
    sources over a node."""
    await node.wait_model()
    last: list[DeviceInfo] | None = None

    def update() -> None:
        nonlocal last
        now = device_infos()
        if now != last:
            last = now
            publish(now)

    update()
    unsubscribe = node.subscribe(update)
    try:
        task_status.started()
        await trio.sleep_forever()
    finally:
        unsubscribe()


class NvmlDeviceSource:
    """The :class:`~trio_gpu_plugin.DeviceSource` of one resource over an
    :class:`NvmlNode`: the selector's logical devices, each Healthy iff all its units are.

    Allocate answers with NVIDIA's default ``envvar`` strategy: ``NVIDIA_VISIBLE_DEVICES``
    lists the devices' ``visible`` names, each once (replicas of one GPU name it once).
    """

    def __init__(self, node: NvmlNode, select: DeviceSelector = whole_gpus) -> None:
        self.node = node
        self.select = select
        self._model: NodeModel | None = None
        self._devices: dict[str, LogicalDevice] = {}

    def devices(self) -> list[LogicalDevice]:
        """The logical devices of the current model."""
        model = self.node.model
        if model is not None and model is not self._model:
            devices = list(self.select(model))
            self._devices = {d.id: d for d in devices}
            self._model = model
        return list(self._devices.values())

    def device_infos(self) -> list[DeviceInfo]:
        """The device list as published now."""
        return [DeviceInfo(d.id, self.node.healthy(d.units), d.numa_nodes) for d in self.devices()]

    async def run(self, publish: Publish, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish the device list once the node is up, then every change."""
        await follow(self.node, self.device_infos, publish, task_status=task_status)

    def allocate(self, device_ids: Sequence[str]) -> v1beta1.ContainerAllocateResponse:
        """NVIDIA's ``envvar`` strategy."""
        self.devices()
        visible = dict.fromkeys(self._devices[i].visible for i in device_ids)
        return v1beta1.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": ",".join(visible)})
