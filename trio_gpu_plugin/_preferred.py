"""GetPreferredAllocation: which devices a container should get, per kind of resource.

Sans-IO.  Three policies, chosen by what the resource holds (as NVIDIA's
``getPreferredAllocation`` chooses):

* whole GPUs: the exact topology-aware set of :func:`~trio_gpu_plugin._topology.best_set`
  (NVIDIA's pair weights, branch and bound, a time budget with a greedy fallback);
* replicas (time-slicing, MPS): NVIDIA's greedy ``distributed`` (spread over physical
  GPUs: fewest replicas already in use first) or ``packed`` (most in use first), ties
  broken by fewer picks from that GPU in this call (NVIDIA #1788) and then, where a
  request spans GPUs, by NVLink/PCIe closeness to the GPUs already chosen;
* MIG slices: slices of one parent GPU if it can hold the whole request (the smallest such
  parent, to keep big parents free), else as few parents as possible, on as few NUMA
  nodes as possible.

Never an error for the node: unknown IDs drop out, a request larger than what is
available gets everything available, and the kubelet fills or trims the answer anyway
(devicesToAllocate in the kubelet's pkg/kubelet/cm/devicemanager/manager.go).  Lost or
unhealthy GPUs are not offered by the kubelet, so they are simply never candidates.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

from ._devices import DeviceInfo
from ._plan_model import PlannedDevice, PlannedResource
from ._topology import Topology, best_set

__all__ = ["DEFAULT_BUDGET", "preferred_allocation"]

#: Seconds the whole-GPU search may take before it answers greedily (kubernetes#129249:
#: a hung call blocks admission of every pod on the node).
DEFAULT_BUDGET = 0.05


def _parent(device: PlannedDevice) -> str:
    """The physical GPU a device is on (its first health unit is that GPU or the slice;
    for slices the parent is the last unit)."""
    return device.units[-1] if device.is_mig else device.units[0]


def _closeness(topology: Topology, gpu: str, chosen: collections.Counter[str]) -> int:
    return sum(topology.score(gpu, other) * n for other, n in chosen.items() if other != gpu)


def _replicas(resource: PlannedResource, topology: Topology, available: list[PlannedDevice],
              required: list[PlannedDevice], size: int, policy: str) -> list[str]:
    total = collections.Counter(_parent(d) for d in resource.devices)
    candidates = [d for d in available if d not in required]
    in_candidates = collections.Counter(_parent(d) for d in candidates)
    # NVIDIA infers each GPU's load from the kubelet's available list: no state of our own.
    allocated = {gpu: total[gpu] - in_candidates[gpu] for gpu in total}
    picked: collections.Counter[str] = collections.Counter(_parent(d) for d in required)
    order = {d.id: i for i, d in enumerate(resource.devices)}
    chosen = [d.id for d in required]
    for _ in range(max(0, size - len(chosen))):
        if not candidates:
            break

        def key(device: PlannedDevice) -> tuple[int, int, int, int]:
            gpu = _parent(device)
            load = allocated[gpu] if policy == "distributed" else -allocated[gpu]
            return (load, picked[gpu], -_closeness(topology, gpu, picked), order[device.id])

        best = min(candidates, key=key)
        candidates.remove(best)
        gpu = _parent(best)
        allocated[gpu] += 1
        picked[gpu] += 1
        chosen.append(best.id)
    return chosen


def _mig(available: list[PlannedDevice], required: list[PlannedDevice], size: int,
         order: dict[str, int]) -> list[str]:
    chosen = list(required)
    candidates = [d for d in available if d not in required]
    needed = max(0, size - len(chosen))
    while needed and candidates:
        parents = collections.Counter(_parent(d) for d in chosen)
        numas = {n for d in chosen for n in d.numa_nodes}
        free = collections.Counter(_parent(d) for d in candidates)

        def key(device: PlannedDevice) -> tuple[int, int, int, int]:
            gpu = _parent(device)
            on_chosen_parent = 0 if gpu in parents else 1
            same_numa = 0 if not numas or numas.intersection(device.numa_nodes) else 1
            # A parent that fits the rest of the request, the smallest such (best fit);
            # otherwise the parent with the most free slices (fewest parents in all).
            fits = free[gpu] >= needed
            fit_rank = free[gpu] if fits else 1000 - free[gpu]
            return (on_chosen_parent, same_numa, fit_rank, order[device.id])

        best = min(candidates, key=key)
        candidates.remove(best)
        chosen.append(best)
        needed -= 1
    return [d.id for d in chosen]


def preferred_allocation(
    resource: Callable[[], PlannedResource], topology: Callable[[], Topology],
    policy: str = "distributed", budget: float = DEFAULT_BUDGET,
) -> Callable[[Sequence[DeviceInfo], Sequence[str], int], list[str]]:
    """The GetPreferredAllocation policy of one planned resource.

    Args:
        resource: the resource as planned now (re-planned when NVML rediscovers).
        topology: the node's topology now.
        policy: ``distributed`` or ``packed`` (``--shared-devices-allocation-policy``).
        budget: seconds the exact whole-GPU search may take.
    """

    def choose(available: Sequence[DeviceInfo], must_include: Sequence[str], size: int) -> list[str]:
        planned = resource()
        by_id = {d.id: d for d in planned.devices}
        # An unhealthy device is simply not a candidate (the kubelet does not offer them).
        offered = [by_id[d.id] for d in available if d.id in by_id and d.healthy]
        required = [by_id[i] for i in dict.fromkeys(must_include) if i in by_id][:max(size, 0)]
        if size <= 0:
            return []
        if any(d.replica is not None for d in planned.devices):
            return _replicas(planned, topology(), offered, required, size, policy)
        if any(d.is_mig for d in planned.devices):
            order = {d.id: i for i, d in enumerate(planned.devices)}
            return _mig(offered, required, size, order)
        # Whole GPUs: the topology speaks UUIDs; the kubelet may be speaking indexes.
        to_uuid = {d.id: d.uuid for d in offered + required}
        from_uuid = {uuid: i for i, uuid in to_uuid.items()}
        choice = best_set(topology(), [to_uuid[d.id] for d in offered],
                          [to_uuid[d.id] for d in required], size, budget=budget)
        return [from_uuid[u] for u in choice.ids if u in from_uuid]

    return choose
