"""A simulated GPU node: a device source with no GPU behind it, for tests, demos and CI.

Devices and their health live in memory; tests (or the demo) change health on demand with
:meth:`SimulatedDeviceSource.set_health`, and every running source publishes the new list
at once.  Allocate answers the way NVIDIA's plugin does with its default ``envvar``
strategy: ``NVIDIA_VISIBLE_DEVICES`` lists the device IDs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Sequence
from typing import Any, Final

import trio

from ._devices import DeviceInfo, Publish
from .proto import v1beta1

__all__ = ["PRESETS", "SimulatedDeviceSource", "SimulatedGPU"]

_UUID_NAMESPACE: Final = uuid.UUID("7f0c8a52-3f5e-4c1e-9a53-1b1f5f7e8a11")


@dataclasses.dataclass(frozen=True)
class SimulatedGPU:
    """One simulated GPU."""

    uuid: str
    index: int
    numa_node: int | None = None
    model: str = "NVIDIA A100-SXM4-40GB"
    memory_mib: int = 40960


def _preset_gpus(name: str, count: int, numa_nodes: int, model: str, memory_mib: int) -> list[SimulatedGPU]:
    per_node = count // numa_nodes
    return [
        SimulatedGPU(
            uuid=f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{name}/{i}')}",
            index=i,
            numa_node=i // per_node,
            model=model,
            memory_mib=memory_mib,
        )
        for i in range(count)
    ]


#: Named simulated nodes for ``--simulate``.
PRESETS: Final[dict[str, list[SimulatedGPU]]] = {
    "dgx-a100": _preset_gpus("dgx-a100", 8, 2, "NVIDIA A100-SXM4-40GB", 40960),
    "dgx-h100": _preset_gpus("dgx-h100", 8, 2, "NVIDIA H100 80GB HBM3", 81559),
    "single-t4": _preset_gpus("single-t4", 1, 1, "Tesla T4", 15360),
}


class SimulatedDeviceSource:
    """A :class:`~trio_gpu_plugin.DeviceSource` over simulated GPUs, IDs being their UUIDs.

    Args:
        gpus: the node's GPUs.
        unhealthy: IDs that start unhealthy.
    """

    def __init__(self, gpus: Sequence[SimulatedGPU], *, unhealthy: Sequence[str] = ()) -> None:
        ids = [g.uuid for g in gpus]
        if len(set(ids)) != len(ids):
            raise ValueError(f"simulated GPUs share a UUID: {ids}")
        self.gpus = list(gpus)
        unknown = set(unhealthy) - set(ids)
        if unknown:
            raise ValueError(f"unknown device(s) marked unhealthy: {sorted(unknown)}")
        self._healthy = {i: i not in unhealthy for i in ids}
        self._publishers: list[Publish] = []

    @classmethod
    def preset(cls, name: str) -> SimulatedDeviceSource:
        """A simulated node by preset name (see :data:`PRESETS`)."""
        try:
            return cls(PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown simulated node {name!r}; presets: {', '.join(PRESETS)}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SimulatedDeviceSource:
        """A simulated node described by a JSON file::

            {"gpus": [{"uuid": "GPU-...", "numa_node": 0, "model": "...", "healthy": true}]}

        Raises ``ValueError`` naming the file, the key and the problem.
        """
        try:
            with open(path, encoding="utf-8") as file:
                document = json.load(file)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        return cls._from_document(document, str(path))

    @classmethod
    def _from_document(cls, document: Any, where: str) -> SimulatedDeviceSource:
        if not isinstance(document, dict) or not isinstance(document.get("gpus"), list):
            raise ValueError(f"{where}: key 'gpus' must be a list of GPUs")
        gpus, unhealthy = [], []
        for i, entry in enumerate(document["gpus"]):
            key = f"{where}: gpus[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{key} must be an object")
            extra = set(entry) - {"uuid", "numa_node", "model", "memory_mib", "healthy"}
            if extra:
                raise ValueError(f"{key}: unknown key(s) {sorted(extra)}")
            gpu_uuid = entry.get("uuid", f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{where}/{i}')}")
            if not isinstance(gpu_uuid, str) or not gpu_uuid:
                raise ValueError(f"{key}.uuid must be a non-empty string")
            numa = entry.get("numa_node")
            if numa is not None and (not isinstance(numa, int) or isinstance(numa, bool) or numa < 0):
                raise ValueError(f"{key}.numa_node must be a non-negative integer")
            healthy = entry.get("healthy", True)
            if not isinstance(healthy, bool):
                raise ValueError(f"{key}.healthy must be true or false")
            model = entry.get("model", "NVIDIA A100-SXM4-40GB")
            memory = entry.get("memory_mib", 40960)
            if not isinstance(model, str) or not isinstance(memory, int):
                raise ValueError(f"{key}: model must be a string and memory_mib an integer")
            gpus.append(SimulatedGPU(gpu_uuid, i, numa, model, memory))
            if not healthy:
                unhealthy.append(gpu_uuid)
        return cls(gpus, unhealthy=unhealthy)

    def devices(self) -> list[DeviceInfo]:
        """The device list as published now."""
        return [
            DeviceInfo(g.uuid, self._healthy[g.uuid],
                       () if g.numa_node is None else (g.numa_node,))
            for g in self.gpus
        ]

    def set_health(self, device_id: str, healthy: bool) -> None:
        """Mark a device healthy or not; running sources publish the change at once."""
        if device_id not in self._healthy:
            raise KeyError(f"no simulated device {device_id!r}")
        if self._healthy[device_id] == healthy:
            return
        self._healthy[device_id] = healthy
        devices = self.devices()
        for publish in list(self._publishers):
            publish(devices)

    async def run(self, publish: Publish, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish the device list, then every change, until cancelled."""
        publish(self.devices())
        self._publishers.append(publish)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._publishers.remove(publish)

    def allocate(self, device_ids: Sequence[str]) -> v1beta1.ContainerAllocateResponse:
        """NVIDIA's ``envvar`` strategy: the IDs in ``NVIDIA_VISIBLE_DEVICES``."""
        return v1beta1.ContainerAllocateResponse(
            envs={"NVIDIA_VISIBLE_DEVICES": ",".join(device_ids)})
