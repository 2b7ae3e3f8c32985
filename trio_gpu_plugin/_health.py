"""Health policy: which signals count, what they hit, and when a unit recovers.

Sans-IO: plain functions and small state machines over plain data.  Nothing here calls
NVML, reads a clock, sleeps or logs; the caller passes the time in (float seconds from
one monotonic clock) and logs what the functions return.

Three pieces, in the order an NVML event travels through them:

* :class:`HealthChecks`: NVIDIA's ``DP_DISABLE_HEALTHCHECKS`` / ``DP_ENABLE_HEALTHCHECKS``
  knobs, parsed as NVIDIA parses them, deciding which events to register and which XIDs
  count.
* :func:`units_for_event`: which *health units* (GPU UUIDs and MIG UUIDs) an event on a
  physical GPU hits.
* :class:`HealthTracker`: per-unit health with a hold-down window, so a unit that NVML
  answers for again and that has had no critical event for a while becomes healthy again
  (NVIDIA never recovers, see its issues #234 and #1014).

A logical device the kubelet sees (a whole GPU, a MIG slice, or any replica of either) is
healthy iff every unit it is built on is (:func:`logical_health`); replicas share their
device's units, so one event marks every replica (NVIDIA #1929).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Final

from ._node_model import GpuInfo, MigInfo, NodeModel
from ._nvml import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_GPU_UNAVAILABLE,
    EVENT_RECOVERY_ACTION,
    EVENT_XID,
    NO_INSTANCE,
)

__all__ = [
    "DISABLE_VAR",
    "ENABLE_VAR",
    "IGNORED_XIDS",
    "HealthChecks",
    "HealthTracker",
    "Transition",
    "describe_xid",
    "gpu_units",
    "logical_health",
    "mig_units",
    "units_for_event",
]

#: NVIDIA's "application error" XIDs: the application misbehaved, the GPU is fine.
IGNORED_XIDS: Final = frozenset({13, 31, 43, 45, 68, 109})

DISABLE_VAR: Final = "DP_DISABLE_HEALTHCHECKS"
ENABLE_VAR: Final = "DP_ENABLE_HEALTHCHECKS"

# XIDs arrive as NVML's unsigned 64-bit event data; NVIDIA parses them with
# strconv.ParseUint(s, 10, 64), so anything wider is as malformed as a word.
_MAX_XID: Final = 2**64 - 1


@dataclasses.dataclass(frozen=True)
class _Parsed:
    keywords: frozenset[str]
    xids: frozenset[int]
    problems: tuple[str, ...]


def _parse(var: str, value: str, keywords: frozenset[str], expected: str) -> _Parsed:
    found: set[str] = set()
    xids: set[int] = set()
    problems: list[str] = []
    for raw in value.split(","):
        item = raw.strip()
        word = item.lower()
        if not word:
            continue
        if word in keywords:
            found.add(word)
        # isdecimal alone would accept non-ASCII digits and int() would accept "+5" and
        # "1_0"; ParseUint takes none of them.
        elif word.isascii() and word.isdecimal() and int(word) <= _MAX_XID:
            xids.add(int(word))
        else:
            problems.append(f"{var}: ignoring {item!r} (not an XID number{expected})")
    return _Parsed(frozenset(found), frozenset(xids), tuple(problems))


def _setting(keywords: Iterable[str], xids: Iterable[int]) -> str:
    return ",".join([*sorted(keywords), *(str(x) for x in sorted(xids))])


@dataclasses.dataclass(frozen=True)
class HealthChecks:
    """Which health checks run, from ``DP_DISABLE_HEALTHCHECKS`` and ``DP_ENABLE_HEALTHCHECKS``.

    Parsed as NVIDIA parses them, with one fix: NVIDIA monitors nothing at all when
    ``DP_DISABLE_HEALTHCHECKS=all`` and ``DP_ENABLE_HEALTHCHECKS`` names XIDs, although
    its own comment says the named XIDs stay on; here exactly those XIDs are monitored.

    Beyond XIDs this plugin also checks double-bit ECC events and lost GPUs (NVML's "GPU
    unavailable" event and periodic probes).  ``DP_DISABLE_HEALTHCHECKS=all`` turns those
    off too (unless ``DP_ENABLE_HEALTHCHECKS=all``); ``xids`` turns off only XID checks.

    Attributes:
        disable_all: ``DP_DISABLE_HEALTHCHECKS`` holds ``all``.
        disable_xids: ``DP_DISABLE_HEALTHCHECKS`` holds ``xids``.
        disabled: XIDs listed in ``DP_DISABLE_HEALTHCHECKS``.
        enable_all: ``DP_ENABLE_HEALTHCHECKS`` holds ``all``.
        enabled: XIDs listed in ``DP_ENABLE_HEALTHCHECKS``.
        problems: one message per item that was ignored because it is malformed, for
            the caller to log.
    """

    disable_all: bool = False
    disable_xids: bool = False
    disabled: frozenset[int] = frozenset()
    enable_all: bool = False
    enabled: frozenset[int] = frozenset()
    problems: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HealthChecks:
        """Parse the two variables from ``env`` (``os.environ`` or a plain dict).

        Each is a comma-separated list; items are whitespace-stripped and lower-cased,
        empty items are skipped.  ``all`` (and, in ``DP_DISABLE_HEALTHCHECKS``, ``xids``)
        are keywords; non-negative integers are XIDs; anything else is recorded in
        :attr:`problems` and otherwise ignored, as NVIDIA logs and ignores it.
        """
        disable = _parse(
            DISABLE_VAR, env.get(DISABLE_VAR, ""), frozenset({"all", "xids"}), ", 'all' or 'xids'"
        )
        enable = _parse(ENABLE_VAR, env.get(ENABLE_VAR, ""), frozenset({"all"}), " or 'all'")
        return cls(
            disable_all="all" in disable.keywords,
            disable_xids="xids" in disable.keywords,
            disabled=disable.xids,
            enable_all="all" in enable.keywords,
            enabled=enable.xids,
            problems=disable.problems + enable.problems,
        )

    def counts_xid(self, xid: int) -> bool:
        """Whether an XID critical-error event with this XID marks its GPU unhealthy."""
        if self.enable_all or xid in self.enabled:
            return True
        if self.disable_all or self.disable_xids:
            return False
        return xid not in IGNORED_XIDS and xid not in self.disabled

    @property
    def checks_xids(self) -> bool:
        """Whether any XID at all can count (so XID events must be registered)."""
        return self.enable_all or bool(self.enabled) or not (self.disable_all or self.disable_xids)

    @property
    def checks_recovery_action(self) -> bool:
        """Whether the driver's recovery action (``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION``,
        its verdict on XIDs per NVIDIA's XID catalog) marks a GPU unhealthy.  It goes
        with the default XID checks: ``DP_DISABLE_HEALTHCHECKS=xids`` or ``all`` turns it
        off (and ``all`` plus named XIDs watches exactly those XIDs), unless
        ``DP_ENABLE_HEALTHCHECKS=all``."""
        return self.enable_all or not (self.disable_all or self.disable_xids)

    @property
    def checks_dbe(self) -> bool:
        """Whether double-bit ECC events mark a GPU unhealthy."""
        return self.enable_all or not self.disable_all

    @property
    def checks_lost(self) -> bool:
        """Whether a lost GPU (NVML's GPU-unavailable event, failed probes) marks it unhealthy."""
        return self.enable_all or not self.disable_all

    @property
    def watches_events(self) -> bool:
        """Whether an NVML event set is needed at all."""
        return self.checks_xids or self.checks_dbe or self.checks_lost

    @property
    def off(self) -> bool:
        """Whether nothing at all is checked: no event set, no probes."""
        return not self.watches_events

    def event_mask(self, supported: int) -> int:
        """The NVML event types to register on a GPU that supports ``supported``.

        NVML rejects a registration that names a type the GPU does not support, hence the
        AND; a result of 0 means there is nothing to register on that GPU.
        """
        mask = 0
        if self.checks_xids:
            mask |= EVENT_XID
        if self.checks_recovery_action:
            mask |= EVENT_RECOVERY_ACTION
        if self.checks_dbe:
            mask |= EVENT_DOUBLE_BIT_ECC
        if self.checks_lost:
            mask |= EVENT_GPU_UNAVAILABLE
        return mask & supported

    def describe(self) -> str:
        """One line for the start-up log, e.g. ``health checks: XIDs except 13, 31, 43,
        45, 68, 109; double-bit ECC; GPU lost``; non-default settings follow in brackets."""
        settings = []
        disable = _setting(
            [k for k, on in (("all", self.disable_all), ("xids", self.disable_xids)) if on],
            self.disabled,
        )
        if disable:
            settings.append(f"{DISABLE_VAR}={disable}")
        enable = _setting(["all"] if self.enable_all else [], self.enabled)
        if enable:
            settings.append(f"{ENABLE_VAR}={enable}")
        suffix = f" ({', '.join(settings)})" if settings else ""
        if self.off:
            return f"health checks: off{suffix}"

        checks = []
        if self.enable_all:
            checks.append("all XIDs")
        elif self.disable_all or self.disable_xids:
            if self.enabled:
                checks.append(f"only XIDs {_numbers(self.enabled)}")
        else:
            excluded = (IGNORED_XIDS | self.disabled) - self.enabled
            checks.append(f"XIDs except {_numbers(excluded)}" if excluded else "all XIDs")
        if self.checks_recovery_action:
            checks.append("driver recovery action")
        if self.checks_dbe:
            checks.append("double-bit ECC")
        if self.checks_lost:
            checks.append("GPU lost")
        return f"health checks: {'; '.join(checks)}{suffix}"


def _numbers(xids: Iterable[int]) -> str:
    return ", ".join(str(x) for x in sorted(xids))


# Short meanings from NVIDIA's XID catalog, for log lines only: never a policy input.
_XID_MEANINGS: Final[Mapping[int, str]] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup, due to previous errors",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapping recording failure",
    68: "video processor exception",
    69: "graphics engine class error",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    109: "context switch timeout",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}


def describe_xid(xid: int) -> str:
    """A short meaning of a well-known XID for log lines, ``""`` for any other XID."""
    return _XID_MEANINGS.get(xid, "")


def units_for_event(model: NodeModel, gpu_uuid: str, gi: int, ci: int) -> tuple[str, ...]:
    """The health units an NVML event on physical GPU ``gpu_uuid`` hits.

    ``gi`` and ``ci`` are the event's GPU and compute instance IDs
    (:data:`~trio_gpu_plugin._nvml.NO_INSTANCE` when the event names none).

    * Unknown GPU: ``()``.
    * No GPU instance named (``gi`` is the sentinel), or a GPU without MIG devices: the
      whole GPU, i.e. its UUID and every MIG UUID on it.
    * A GPU instance but no compute instance (``ci`` is the sentinel): every MIG device in
      that GPU instance.
    * Both named: the MIG device with that GPU and compute instance.

    A named instance this node does not serve hits nothing (NVIDIA ignores those too).
    """
    gpu = next((g for g in model.gpus if g.uuid == gpu_uuid), None)
    if gpu is None:
        return ()
    # NVML sets a compute instance only together with its GPU instance, so an event
    # without a GPU instance is not attributable to any slice: it is the whole GPU's.
    if gi == NO_INSTANCE or not gpu.mig_devices:
        return gpu_units(gpu)
    # A GPU instance owns its memory and SMs, so an error attributed to it (with no
    # compute instance) concerns every slice in it and no slice outside it.
    return tuple(
        m.uuid
        for m in gpu.mig_devices
        if m.gi_id == gi and (ci == NO_INSTANCE or m.ci_id == ci)
    )


def gpu_units(gpu: GpuInfo) -> tuple[str, ...]:
    """The units a whole GPU is built on: its UUID and every MIG UUID on it."""
    return (gpu.uuid, *(m.uuid for m in gpu.mig_devices))


def mig_units(mig: MigInfo) -> tuple[str, ...]:
    """The units a MIG slice is built on: its own UUID and its parent GPU's UUID."""
    return (mig.uuid, mig.parent_uuid)


@dataclasses.dataclass(frozen=True)
class Transition:
    """A unit's health changed; the caller logs it once and republishes devices.

    Attributes:
        unit: the GPU or MIG UUID.
        healthy: the new state.
        reason: why: the bad signal when it went unhealthy, what cleared it when healthy.
    """

    unit: str
    healthy: bool
    reason: str


@dataclasses.dataclass
class _Unhealthy:
    reason: str
    last_bad: float
    repeats: int = 0


class HealthTracker:
    """Per-unit health with recovery after a hold-down window.

    Every unit starts (and, never marked, stays) healthy.  A bad signal makes it
    unhealthy; it becomes healthy again on a good probe once ``window`` seconds have
    passed since its last bad signal, with no recovery-blocking condition pending.

    Args:
        window: the hold-down window in seconds; ``0`` means never recover (NVIDIA's
            behaviour).
    """

    def __init__(self, window: float) -> None:
        # NaN would make every comparison false and so silently mean "never recover".
        if not window >= 0:
            raise ValueError(f"health recovery window must be >= 0 seconds, not {window!r}")
        self._window = window
        self._unhealthy: dict[str, _Unhealthy] = {}

    @property
    def window(self) -> float:
        """The hold-down window in seconds (0: never recover)."""
        return self._window

    def mark(self, unit: str, reason: str, now: float) -> Transition | None:
        """A bad signal for ``unit`` at ``now`` (critical event, failed probe, NVML failure).

        Restarts the unit's window.  Returns a :class:`Transition` only if the unit was
        healthy; while it stays unhealthy its first reason is kept, so logs and status
        stay stable, and further signals are counted in :meth:`repeats`.
        """
        state = self._unhealthy.get(unit)
        if state is not None:
            state.repeats += 1
            # A signal stamped earlier than one already seen must not shorten the window.
            state.last_bad = max(state.last_bad, now)
            return None
        self._unhealthy[unit] = _Unhealthy(reason, now)
        return Transition(unit, False, reason)

    def probe_ok(self, unit: str, now: float, pending: str | None = None) -> Transition | None:
        """NVML answered for ``unit`` at ``now``.

        ``pending`` names a condition recovery must wait for (e.g. ``"row remap
        pending"``); with it the unit stays as it is.  Otherwise an unhealthy unit becomes
        healthy iff the window is non-zero and at least ``window`` seconds have passed
        since its last bad signal; the returned :class:`Transition` says why.
        """
        state = self._unhealthy.get(unit)
        if state is None or pending is not None or self._window == 0:
            return None
        # Compare against the same sum recovery_due() reports, so recovering "at"
        # recovery_due() works despite float rounding.
        if now < state.last_bad + self._window:
            return None
        del self._unhealthy[unit]
        return Transition(
            unit, True, f"NVML answers again and no critical event for {self._window:g} s"
        )

    def healthy(self, unit: str) -> bool:
        """Whether ``unit`` is healthy (units never marked are)."""
        return unit not in self._unhealthy

    def reason(self, unit: str) -> str | None:
        """Why ``unit`` is unhealthy (its first bad signal), ``None`` if healthy."""
        state = self._unhealthy.get(unit)
        return None if state is None else state.reason

    def repeats(self, unit: str) -> int:
        """How many further bad signals ``unit`` had since it went unhealthy (0 if healthy)."""
        state = self._unhealthy.get(unit)
        return 0 if state is None else state.repeats

    def unhealthy_units(self) -> dict[str, str]:
        """Every unhealthy unit with its reason (a fresh dict)."""
        return {unit: state.reason for unit, state in self._unhealthy.items()}

    def recovery_due(self, unit: str) -> float | None:
        """The earliest time ``unit`` could recover, ``None`` if healthy or the window is 0."""
        state = self._unhealthy.get(unit)
        if state is None or self._window == 0:
            return None
        return state.last_bad + self._window

    def forget(self, units_keep: Iterable[str]) -> None:
        """Drop the state of every unit not in ``units_keep`` (units that no longer exist)."""
        keep = set(units_keep)
        for unit in [u for u in self._unhealthy if u not in keep]:
            del self._unhealthy[unit]


def logical_health(tracker: HealthTracker, units: Iterable[str]) -> bool:
    """Whether a logical device built on ``units`` is healthy: iff every unit is.

    Pass :func:`gpu_units` for a whole GPU, :func:`mig_units` for a MIG slice; a replica
    passes its device's units, which is what makes one event mark every replica.
    """
    return all(tracker.healthy(unit) for unit in units)
