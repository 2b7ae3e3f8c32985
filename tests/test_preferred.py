"""GetPreferredAllocation per kind of resource: NVIDIA's distributed/packed cases for
replicas, one parent for MIG slices, the exact topology answer for whole GPUs, and bad
requests answered for that request only."""

from __future__ import annotations

import collections
import pathlib

import pytest
import trio

from trio_gpu_plugin._config import resolve_config
from trio_gpu_plugin._devices import DeviceInfo
from trio_gpu_plugin._discovery import discover
from trio_gpu_plugin._nvml_sim import PRESETS, SimGpuSpec, SimNodeSpec, SimulatedNVML
from trio_gpu_plugin._plan_model import PlannedResource
from trio_gpu_plugin._preferred import preferred_allocation
from trio_gpu_plugin._resources import plan
from trio_gpu_plugin._topology import Topology
from trio_gpu_plugin.testing import FakeKubelet


def model_of(node: SimNodeSpec, root: pathlib.Path):  # type: ignore[no-untyped-def]
    nvml = SimulatedNVML(node)
    nvml.write_driver_root(root)
    nvml.nvmlInit()
    return discover(nvml, root).model


def planned(node: SimNodeSpec, root: pathlib.Path, cli: dict[str, object],
            document: object = None) -> tuple[PlannedResource, Topology]:
    model = model_of(node, root)
    config, _ = resolve_config(cli, {}, document)
    (resource,) = plan(model, config).resources
    return resource, Topology.from_model(model)


def shared(replicas: int) -> dict[str, object]:
    return {"version": "v1", "sharing": {"timeSlicing": {"resources": [
        {"name": "nvidia.com/gpu", "replicas": replicas}]}}}


TWO_T4 = SimNodeSpec(name="two-t4", gpus=(SimGpuSpec(name="Tesla T4", numa_node=0),
                                          SimGpuSpec(name="Tesla T4", numa_node=0)))


def gpus_of(ids: list[str]) -> collections.Counter[str]:
    return collections.Counter(i.split("::")[0] for i in ids)


def infos(resource: PlannedResource, skip: set[str] = frozenset()) -> list[DeviceInfo]:  # type: ignore[assignment]
    return [DeviceInfo(d.id) for d in resource.devices if d.id not in skip]


# NVIDIA's allocate_test.go cases (reference 7.3): 2 GPUs x 4 replicas.

def test_distributed_spreads_two_replicas_over_two_gpus(tmp_path: pathlib.Path) -> None:
    resource, topology = planned(TWO_T4, tmp_path, {}, shared(4))
    choose = preferred_allocation(lambda: resource, lambda: topology, "distributed")
    assert sorted(gpus_of(choose(infos(resource), [], 2)).values()) == [1, 1]


def test_packed_takes_two_replicas_of_one_gpu(tmp_path: pathlib.Path) -> None:
    resource, topology = planned(TWO_T4, tmp_path, {}, shared(4))
    choose = preferred_allocation(lambda: resource, lambda: topology, "packed")
    assert sorted(gpus_of(choose(infos(resource), [], 2)).values()) == [2]


def test_packed_fills_one_gpu_then_overflows(tmp_path: pathlib.Path) -> None:
    resource, topology = planned(TWO_T4, tmp_path, {}, shared(4))
    choose = preferred_allocation(lambda: resource, lambda: topology, "packed")
    assert sorted(gpus_of(choose(infos(resource), [], 5)).values()) == [1, 4]


def test_distributed_prefers_the_least_loaded_gpu(tmp_path: pathlib.Path) -> None:
    resource, topology = planned(TWO_T4, tmp_path, {}, shared(4))
    first = resource.devices[0].uuid
    # Three replicas of the first GPU are in use: the kubelet does not offer them.
    busy = {f"{first}::{n}" for n in range(3)}
    choose = preferred_allocation(lambda: resource, lambda: topology, "distributed")
    chosen = choose(infos(resource, busy), [], 2)
    assert first not in gpus_of(chosen)


def test_replicas_spanning_gpus_prefer_nvlinked_ones(tmp_path: pathlib.Path) -> None:
    resource, topology = planned(PRESETS["dgx-1"], tmp_path, {}, shared(2))
    uuids = [d.uuid for d in resource.devices[::2]]
    choose = preferred_allocation(lambda: resource, lambda: topology, "distributed")
    # GPU 0 must be included: the second replica goes to a GPU with 2 NVLinks to GPU 0
    # (GPU 3 or GPU 4 on the hybrid cube-mesh), not to one without any.
    chosen = choose(infos(resource), [f"{uuids[0]}::0"], 2)
    assert chosen[0] == f"{uuids[0]}::0"
    assert chosen[1].split("::")[0] in {uuids[3], uuids[4]}


def test_mig_slices_come_from_one_parent_when_it_fits(tmp_path: pathlib.Path) -> None:
    model = model_of(PRESETS["a100-mig"], tmp_path)
    config, _ = resolve_config({"mig_strategy": "mixed"}, {}, None)
    small = next(r for r in plan(model, config).resources if r.name == "nvidia.com/mig-1g.5gb")
    topology = Topology.from_model(model)
    choose = preferred_allocation(lambda: small, lambda: topology)
    parents = {m.uuid: m.parent_index for m in model.mig_devices}
    # GPU 0 has two 1g.5gb slices, GPU 2 seven: three fit only on GPU 2; two fit on both,
    # and the smaller parent (GPU 0) is used, keeping GPU 2's run free.
    assert {parents[i] for i in choose(infos(small), [], 3)} == {2}
    assert {parents[i] for i in choose(infos(small), [], 2)} == {0}
    # A must-include slice on GPU 2 keeps the rest there.
    on_two = next(d.id for d in small.devices if parents[d.id] == 2)
    assert {parents[i] for i in choose(infos(small), [on_two], 2)} == {2}


def test_whole_gpus_use_the_topology_and_speak_the_kubelets_ids(tmp_path: pathlib.Path) -> None:
    resource, topology = planned(PRESETS["dgx-1"], tmp_path, {"device_id_strategy": "index"})
    choose = preferred_allocation(lambda: resource, lambda: topology)
    chosen = choose(infos(resource), ["0"], 2)
    assert chosen[0] == "0" and chosen[1] in {"3", "4"}  # two NVLinks to GPU 0


@pytest.mark.parametrize(("must", "size", "expected_len"), [
    ([], 0, 0), ([], 20, 8), (["GPU-unknown"], 2, 2), ([], -1, 0)])
def test_bad_requests_get_the_best_valid_answer(tmp_path: pathlib.Path, must: list[str],
                                                 size: int, expected_len: int) -> None:
    resource, topology = planned(PRESETS["dgx-1"], tmp_path, {})
    choose = preferred_allocation(lambda: resource, lambda: topology)
    chosen = choose(infos(resource) + [DeviceInfo("GPU-unknown")], must, size)
    assert len(chosen) == expected_len
    assert set(chosen) <= {d.id for d in resource.devices}


async def test_the_kubelet_gets_the_topology_answer_and_a_lost_gpu_drops_out(
        nursery: trio.Nursery, fake_kubelet: FakeKubelet, tmp_path: pathlib.Path) -> None:
    from trio_gpu_plugin._configured import NodeSetup
    from trio_gpu_plugin._health import HealthChecks
    from trio_gpu_plugin._nvml_source import NvmlNode
    from trio_gpu_plugin._runtime import DevicePlugin

    nvml = SimulatedNVML(PRESETS["dgx-1"])
    nvml.write_driver_root(tmp_path)
    node = NvmlNode(nvml, root=tmp_path, checks=HealthChecks(), probe_interval=0.05)
    await nursery.start(node.run)
    config, _ = resolve_config({}, {}, None)
    setup = NodeSetup.read(config, tmp_path)
    plugin = DevicePlugin(setup.resources(node, setup.plan(await node.wait_model())),
                          kubelet_socket=fake_kubelet.kubelet_socket)
    await nursery.start(plugin.run)
    uuids = [g.uuid for g in node.model.gpus]  # type: ignore[union-attr]
    nvml.lose(3)
    await fake_kubelet.wait_until(lambda: uuids[3] in fake_kubelet.resources["nvidia.com/gpu"].unhealthy)
    admission = await fake_kubelet.admit("nvidia.com/gpu", 4)
    assert uuids[3] not in admission.device_ids
    assert admission.preferred is not None and sorted(admission.preferred) == sorted(admission.device_ids)
    # With GPU 3 gone, the best quad of the cube-mesh is 4-5-6-7 (fully connected, 8 links).
    assert set(admission.device_ids) == {uuids[i] for i in (4, 5, 6, 7)}


def test_an_unhealthy_device_offered_anyway_is_not_chosen(tmp_path: pathlib.Path) -> None:
    resource, topology = planned(PRESETS["dgx-1"], tmp_path, {"device_id_strategy": "index"})
    choose = preferred_allocation(lambda: resource, lambda: topology)
    offered = [DeviceInfo(d.id, healthy=d.id != "3") for d in resource.devices]
    chosen = choose(offered, ["0"], 2)
    assert chosen == ["0", "4"]  # GPU 3 would tie with 4 (two NVLinks each), but it is sick
