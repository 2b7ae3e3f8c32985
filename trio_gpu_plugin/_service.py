"""The DevicePlugin gRPC service of one resource: device table, watchers, admission.

The device table is the latest full list the source published.  ListAndWatch handlers
do not queue updates: each one sends the current table, then sleeps until the table's
version moves past what it sent, then sends the table as it is *then*.  So any number of
watchers cost one event each, a watcher that goes away leaves nothing behind, and a
burst of changes reaches a slow watcher as the latest state only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

from ._devices import DeviceInfo, Resource, check_allocatable
from ._grpc import RpcError, StatusCode
from ._observe import Observer
from ._transport import Service
from .proto import v1beta1

__all__ = ["DevicePluginService"]

log = logging.getLogger("trio_gpu_plugin.service")

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class DevicePluginService:
    """The five DevicePlugin RPCs for one :class:`~trio_gpu_plugin.Resource`."""

    def __init__(self, resource: Resource, observer: Observer | None = None) -> None:
        self.resource = resource
        self.observer = observer or Observer()
        self._devices: dict[str, DeviceInfo] = {}
        self._response = v1beta1.ListAndWatchResponse()
        self._version = 0
        self._changed = trio.Event()
        #: ListAndWatch streams open now (the kubelet's, plus any other client's).
        self.watchers = 0
        #: trio time at which the last open stream ended; ``None`` until one has.  The
        #: live health check reads it with :attr:`watchers` to say for how long nobody
        #: has been watching.
        self.unwatched_since: float | None = None

    # --- the device table -------------------------------------------------------------

    @property
    def devices(self) -> dict[str, DeviceInfo]:
        """The latest published devices, by ID (do not modify)."""
        return self._devices

    def publish(self, devices: Sequence[DeviceInfo]) -> None:
        """Replace the device table (the device source calls this)."""
        table = {d.id: d for d in devices}
        if len(table) != len(devices):
            duplicates = sorted({d.id for d in devices if sum(x.id == d.id for x in devices) > 1})
            raise ValueError(f"{self.resource.name}: duplicate device IDs {duplicates}")
        if table == self._devices and self._version:
            return
        before = self._devices
        self._devices = table
        # Encoded lazily by each watcher from this one message object.
        self._response = v1beta1.ListAndWatchResponse(devices=[d.to_proto() for d in devices])
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()
        healthy = sum(d.healthy for d in devices)
        self.observer.set_devices(self.resource.name, healthy, len(table) - healthy)
        newly_unhealthy = sorted(
            i for i, d in table.items() if not d.healthy and before.get(i, d).healthy)
        if newly_unhealthy:
            log.warning("%s: device(s) %s became unhealthy (%d of %d healthy)",
                        self.resource.name, ", ".join(newly_unhealthy), healthy, len(table))
        else:
            log.info("%s: %d device(s), %d healthy", self.resource.name, len(table), healthy)

    # --- RPCs --------------------------------------------------------------------------

    async def get_device_plugin_options(self, request: v1beta1.Empty) -> v1beta1.DevicePluginOptions:
        return self.resource.options

    async def list_and_watch(
        self, request: v1beta1.Empty, send: Callable[[v1beta1.ListAndWatchResponse], Awaitable[None]]
    ) -> None:
        self.watchers += 1
        log.info("%s: the kubelet is watching (%d watcher(s))", self.resource.name, self.watchers)
        try:
            while True:
                version, changed = self._version, self._changed
                await send(self._response)
                if version == self._version:
                    await changed.wait()
        finally:
            self.watchers -= 1
            if not self.watchers:
                self.unwatched_since = trio.current_time()

    async def get_preferred_allocation(
        self, request: v1beta1.PreferredAllocationRequest
    ) -> v1beta1.PreferredAllocationResponse:
        return await self._timed("GetPreferredAllocation", self._get_preferred_allocation, request)

    async def _timed(self, method: str, handler: Callable[[_Req], Awaitable[_Resp]],
                     request: _Req) -> _Resp:
        started = time.perf_counter()
        ok = False
        try:
            response = await handler(request)
            ok = True
            return response
        finally:
            self.observer.rpc(method, self.resource.name, time.perf_counter() - started, ok)

    async def _get_preferred_allocation(
        self, request: v1beta1.PreferredAllocationRequest
    ) -> v1beta1.PreferredAllocationResponse:
        policy = self.resource.preferred_allocation
        if policy is None:
            raise RpcError(StatusCode.UNIMPLEMENTED,
                           f"{self.resource.name} does not offer preferred allocations")
        responses = []
        for container in request.container_requests:
            if container.allocation_size < 0:
                raise RpcError(StatusCode.INVALID_ARGUMENT,
                               f"allocation_size {container.allocation_size} is negative")
            available = [self._devices[i] for i in dict.fromkeys(container.available_deviceIDs)
                         if i in self._devices]
            chosen = policy(available, container.must_include_deviceIDs, container.allocation_size)
            responses.append(v1beta1.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return v1beta1.PreferredAllocationResponse(container_responses=responses)

    async def allocate(self, request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        return await self._timed("Allocate", self._allocate, request)

    async def _allocate(self, request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        responses = []
        for container in request.container_requests:
            ids = check_allocatable(self.resource.name, self._devices, container.devices_ids)
            responses.append(self.resource.source.allocate(ids))
        log.info("%s: allocated %s", self.resource.name,
                 "; ".join(",".join(c.devices_ids) for c in request.container_requests))
        return v1beta1.AllocateResponse(container_responses=responses)

    async def pre_start_container(
        self, request: v1beta1.PreStartContainerRequest
    ) -> v1beta1.PreStartContainerResponse:
        if self.resource.pre_start is not None:
            await self.resource.pre_start(list(request.devices_ids))
        return v1beta1.PreStartContainerResponse()

    def service(self) -> Service:
        """These handlers as a gRPC service for :func:`~trio_gpu_plugin.serve_unix`."""
        return Service(v1beta1.DEVICE_PLUGIN, {
            "GetDevicePluginOptions": self.get_device_plugin_options,
            "ListAndWatch": self.list_and_watch,
            "GetPreferredAllocation": self.get_preferred_allocation,
            "Allocate": self.allocate,
            "PreStartContainer": self.pre_start_container,
        })
