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
the failure is logged as a WARNING once and then as a reminder at most every
:data:`~trio_gpu_plugin._logging.REMINDER_INTERVAL` seconds while it lasts (each back-off
step in between at debug level), the observer is told why NVML is down (the health
endpoints say it), and the loop starts a new session once NVML answers again.  Health
lives in a :class:`HealthTracker` that outlives sessions.

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
import math
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
from ._logging import Reminder
from ._node_model import GpuInfo, NodeModel
from ._nvml import (
    DEVICE_ERRORS,
    EVENT_DOUBLE_BIT_ECC,
    EVENT_GPU_UNAVAILABLE,
    EVENT_RECOVERY_ACTION,
    EVENT_XID,
    FIELD_RECOVERY_ACTION,
    NVML,
    RECOVERY_ACTIONS,
    NVMLError,
    describe_loaded,
    error_code,
    nvml_gone,
    text,
)
from ._observe import Observer
from ._plan_model import PlannedDevice, gpu_device, mig_device
from ._plan_model import replicas as shared_copies
from .proto import v1beta1

__all__ = [
    "DeviceSelector",
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

_DRIVER_HINT: Final = (
    "check that the NVIDIA driver is loaded on this node (nvidia-smi works there), that the "
    "container runs with the NVIDIA runtime or has libnvidia-ml.so.1 mounted, and that "
    "NVIDIA_VISIBLE_DEVICES=all and NVIDIA_DRIVER_CAPABILITIES includes 'utility'")
# Only where the plugin gives up: offered to a plugin that is retrying already (the flag
# is false, or NVML had started once), the flag would be no advice at all.
_INIT_HINT: Final = f"{_DRIVER_HINT}; or set --fail-on-init-error=false to keep retrying"


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
    #: Set when the session this call ran in has ended while the call was still inside
    #: NVML: the reference that keeps NVML alive for it (see :class:`_Holder`).
    holder: _Holder | None = None

    def finish(self) -> None:
        """The thread is out of NVML: say so and let go of NVML if it was the last."""
        with self.lock:
            self.done.set()
            holder = self.holder
        if holder is not None:
            holder.release(self)


class _Holder:
    """One NVML init reference kept for calls still inside NVML after their session ended.

    ``nvmlShutdown`` of the last reference tears NVML down, and a thread hung in a call
    (a wedged GPU) would then return into freed state.  So the session's reference is
    handed here and dropped by whichever of those threads comes out of NVML last.
    """

    def __init__(self, nvml: NVML) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        # The trio side is a member until it has handed out every call, so that a call
        # returning meanwhile cannot drop the reference under one not yet attached.
        self._members: set[object] = {self}

    def attach(self, call: _Call) -> bool:
        """Hold NVML for ``call`` if it is still inside NVML; whether it is."""
        with call.lock:
            if call.done.is_set():
                return False
            with self._lock:
                self._members.add(call)
            call.holder = self
            return True

    def release(self, member: object) -> None:
        with self._lock:
            self._members.discard(member)
            last = not self._members
        if last:
            try:
                self._nvml.nvmlShutdown()
            except NVMLError as exc:
                log.debug("nvmlShutdown (deferred): %s", exc)
            else:
                log.info("NVML: the calls that outlived their session have returned; "
                         "NVML shut down")

    def seal(self) -> None:
        """Every call is attached: the trio side lets go."""
        self.release(self)


@dataclasses.dataclass
class _Stuck:
    """A GPU whose NVML call did not return: since when, in what, and its thread."""

    what: str
    since: float
    call: _Call


class _NvmlGone(Exception):
    """NVML failed as a whole during a session."""


class _Reread(Exception):
    """A GPU NVML could not read has come back: the session ends so that a new one
    reads the node again (and registers the GPU for events)."""


def _first(group: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group: nested nurseries nest groups."""
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


#: ``selector(model) -> devices`` of one resource.
DeviceSelector = Callable[[NodeModel], Sequence[PlannedDevice]]


def whole_gpus(model: NodeModel) -> list[PlannedDevice]:
    """Every physical GPU, by UUID (MIG-enabled GPUs too: NVIDIA's ``none`` strategy)."""
    return [gpu_device(gpu) for gpu in model.gpus]


def mig_slices(model: NodeModel, profile: str | None = None) -> list[PlannedDevice]:
    """Every MIG device (of one profile, if given), by MIG UUID."""
    return [mig_device(gpu, mig) for gpu in model.gpus for mig in gpu.mig_devices
            if profile is None or mig.profile == profile]


def with_replicas(select: DeviceSelector, replicas: int) -> DeviceSelector:
    """Each device of ``select`` as ``replicas`` shared copies ``<id>::<n>``; all copies
    share the device's health units."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")

    def selector(model: NodeModel) -> list[PlannedDevice]:
        return [copy for device in select(model) for copy in shared_copies(device, replicas)]
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
    #: Not an event: the wait itself failed for one device (GPU_IS_LOST).
    wait_failed: bool = False


@dataclasses.dataclass
class _Probe:
    """What one probe of one GPU found."""

    failure: str | None = None  # NVML cannot reach it
    gone: NVMLError | None = None  # ... because NVML as a whole is gone
    refused: str = ""  # NVML declined its memory info for privilege (MIG mode)
    action_read: bool = False
    action: int | None = None  # the driver's recovery action (None: not reported)
    pending: str | None = None  # retirement or remap pending (needs a reset)
    remap_failed: bool = False
    uncorrected: int | None = None  # volatile uncorrectable ECC errors


#: A stand-in GPU for node-wide NVML calls run through ``_per_gpu`` (counting GPUs).
_NODE: Final = GpuInfo(uuid="the node", index=-1, minor=-1, name="", memory_bytes=0,
                       pci_bus_id="", compute_capability=(0, 0), numa_node=None)


def model_uuids(model: NodeModel) -> set[str]:
    """The GPU UUIDs of a model."""
    return {gpu.uuid for gpu in model.gpus}


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
        self._abandoned: list[_Call] = []
        # The start-up thread that hung, until it returns.
        self._hung_start: threading.Event | None = None
        # Every GPU seen with its facts read in full, by UUID: a GPU NVML cannot reach
        # any more stays in the model (Unhealthy) with these, across sessions.
        self._known: dict[str, GpuInfo] = {}
        # GPU UUID -> why its facts in the model are not (freshly) read: lost at
        # discovery, or not found at all.  Never Healthy while listed; once NVML answers
        # for it, the node is read again.
        self._unread: dict[str, str] = {}
        # NVML indexes whose GPU could not even be identified, and the count discovery saw.
        self._unknown_indexes: set[int] = set()
        self._count = 0
        # Set to probe at once (an event wait reported a lost GPU).
        self._probe_soon = trio.Event()
        # Re-reading the node when a GPU came back: when last, and how many in a row
        # found it still unreadable (for back-off).
        self._reread_at = -math.inf
        self._rereads = 0
        self._count_failing = False  # the GPU count failed (logged once per streak)
        # The driver's recovery action per GPU UUID, where the driver reports it.
        self._actions: dict[str, int] = {}
        self._actions_unsupported: set[str] = set()
        # Volatile uncorrectable ECC count per GPU UUID at the last recovery probe.
        self._ecc: dict[str, int] = {}
        # Health unit -> what keeps it Unhealthy after its window (logged when it changes).
        self._holds: dict[str, str] = {}
        # GPUs whose probe NVML refused for privilege (logged once each).
        self._refused: set[str] = set()
        self._wait_error = ""

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
        # One WARNING per distinct failure and a reminder now and then, not one per
        # back-off step: a node without a driver retries every 30 s for ever.
        unavailable = Reminder()
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
                self.observer.nvml_up(False, failure)
                due = unavailable.due(failure)
                if due == "first":
                    log.warning("NVML unavailable: %s; retrying in %.1f s, backing off to every "
                                "%g s (a reminder every %.0f min while it lasts) (%s)", failure,
                                delay, self.retry_cap, unavailable.interval / 60, _DRIVER_HINT)
                elif due == "reminder":
                    log.warning("NVML still unavailable after %.0f min: %s; still retrying "
                                "(attempt %d, next in %.1f s)", unavailable.lasted / 60,
                                failure, attempt, delay)
                else:
                    log.debug("NVML unavailable: %s; retrying in %.1f s (attempt %d)",
                              failure, delay, attempt)
                if self._mark(self._all_units(), f"NVML unavailable: {failure}"):
                    self.notify()
                await trio.sleep(delay)
                continue
            model = self._install(result)
            unavailable.clear()
            self.observer.nvml_up(True)
            began = trio.current_time()
            try:
                ended = await self._session(model, ready)
            finally:
                with trio.CancelScope(shield=True):
                    await self._shutdown()
            if isinstance(ended, _Reread):
                # Not a failure: a GPU came back (or the GPU count changed), and a new
                # session reads the node again and registers it for events.  Health
                # stays as it is meanwhile.
                log.info("NVML: %s; reading the node again", ended)
                self._reread_at = trio.current_time()
                continue
            failure = ended
            if trio.current_time() - began > self.retry_cap:
                # A session that lasted starts the back-off over; one that failed at once
                # (NVML flapping) keeps doubling it, so flapping cannot flood the log.
                attempt = 0
            self.observer.nvml_up(False, failure)
            log.warning("NVML failed: %s; all devices marked Unhealthy until it answers again",
                        failure)
            if self._mark(self._all_units(), f"NVML failed: {failure}"):
                self.notify()
            delay = _backoff(attempt, self.retry_initial, self.retry_cap)
            attempt += 1
            # The WARNING above said what failed; when the retry comes is detail.
            log.info("NVML: starting a new session in %.1f s", delay)
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
        """End the session's NVML reference, unless a thread is still inside NVML.

        A probe thread abandoned by the cancellation may be in NVML for a moment: wait a
        little for it.  One hung in a wedged GPU's call may never come out; dropping the
        last reference under it would tear NVML down beneath a live call, so the
        reference goes to a :class:`_Holder` and that thread drops it when it returns.
        """
        deadline = trio.current_time() + SHUTDOWN_GRACE
        while any(not c.done.is_set() for c in self._abandoned) and trio.current_time() < deadline:
            await trio.sleep(0.01)
        live = [c for c in self._abandoned if not c.done.is_set()]
        live += [stuck.call for stuck in self._stuck.values() if stuck.call.holder is None]
        self._abandoned = []
        holder = _Holder(self.nvml)
        held = [call for call in live if holder.attach(call)]
        if held:
            log.warning("NVML: %d call(s) have not returned from the driver; NVML stays "
                        "initialised until they do (shutting it down under them would "
                        "free what they use)", len(held))
            holder.seal()
            return
        try:
            await trio.to_thread.run_sync(self.nvml.nvmlShutdown, limiter=self.limiter)
        except NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)

    def _merge(self, result: DiscoveryResult) -> NodeModel:
        """The session's model: what discovery read, plus every GPU seen before that it
        could not read now, with the facts last read in full (or what could be read, for
        a GPU never read in full).  Those are listed in ``_unread`` and stay Unhealthy:
        a GPU that falls off the bus must not vanish from the kubelet's capacity."""
        model = result.model
        unknown = {int(key.split()[1]): problem for key, problem in result.problems.items()
                   if key.startswith("GPU ")}
        gpus: list[GpuInfo] = []
        unread: dict[str, str] = {}
        for gpu in model.gpus:
            problem = result.problems.get(gpu.uuid)
            if problem is None:
                self._known[gpu.uuid] = gpu
                gpus.append(gpu)
            else:
                unread[gpu.uuid] = problem
                gpus.append(self._known.get(gpu.uuid, gpu))
        found = {gpu.uuid for gpu in model.gpus}
        for uuid, known in self._known.items():
            if uuid not in found:
                unread[uuid] = unknown.get(
                    known.index, f"NVML no longer lists it (it was GPU {known.index})")
                gpus.append(known)
        self._unread = unread
        self._unknown_indexes = set(unknown)
        gpus.sort(key=lambda g: g.index)
        return dataclasses.replace(model, gpus=tuple(gpus))

    def _install(self, result: DiscoveryResult) -> NodeModel:
        """Make the session's model current (see :meth:`_merge`); log what was found."""
        first = self.model is None
        model = self._merge(result)
        self.model = model
        self._count = len(result.model.gpus) + len(self._unknown_indexes)
        self.tracker.forget(self._all_units())
        summary = ", ".join(
            f"{g.index}: {g.name} {g.uuid}"
            + (f" MIG [{', '.join(m.profile for m in g.mig_devices)}]" if g.mig_enabled else "")
            + (" (not reachable)" if g.uuid in self._unread else "")
            for g in model.gpus)
        log.info("NVML session %d: driver %s, %d GPU(s)%s%s", self.sessions, model.driver_version,
                 len(model.gpus), ": " if model.gpus else "", summary)
        if first and self.nvml is pynvml:
            log.info("NVML: using %s", describe_loaded())
        for uuid, notes in result.notes.items():
            for note in notes:
                log.info("discovery: GPU %s: %s", uuid, note)
        for device, problem in result.problems.items():
            log.warning("discovery: %s: %s", device, problem)
        for uuid, problem in self._unread.items():
            self._mark(gpu_units(model.gpu(uuid)), f"NVML cannot read it: {problem}")
        self._ready.set()
        if not first or result.problems or self._unread:
            self.notify()
        return model

    async def _session(self, model: NodeModel, ready: Callable[[], None]) -> str | _Reread:
        """Run the event and probe tasks until NVML fails, or the node must be read
        again; return how it failed (or the :class:`_Reread`).  Calls ``ready`` once
        events are registered."""
        failure: str | _Reread = ""
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
            failure = str(_first(group))
        except* _Reread as group:
            reread = _first(group)
            assert isinstance(reread, _Reread)
            failure = reread
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
        event loop (a trio round trip per timeout would cost ~1 ms of CPU each).

        A wait that fails for one device (GPU_IS_LOST: some GPU on the set fell off the
        bus, NVML does not say which) is handed over once per streak, for the probes to
        find the GPU; the thread goes on waiting for the others' events, pacing itself,
        since such a wait may fail at once every time.  Any other failure ends it.
        """
        pause = self.wait_timeout_ms / 1000
        failing = False
        while not stop.is_set():
            try:
                event = self._wait(event_set)
            except NVMLError as exc:
                if error_code(exc) not in DEVICE_ERRORS:
                    raise
                if not failing:
                    failing = True
                    trio.from_thread.run_sync(deliver, _Event(None, 0, 0, 0, 0, str(exc), True))
                stop.wait(pause)
                continue
            failing = False
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
            stop = threading.Event()

            async def stop_on_cancel() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    stop.set()

            async with trio.open_nursery() as nursery:

                def deliver(event: _Event) -> None:
                    if self._on_event(model, event, nursery):
                        self.notify()

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

    def _on_event(self, model: NodeModel, event: _Event, nursery: trio.Nursery) -> bool:
        """Apply one NVML event; whether any device changed health.  Reads of the
        driver's recovery action that it asks for run in ``nursery``."""
        checks = self.checks
        if event.wait_failed:
            if event.error != self._wait_error:
                self._wait_error = event.error
                log.warning("NVML event wait failed: %s (a GPU is lost, and NVML does not say "
                            "which); probing every GPU now, the others stay watched",
                            event.error)
            self._probe_soon.set()
            return False
        self._wait_error = ""
        if event.event_type & EVENT_RECOVERY_ACTION:
            if event.uuid is not None and self._checks_actions and event.uuid in model_uuids(model):
                nursery.start_soon(self._read_action, model.gpu(event.uuid), "")
            return False
        if event.event_type & EVENT_XID:
            self.observer.nvml_event(event.data, "xid")
            if (self._checks_actions and event.uuid is not None
                    and event.uuid in model_uuids(model)):
                # The driver's verdict on this fault, where it gives one.
                nursery.start_soon(self._read_action, model.gpu(event.uuid),
                                   f" after XID {event.data}")
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

    # --- the driver's recovery action -------------------------------------------------------

    @property
    def _checks_actions(self) -> bool:
        return self.checks.checks_recovery_action

    def _recovery_action(self, handle: Any) -> int | None:
        """The driver's recovery action for a GPU (blocking); ``None`` where the driver
        does not report one (older drivers: the field is NOT_SUPPORTED)."""
        try:
            values = self.nvml.nvmlDeviceGetFieldValues(handle, [FIELD_RECOVERY_ACTION])
        except NVMLError as exc:
            if nvml_gone(exc) or error_code(exc) in DEVICE_ERRORS:
                raise
            return None  # FUNCTION_NOT_FOUND, NOT_SUPPORTED: no field values at all
        value = values[0]
        code = int(value.nvmlReturn)
        if code == pynvml.NVML_SUCCESS:
            return int(value.value.uiVal)
        if code in DEVICE_ERRORS:
            raise pynvml.NVMLError(code)
        return None

    async def _read_action(self, gpu: GpuInfo, cause: str) -> None:
        """Read one GPU's recovery action now (after an XID or a recovery-action event)."""
        if gpu.uuid in self._actions_unsupported or gpu.uuid in self._unread:
            return

        def ask(gpu: GpuInfo) -> int | None | NVMLError:
            try:
                return self._recovery_action(self.nvml.nvmlDeviceGetHandleByUUID(gpu.uuid))
            except NVMLError as exc:
                return exc

        answers = await self._per_gpu("reading its recovery action", [gpu], ask)
        answer = answers.get(gpu.uuid)
        if isinstance(answer, NVMLError):
            if nvml_gone(answer) or error_code(answer) in DEVICE_ERRORS:
                self._probe_soon.set()  # the probe finds out what happened to it
            return
        if gpu.uuid in answers and self._apply_action(gpu, answer, cause):
            self.notify()

    def _apply_action(self, gpu: GpuInfo, action: int | None, cause: str = "") -> bool:
        """Take the driver's recovery action for ``gpu`` in; whether health changed.  A
        GPU whose action is not NONE is Unhealthy, its window restarted each time the
        action is read, so it recovers only once the field reads NONE again and the
        window has passed."""
        uuid = gpu.uuid
        if action is None:
            if uuid not in self._actions_unsupported:
                self._actions_unsupported.add(uuid)
                log.info("%s: the driver does not report recovery actions "
                         "(NVML_FI_DEV_GET_GPU_RECOVERY_ACTION); the XID policy alone decides",
                         self._describe(uuid))
            self._actions.pop(uuid, None)
            return False
        name = RECOVERY_ACTIONS.get(action, f"recovery action {action}")
        previous = self._actions.get(uuid)
        self._actions[uuid] = action
        if previous != action:
            self.observer.recovery_action(uuid, name)
            if action != pynvml.NVML_GPU_RECOVERY_ACTION_NONE:
                log.warning("%s: the driver asks for %s%s", self._describe(uuid), name, cause)
            elif previous is not None:
                log.info("%s: the driver no longer asks for a recovery action (it asked for "
                         "%s)", self._describe(uuid),
                         RECOVERY_ACTIONS.get(previous, f"recovery action {previous}"))
        if action == pynvml.NVML_GPU_RECOVERY_ACTION_NONE:
            return False
        return self._mark(gpu_units(gpu), f"the driver asks for {name}{cause}")

    def recovery_action(self, uuid: str) -> str | None:
        """The recovery action the driver last reported for GPU ``uuid`` (``"NONE"``,
        ``"GPU_RESET"``...), ``None`` where it reports none or has not been read."""
        action = self._actions.get(uuid)
        return None if action is None else RECOVERY_ACTIONS.get(action, str(action))

    def reasons(self) -> dict[str, str]:
        """Every unhealthy health unit with why: its first bad signal, and what holds it
        Unhealthy past its window (lasting damage, the driver's action) where something
        does, e.g. ``"XID 48 (double-bit ECC error); held: row remapping failed"``."""
        reasons = self.tracker.unhealthy_units()
        for unit, hold in self._holds.items():
            if unit in reasons:
                reasons[unit] = f"{reasons[unit]}; held: {hold}"
        return reasons

    # --- probes ---------------------------------------------------------------------------

    def _probe_gpu(self, gpu: GpuInfo, unhealthy: frozenset[str]) -> _Probe:
        """Ask NVML about one GPU (blocking).

        Its memory info, or, for a MIG-enabled GPU whose aggregate NVML gives only to a
        privileged caller, its MIG devices' own: NO_PERMISSION means NVML reached the
        GPU and declined, which is no device failure.  Where health checks look at the
        driver's recovery action, that is read too; for a GPU that is Unhealthy, what
        could hold its recovery (pending retirement or remap, lasting damage).
        """
        nvml = self.nvml
        result = _Probe()
        try:
            handle, result.refused = self._reach(gpu)
            for mig in gpu.mig_devices:
                nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByUUID(mig.uuid))
            if self._checks_actions and gpu.uuid not in self._actions_unsupported:
                result.action = self._recovery_action(handle)
                result.action_read = True
            if unhealthy.intersection(gpu_units(gpu)):
                result.pending = self._pending(handle)
                result.remap_failed, result.uncorrected = self._damage(handle)
        except NVMLError as exc:
            result.failure = f"NVML cannot reach it: {exc}"
            result.gone = exc if nvml_gone(exc) else None
        return result

    def _reach(self, gpu: GpuInfo) -> tuple[Any, str]:
        """The GPU's handle, once its memory info answered (blocking), and NVML's refusal
        text where it declined for privilege ("" otherwise): a refusal still means NVML
        reached the GPU.  Raises what NVML raised for anything else."""
        handle = self.nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
        try:
            self.nvml.nvmlDeviceGetMemoryInfo(handle)
        except NVMLError as exc:
            if error_code(exc) != pynvml.NVML_ERROR_NO_PERMISSION:
                raise
            return handle, str(exc)
        return handle, ""

    def _answers(self, gpu: GpuInfo) -> bool:
        """Whether NVML answers for a GPU it could not read (blocking)."""
        try:
            self._reach(gpu)
        except NVMLError as exc:
            if nvml_gone(exc):
                raise
            return False
        return True

    def _node_changed(self, indexes: set[int], count: int) -> str | None:
        """Why the node must be read again, judged by NVML's GPU count and the GPUs it
        could not identify (blocking); ``None`` if nothing changed."""
        nvml = self.nvml
        now = nvml.nvmlDeviceGetCount()
        if now != count:
            return f"NVML now counts {now} GPU(s), not {count}"
        for index in sorted(indexes):
            try:
                uuid = text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index)))
            except NVMLError as exc:
                if nvml_gone(exc):
                    raise
                continue
            return f"GPU {index} ({uuid}) answers again"
        return None

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
            call.finish()

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
                    self._abandoned.append(call)
            answers.update(call.results)
            hung = call.current
            if finished or hung is None or hung in call.results:
                break  # done, or it returned right at the deadline
            self._abandoned.remove(call)  # hung: tracked in _stuck from now on
            self._hung(hung, what, call)
            todo = todo[[g.uuid for g in todo].index(hung) + 1:]
        return answers

    def _hung(self, uuid: str, what: str, call: _Call) -> None:
        """Record that NVML hangs in ``what`` for the GPU ``uuid``: log it once, mark it."""
        self._stuck[uuid] = _Stuck(what, trio.current_time(), call)
        self.limiter.total_tokens += 1
        model = self.model
        gpu = next((g for g in model.gpus if g.uuid == uuid), None) if model is not None else None
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
            if stuck.call.done.is_set():
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

    def _damage(self, handle: Any) -> tuple[bool, int | None]:
        """(row remapping failed, volatile uncorrectable ECC count) of a GPU (blocking);
        what NVML does not support reads as no failure and no count."""
        nvml = self.nvml
        failed = False
        try:
            failed = bool(nvml.nvmlDeviceGetRemappedRows(handle)[3])
        except NVMLError as exc:
            if nvml_gone(exc) or error_code(exc) in DEVICE_ERRORS:
                raise
        count: int | None = None
        try:
            count = int(nvml.nvmlDeviceGetTotalEccErrors(
                handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC))
        except NVMLError as exc:
            if nvml_gone(exc) or error_code(exc) in DEVICE_ERRORS:
                raise
        return failed, count

    def _hold(self, gpu: GpuInfo, probe: _Probe, now: float) -> str | None:
        """What keeps ``gpu`` Unhealthy past its window now, from one probe, or ``None``.

        A pending page retirement or row remap always holds (the GPU needs a reset).  A
        failed row remapping, or a volatile uncorrectable ECC count that rose since the
        last probe (which is also a fresh bad signal), holds unless the driver, where it
        reports recovery actions, says NONE: its verdict is better informed than ours.
        A recovery action other than NONE holds too.
        """
        uuid = gpu.uuid
        damage = None
        if probe.remap_failed:
            damage = "row remapping failed (the GPU needs service)"
        if probe.uncorrected is not None:
            last = self._ecc.get(uuid)
            self._ecc[uuid] = probe.uncorrected
            if last is not None and probe.uncorrected > last:
                damage = (f"uncorrectable ECC errors keep climbing ({last} -> "
                          f"{probe.uncorrected})")
                for unit in gpu_units(gpu):
                    self.tracker.mark(unit, damage, now)
        action = self._actions.get(uuid)
        if action == pynvml.NVML_GPU_RECOVERY_ACTION_NONE:
            damage = None
        elif action is not None:
            return probe.pending or f"the driver asks for {RECOVERY_ACTIONS.get(action, action)}"
        return probe.pending or damage

    async def _reread_due(self, model: NodeModel) -> str | None:
        """Why the node should be read again now: a GPU NVML could not read answers, or
        NVML's GPU count changed; ``None`` if not (or not yet: re-reads that still find a
        GPU unreadable back off)."""
        now = trio.current_time()
        delay = 0.0 if not self._rereads else min(
            self.retry_cap, self.probe_interval * 2.0 ** min(self._rereads, 16))
        if now - self._reread_at < delay:
            return None
        unread = [gpu for gpu in model.gpus if gpu.uuid in self._unread]
        try:
            if unread:
                answers = await self._per_gpu("a probe", unread, self._answers)
                back = [uuid for uuid, ok in answers.items() if ok]
                if back:
                    return f"{self._describe(back[0])} answers again"
            answer = await self._per_gpu(
                "counting GPUs", [_NODE], lambda _: self._node_changed(
                    set(self._unknown_indexes), self._count))
        except NVMLError as exc:
            # Both helpers raise only what names no GPU.  NVML gone as a whole ends the
            # session like a failed probe; anything else (the count's UNKNOWN) only
            # blinds this change check, not the GPUs' health: they answer their probes.
            if nvml_gone(exc):
                raise _NvmlGone(f"counting GPUs failed: {exc}") from exc
            if not self._count_failing:
                self._count_failing = True
                log.warning("NVML could not count GPUs: %s; GPUs that appear or come back "
                            "are not seen until it can (asked again every %.1f s); the "
                            "GPUs' health is not affected", exc, self.probe_interval)
            return None
        if self._count_failing:
            self._count_failing = False
            log.info("NVML counts GPUs again")
        return answer.get(_NODE.uuid)

    async def _probe_task(self, model: NodeModel) -> None:
        probed = [gpu for gpu in model.gpus if gpu.uuid not in self._unread]
        while True:
            with trio.move_on_after(self.probe_interval):
                await self._probe_soon.wait()
            self._probe_soon = trio.Event()
            self._check_hung()
            reason = await self._reread_due(model)
            if reason is not None:
                raise _Reread(reason)
            unhealthy = frozenset(self.tracker.unhealthy_units())
            if not unhealthy and not self.checks.checks_lost and not self._checks_actions:
                continue
            answers = await self._per_gpu("a health probe", probed,
                                          functools.partial(self._probe_gpu, unhealthy=unhealthy))
            gone = [probe.gone for probe in answers.values() if probe.gone is not None]
            if gone and len(gone) == len(probed):
                raise _NvmlGone(f"probes failed: {gone[0]}")
            failed = [probe.failure for probe in answers.values() if probe.failure is not None]
            if self._count_failing and probed and len(failed) == len(probed):
                # Every GPU and the GPU count fail (a driver being reloaded answers UNKNOWN
                # to everything): not one device's fault, and only a new session (init,
                # fresh handles) can get past it.
                raise _NvmlGone(f"every GPU and the GPU count fail: {failed[0]}")
            now = trio.current_time()
            changed = False
            for gpu in probed:
                probe = answers.get(gpu.uuid)
                if probe is None:
                    continue  # hung: _per_gpu marked it
                if probe.refused and gpu.uuid not in self._refused:
                    self._refused.add(gpu.uuid)
                    log.info("%s: NVML answers its probe with %r (MIG mode without "
                             "privilege); its MIG devices are probed instead: not a device "
                             "failure", self._describe(gpu.uuid), probe.refused)
                if probe.failure is not None:
                    for unit in gpu_units(gpu):
                        if self.checks.checks_lost or unit in unhealthy:
                            changed |= self._log(self.tracker.mark(unit, probe.failure, now))
                    continue
                if probe.action_read:
                    changed |= self._apply_action(gpu, probe.action)
                if not unhealthy.intersection(gpu_units(gpu)):
                    continue
                hold = self._hold(gpu, probe, now)
                for unit in gpu_units(gpu):
                    if unit not in unhealthy:
                        continue
                    transition = self.tracker.probe_ok(unit, now, hold)
                    changed |= self._log(transition)
                    self._note_hold(unit, None if transition is not None else hold)
            if changed:
                self.notify()

    def _note_hold(self, unit: str, hold: str | None) -> None:
        """Log once (per condition) what holds ``unit`` Unhealthy beyond its window."""
        if hold is None or self.tracker.healthy(unit):
            self._holds.pop(unit, None)
            return
        if self._holds.get(unit) == hold:
            return
        self._holds[unit] = hold
        log.warning("%s stays unhealthy: %s", self._describe(unit), hold)

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
    lists the devices' UUIDs, each once (replicas of one GPU name it once).
    """

    def __init__(self, node: NvmlNode, select: DeviceSelector = whole_gpus) -> None:
        self.node = node
        self.select = select
        self._model: NodeModel | None = None
        self._devices: dict[str, PlannedDevice] = {}

    def devices(self) -> list[PlannedDevice]:
        """The devices of the current model, as the selector picks them."""
        model = self.node.model
        if model is not None and model is not self._model:
            devices = list(self.select(model))
            self._devices = {d.id: d for d in devices}
            self._model = model
        return list(self._devices.values())

    def device_infos(self) -> list[DeviceInfo]:
        """The device list as published now."""
        return [d.advertised(self.node.healthy(d.units)) for d in self.devices()]

    async def run(self, publish: Publish, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish the device list once the node is up, then every change."""
        await follow(self.node, self.device_infos, publish, task_status=task_status)

    def allocate(self, device_ids: Sequence[str]) -> v1beta1.ContainerAllocateResponse:
        """NVIDIA's ``envvar`` strategy."""
        self.devices()
        visible = dict.fromkeys(self._devices[i].uuid for i in device_ids)
        return v1beta1.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": ",".join(visible)})
