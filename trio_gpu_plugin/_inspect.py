"""``trio-gpu-plugin inspect``: what this node would advertise, and how its GPUs connect.

:func:`report` is sans-IO (model, plan, health and topology in; plain data out);
:func:`render_text` and :func:`render_json` format it; :func:`inspect_node` runs an NVML
session long enough to discover and probe the node once.

Types are the same for every device and GPU whatever the node: ``numa`` is always a
list of NUMA node numbers (empty when unknown), as the kubelet's TopologyInfo holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import trio

from ._config import Config
from ._configured import NodeSetup
from ._node_model import PCIE_LEVELS, NodeModel
from ._nvml_source import NvmlNode
from ._resources import PlanResult
from ._topology import Topology

__all__ = ["envvar_conflict_warning", "inspect_node", "render_json", "render_text", "report"]

_LINK_NAMES = {0: "BOARD", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
#: The device list strategies that let one container hold devices of several of our
#: resources: each resource's mounts or CDI devices add up, where envvar's
#: NVIDIA_VISIBLE_DEVICES values collide.
COMBINING_STRATEGIES = ("volume-mounts", "cdi-annotations", "cdi-cri")


def envvar_conflict_warning(config: Config, result: PlanResult) -> str | None:
    """The warning for the mixed MIG strategy with ``envvar`` as the only device list
    strategy on a node where it plans several resources, else ``None``.

    Every resource answers Allocate with its own ``NVIDIA_VISIBLE_DEVICES``; a container
    that asks for two of them (two MIG profiles) gets one value, as the kubelet keeps
    one and logs a conflict, so it sees only one resource's devices.  NVIDIA's plugin has
    the same limit.
    """
    if config.flags.mig_strategy != "mixed" or \
            tuple(config.flags.plugin.device_list_strategy) != ("envvar",):
        return None
    names = [r.name for r in result.resources]
    if len(names) < 2:
        return None
    return (f"--mig-strategy mixed with --device-list-strategy envvar alone: a container "
            f"that asks for two of {', '.join(names)} gets the NVIDIA_VISIBLE_DEVICES of "
            "only one of them (the kubelet keeps one value and logs a conflict; NVIDIA's "
            "plugin has the same limit); if containers ask for more than one, add "
            f"{', '.join(COMBINING_STRATEGIES[:-1])} or {COMBINING_STRATEGIES[-1]} to "
            "--device-list-strategy")


def report(model: NodeModel, result: PlanResult, healthy: Callable[[Iterable[str]], bool],
           reasons: dict[str, str], topology: Topology) -> dict[str, Any]:
    """The node as plain data: GPUs, resources with their devices, the topology matrix."""
    migs = {m.uuid: m for m in model.mig_devices}
    resources: list[dict[str, Any]] = []
    for resource in result.resources:
        devices: list[dict[str, Any]] = []
        for device in resource.devices:
            mig = migs.get(device.uuid)
            bad = [reasons[u] for u in device.units if u in reasons]
            devices.append({
                "id": device.id, "healthy": healthy(device.units),
                "reason": bad[0] if bad else "",
                "numa": list(device.numa_nodes), "index": device.index,
                "mig_profile": mig.profile if mig else None, "replica": device.replica,
            })
        resources.append({"name": resource.name, "socket": resource.socket_name,
                          "sharing": resource.sharing, "devices": devices})
    gpus = [{"index": g.index, "uuid": g.uuid, "name": g.name,
             "numa": [] if g.numa_node is None else [g.numa_node],
             "memory_mib": g.memory_bytes // 2**20, "mig": g.mig_enabled,
             "healthy": healthy([g.uuid])} for g in model.gpus]
    matrix = []
    for a in model.gpus:
        row = []
        for b in model.gpus:
            if a.uuid == b.uuid:
                row.append("X")
                continue
            links = a.nvlinks.get(b.uuid, 0) or b.nvlinks.get(a.uuid, 0)
            if not links and a.nvswitch_links and b.nvswitch_links:
                links = min(a.nvswitch_links, b.nvswitch_links)
            level = model.pcie.get((a.uuid, b.uuid))
            row.append(f"NV{links}" if links else _LINK_NAMES.get(level, "?") if level is not None else "?")
        matrix.append(row)
    unhealthy = sum(not d["healthy"] for r in resources for d in r["devices"])
    return {"driver": model.driver_version, "gpus": gpus, "resources": resources,
            "topology": matrix, "scores": [[topology.score(a.uuid, b.uuid) if a.uuid != b.uuid else 0
                                            for b in model.gpus] for a in model.gpus],
            "warnings": list(result.warnings), "unhealthy": unhealthy}


def render_json(data: dict[str, Any]) -> str:
    """The report for machines."""
    return json.dumps(data, indent=1)


def render_text(data: dict[str, Any]) -> str:
    """The report for people: GPUs, resources and devices, the topology matrix."""
    lines = [f"driver {data['driver']}, {len(data['gpus'])} GPU(s)"]
    for gpu in data["gpus"]:
        lines.append(f"  GPU {gpu['index']}  {gpu['uuid']}  {gpu['name']}  {gpu['memory_mib']} MiB  "
                     f"NUMA {','.join(map(str, gpu['numa'])) or '-'}"
                     f"{'  MIG' if gpu['mig'] else ''}  {'Healthy' if gpu['healthy'] else 'Unhealthy'}")
    for resource in data["resources"]:
        healthy = sum(d["healthy"] for d in resource["devices"])
        lines.append(f"\n{resource['name']} ({resource['socket']}; sharing {resource['sharing']}): "
                     f"{len(resource['devices'])} device(s), {healthy} healthy")
        width = max(len(d["id"]) for d in resource["devices"])
        for d in resource["devices"]:
            extra = " ".join(x for x in (
                f"MIG {d['mig_profile']}" if d["mig_profile"] else "",
                f"replica {d['replica']}" if d["replica"] is not None else "") if x)
            status = "Healthy" if d["healthy"] else f"Unhealthy ({d['reason']})"
            numa = ",".join(map(str, d["numa"])) or "-"
            lines.append(f"  {d['id']:<{width}}  index {d['index']:<5} NUMA {numa:<3} {status}"
                         f"{'  ' + extra if extra else ''}")
    if data["gpus"]:
        lines.append("\ntopology (NV<n>: NVLinks; " + ", ".join(
            f"{_LINK_NAMES[level]}: {name}" for level, name in PCIE_LEVELS.items()) + ")")
        lines.append("       " + "".join(f"GPU{g['index']:<5}" for g in data["gpus"]))
        for gpu, row in zip(data["gpus"], data["topology"]):
            lines.append(f"GPU{gpu['index']:<4}" + "".join(f"{cell:<8}" for cell in row))
    for warning in data["warnings"]:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


async def inspect_node(node: NvmlNode, setup: NodeSetup, settle: float = 0.3) -> dict[str, Any]:
    """Start ``node``, let its probes run for ``settle`` seconds, and report."""
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        await trio.sleep(settle)
        model = await node.wait_model()
        result = setup.plan(model)
        data = report(model, result, node.healthy, node.reasons(), Topology.from_model(model))
        nursery.cancel_scope.cancel()
    conflict = envvar_conflict_warning(setup.config, result)
    if conflict:
        data["warnings"].append(conflict)
    return data
