"""What the runtime tells an observer (metrics, health probes): one narrow interface.

The plugin calls these at the moments an operator cares about; :class:`Observer` ignores
them all, so nothing is measured (and no metrics library is loaded) unless asked for.
``_metrics.Metrics`` implements the same methods for ``--metrics-address``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

__all__ = ["LiveCheck", "Observer", "Problem"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a resource right now, as a live check found it.

    ``text`` says what and why, for a person (the health endpoints prefix the resource
    name).  ``since`` is the trio time at which the state began when it is one the
    plugin recovers from by itself (between a kubelet restart and the new
    registration, say): liveness forgives it for a grace period, readiness does not.
    ``None`` means nothing will repair it without a restart: liveness fails at once.
    """

    text: str
    since: float | None = None


#: A resource's live check: ``await check(timeout)`` looks now (dials the plugin's
#: socket, inspects the kubelet's stream) within ``timeout`` seconds and returns what is
#: wrong, nothing when all is well.
LiveCheck = Callable[[float], Awaitable[list[Problem]]]


class Observer:
    """Receives the plugin's events; every method does nothing here."""

    def registered(self, resource: str) -> None:
        """The kubelet accepted a registration of ``resource``."""

    def kubelet_restart(self, resource: str) -> None:
        """An epoch of ``resource`` ended because the kubelet restarted."""

    def rpc(self, method: str, resource: str, seconds: float, ok: bool) -> None:
        """A DevicePlugin call was answered (or failed)."""

    def nvml_event(self, xid: int | None, kind: str) -> None:
        """NVML reported an event that counts (``xid``, ``ecc-dbe``, ``gpu-unavailable``)."""

    def health_transition(self, unit: str, healthy: bool, reason: str) -> None:
        """A GPU or MIG device changed health."""

    def recovery_action(self, gpu: str, action: str) -> None:
        """The driver's recovery action for GPU ``gpu`` (UUID) is now ``action``
        (``"NONE"``, ``"GPU_RESET"``...); only for GPUs whose driver reports one."""

    def set_devices(self, resource: str, healthy: int, unhealthy: int) -> None:
        """``resource`` now advertises these many devices."""

    def nvml_up(self, up: bool, reason: str = "") -> None:
        """NVML started answering, or stopped (or failed to start) for ``reason``, the
        NVML error as the log shows it (``"Driver Not Loaded"``), for the health
        endpoints to say why."""

    def set_resource(self, resource: str, registered: bool, serving: bool, reason: str) -> None:
        """``resource``'s registration and server state as last reported, for the health
        endpoints where ``resource`` has no live check (:meth:`set_live_check`)."""

    def set_live_check(self, resource: str, check: LiveCheck) -> None:
        """The health endpoints should ask ``check`` about ``resource`` on each probe
        (replacing any earlier check of that name)."""

    def forget_resource(self, resource: str) -> None:
        """``resource`` is no longer served."""
