"""The configured plugin: resources planned from the node model and the configuration.

Ties the sans-IO pieces to the runtime: :class:`NodeSetup` holds the configuration and
the start-time facts read from the node (MIG capability minors, existing control device
nodes, IMEX channels); :class:`PlannedSource` is the
:class:`~trio_gpu_plugin.DeviceSource` of one planned resource over an
:class:`~trio_gpu_plugin.NvmlNode`, re-planned whenever NVML rediscovers the node, with
Allocate answered as NVIDIA's plugin answers it for the configured strategies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import trio

from ._allocate import (
    AllocateContext,
    container_response,
    existing_control_nodes,
    imex_channel_path,
    validate_request,
)
from ._config import Config, ConfigError
from ._devices import DeviceInfo, Publish, Resource
from ._node_model import NodeModel
from ._nvml_source import NvmlNode, follow
from ._plan_model import PlannedResource
from ._preferred import preferred_allocation
from ._resources import PlanResult, parse_mig_minors, plan
from ._topology import Topology
from .proto import v1beta1

__all__ = ["NodeSetup", "PlannedSource", "read_mig_minors"]

log = logging.getLogger("trio_gpu_plugin.config")

MIG_MINORS = "proc/driver/nvidia-caps/mig-minors"


def read_mig_minors(root: str | os.PathLike[str]) -> dict[tuple[int, int, int | None], int] | None:
    """``<root>/proc/driver/nvidia-caps/mig-minors`` parsed, or ``None`` if it is absent
    (no MIG-capable driver)."""
    path = os.path.join(os.fspath(root), MIG_MINORS)
    try:
        with open(path, encoding="ascii") as file:
            text = file.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s; MIG devices get no capability nodes", path, exc)
        return None
    try:
        return parse_mig_minors(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class NodeSetup:
    """A configuration and what was read from the node for it.

    Attributes:
        config: the effective configuration.
        root: where the plugin reads the node's files (``/`` in a container on a node;
            a simulated node's fake root): ``proc/driver/nvidia-caps/mig-minors``,
            ``dev/nvidia*``.
        mig_minors: the MIG capability table, or ``None``.
        context: what Allocate needs (control nodes that exist, IMEX channels).
    """

    config: Config
    root: str
    mig_minors: dict[tuple[int, int, int | None], int] | None
    context: AllocateContext
    # The last model planned and its plan: every resource's source asks for the plan of
    # the same model, and a shared resource may hold 100,000 devices; one plan serves all.
    _last_plan: list[tuple[NodeModel, PlanResult]] = dataclasses.field(
        default_factory=list, init=False, compare=False, repr=False)

    @classmethod
    def read(cls, config: Config, root: str | os.PathLike[str]) -> NodeSetup:
        """Gather the node facts the configuration needs.

        Raises ``ConfigError`` for a required IMEX channel the node lacks (NVIDIA's text).
        """
        root = os.fspath(root)
        channels = []
        for channel in config.imex.channel_ids:
            path = os.path.join(root, imex_channel_path(channel).lstrip("/"))
            if os.path.exists(path):
                channels.append(channel)
            elif config.imex.required:
                raise ConfigError(f"requested IMEX channel channel{channel} does not exist "
                                  f"({path}; imex.required is set)")
            else:
                log.warning("IMEX channel channel%d does not exist (%s); not handing it out",
                            channel, path)
        return cls(
            config=config, root=root, mig_minors=read_mig_minors(root),
            context=AllocateContext(config=config, control_nodes=existing_control_nodes(root),
                                    imex_channels=tuple(channels)))

    @property
    def cdi_roots(self) -> list[str]:
        """Where CDI specs are looked for: the plugin's own view of the node and, when
        mounted, the host's driver root (``--driver-root-ctr-path``)."""
        roots = [self.root]
        mounted = self.config.flags.plugin.container_driver_root
        if mounted and os.path.isdir(mounted) and os.path.realpath(mounted) != os.path.realpath(self.root):
            roots.append(mounted)
        return roots

    def plan(self, model: NodeModel) -> PlanResult:
        """The resources to serve on ``model`` (raises ``ConfigError`` with NVIDIA's texts);
        planned once per model (the same object), however many resources ask."""
        for planned_model, result in self._last_plan:
            if planned_model is model:
                return result
        result = plan(model, self.config, self.mig_minors)
        self._last_plan[:] = [(model, result)]
        return result

    def resources(self, node: NvmlNode, result: PlanResult) -> list[Resource]:
        """One :class:`Resource` per planned resource, sourced from ``node``, with the
        topology-aware GetPreferredAllocation policy."""
        resources = []
        for planned in result.resources:
            source = PlannedSource(node, self, planned.name)
            policy = preferred_allocation(
                source.resource, source.topology,
                self.config.flags.plugin.shared_devices_allocation_policy)
            resources.append(Resource(planned.name, source, planned.socket_name,
                                      preferred_allocation=policy))
        return resources


class PlannedSource:
    """The device source of one planned resource: its devices' health from the node's
    tracker; re-planned when NVML rediscovers the node (a GPU gone, a MIG change)."""

    def __init__(self, node: NvmlNode, setup: NodeSetup, name: str) -> None:
        self.node = node
        self.setup = setup
        self.name = name
        self._model: NodeModel | None = None
        self._resource = PlannedResource(name=name, socket_name="", devices=())
        self._emptied = False
        self._topology: Topology | None = None
        self._topology_model: NodeModel | None = None

    def resource(self) -> PlannedResource:
        """The planned resource for the current model (empty if it no longer plans)."""
        model = self.node.model
        if model is not None and model is not self._model:
            self._model = model
            try:
                planned = {r.name: r for r in self.setup.plan(model).resources}
            except ValueError as exc:
                # The node changed under a configuration that fitted it at start (a MIG
                # reconfiguration, say): serve nothing rather than something wrong.
                log.error("%s: the node no longer fits the configuration: %s; advertising no "
                          "devices until the configuration is reloaded", self.name, exc)
                planned = {}
            self._resource = planned.get(
                self.name, PlannedResource(name=self.name, socket_name="", devices=()))
        return self._resource

    def topology(self) -> Topology:
        """The node's GPU topology, built once per discovered model."""
        model = self.node.model
        if model is None:
            return Topology.from_model(NodeModel(gpus=()))
        if model is not self._topology_model:
            self._topology = Topology.from_model(model)
            self._topology_model = model
        assert self._topology is not None
        return self._topology

    def empty(self) -> None:
        """Advertise no devices from now on (the resource is going away)."""
        self._emptied = True

    def device_infos(self) -> list[DeviceInfo]:
        """The device list as published now."""
        if self._emptied:
            return []
        return [d.advertised(self.node.healthy(d.units)) for d in self.resource().devices]

    async def run(self, publish: Publish, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish the device list once the node is up, then every change."""
        await follow(self.node, self.device_infos, publish, task_status=task_status)

    def publish_now(self) -> None:
        """Publish the current list at once (after :meth:`empty`)."""
        self.node.notify()

    def allocate(self, device_ids: Sequence[str]) -> v1beta1.ContainerAllocateResponse:
        """What the container gets, per the configured strategies (NVIDIA's contents)."""
        resource = self.resource()
        validate_request(resource, device_ids)
        return container_response(resource, device_ids, self.setup.context)
