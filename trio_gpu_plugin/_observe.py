"""What the runtime tells an observer (metrics, health probes): one narrow interface.

The plugin calls these at the moments an operator cares about; :class:`Observer` ignores
them all, so nothing is measured (and no metrics library is loaded) unless asked for.
``_metrics.Metrics`` implements the same methods for ``--metrics-address``.
"""

from __future__ import annotations

__all__ = ["Observer"]


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

    def set_devices(self, resource: str, healthy: int, unhealthy: int) -> None:
        """``resource`` now advertises these many devices."""

    def nvml_up(self, up: bool) -> None:
        """NVML started answering, or stopped."""

    def set_resource(self, resource: str, registered: bool, serving: bool, reason: str) -> None:
        """``resource``'s registration and server state, for the health endpoints."""

    def forget_resource(self, resource: str) -> None:
        """``resource`` is no longer served."""
