"""The resource planner against NVIDIA's documented behaviour (reference §2.3, §2.4, §3).

Expected values are written from the reference and the simulated presets' layout (see
``_presets`` in ``_nvml_sim``), never copied from the planner's output:

* ``dgx-a100``: 8 x A100-SXM4-40GB, NUMA node ``i // 4``, MIG off;
* ``pcie-4``: 4 x Tesla T4, NUMA node ``i // 2``;
* ``a100-mig``: 4 x A100-SXM4-40GB with MIG on, NUMA ``i // 2``:
  GPU0 ``3g.20gb, 2g.10gb, 1g.5gb, 1g.5gb``; GPU1 ``7g.40gb``; GPU2 ``1g.5gb`` x 7;
  GPU3 ``4g.20gb, 2g.10gb, 1g.5gb+me``.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from trio_gpu_plugin._config import (
    Config,
    ConfigError,
    Flags,
    PluginFlags,
    ReplicatedDevices,
    ReplicatedResource,
    ResourcePattern,
    Resources,
    Sharing,
    SharingStrategy,
)
from trio_gpu_plugin._discovery import discover
from trio_gpu_plugin._node_model import GpuInfo, MigInfo, NodeModel
from trio_gpu_plugin._nvml_sim import PRESETS, SimulatedNVML
from trio_gpu_plugin._plan_model import PlannedResource
from trio_gpu_plugin._resources import (
    PlanError,
    PlanResult,
    glob_matches,
    mig_cap_paths,
    parse_mig_minors,
    plan,
    socket_name,
)

GIB = 1024**3


# --------------------------------------------------------------------------------------
# Nodes


class Node:
    """A preset discovered once: its model and the mig-minors text the simulator wrote."""

    def __init__(self, preset: str, root: pathlib.Path) -> None:
        nvml = SimulatedNVML(PRESETS[preset])
        nvml.nvmlInit()
        nvml.write_driver_root(root)
        self.model = discover(nvml, root).model
        minors = root / "proc" / "driver" / "nvidia-caps" / "mig-minors"
        self.minors_text = minors.read_text() if minors.exists() else ""


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Node]:
    return {name: Node(name, tmp_path_factory.mktemp(name))
            for name in ("dgx-a100", "dgx-1", "pcie-4", "a100-mig")}


def hand_gpu(index: int, *profiles: str, mig: bool | None = None,
             name: str = "NVIDIA A100-SXM4-40GB") -> GpuInfo:
    """A GPU; with profiles (or ``mig=True``) MIG is on and it carries those devices."""
    uuid = f"GPU-{index:08d}-0000-0000-0000-000000000000"
    migs = tuple(
        MigInfo(uuid=f"MIG-{index:04d}{slot:04d}-0000-0000-0000-000000000000",
                parent_uuid=uuid, parent_index=index, index=slot, gi_id=slot + 1, ci_id=0,
                profile=profile, memory_bytes=5 * GIB, numa_node=0)
        for slot, profile in enumerate(profiles))
    return GpuInfo(uuid=uuid, index=index, minor=index, name=name, memory_bytes=40 * GIB,
                   pci_bus_id=f"00000000:{index + 7:02X}:00.0", compute_capability=(8, 0),
                   numa_node=0, mig_enabled=bool(profiles) if mig is None else mig,
                   mig_devices=migs)


def hand_node(*gpus: GpuInfo) -> NodeModel:
    return NodeModel(gpus=gpus)


def config(mig: str = "none", *, ids: str = "uuid", gpus: tuple[ResourcePattern, ...] = (),
           migs: tuple[ResourcePattern, ...] = (), time_slicing: SharingStrategy | None = None,
           mps: SharingStrategy | None = None) -> Config:
    return Config(flags=Flags(mig_strategy=mig, plugin=PluginFlags(device_id_strategy=ids)),
                  resources=Resources(gpus=gpus, mig=migs),
                  sharing=Sharing(time_slicing=time_slicing, mps=mps))


def shared(*resources: ReplicatedResource, rename_by_default: bool = False,
           fail: bool | None = None) -> SharingStrategy:
    return SharingStrategy(resources=resources, rename_by_default=rename_by_default,
                           fail_requests_greater_than_one=fail)


def by_name(result: PlanResult) -> dict[str, PlannedResource]:
    return {r.name: r for r in result.resources}


def ids(resource: PlannedResource) -> list[str]:
    return [d.id for d in resource.devices]


def gpu_uuids(model: NodeModel) -> list[str]:
    return [g.uuid for g in model.gpus]


def mig_uuid(model: NodeModel, gpu: int, slot: int) -> str:
    return model.gpus[gpu].mig_devices[slot].uuid


def cap_minor(text: str, gpu_minor: int, gi: int, ci: int | None = None) -> int:
    """The capability minor as the mig-minors file lists it (read with a regex, so the
    parser under test is not its own oracle)."""
    name = f"gpu{gpu_minor}/gi{gi}" + ("" if ci is None else f"/ci{ci}") + "/access"
    match = re.search(rf"^{re.escape(name)} (\d+)$", text, flags=re.M)
    assert match, name
    return int(match[1])


# --------------------------------------------------------------------------------------
# MIG strategies


def test_full_gpus_are_nvidia_com_gpu_under_every_strategy(nodes: dict[str, Node]) -> None:
    model = nodes["dgx-a100"].model
    for strategy in ("none", "single", "mixed"):
        result = plan(model, config(strategy))
        assert [r.name for r in result.resources] == ["nvidia.com/gpu"]
        gpu = result.resources[0]
        assert gpu.socket_name == "nvidia-gpu.sock"
        assert ids(gpu) == gpu_uuids(model)
        assert [d.index for d in gpu.devices] == [str(i) for i in range(8)]
        assert [d.paths for d in gpu.devices] == [(f"/dev/nvidia{i}",) for i in range(8)]
        assert [d.numa_nodes for d in gpu.devices] == [(i // 4,) for i in range(8)]
        assert [d.units for d in gpu.devices] == [(u,) for u in gpu_uuids(model)]
        assert all(d.replica is None and not d.is_mig for d in gpu.devices)
        assert gpu.sharing == "none" and not gpu.fail_requests_greater_than_one
        assert result.warnings == ()


def test_memory_and_compute_capability_are_filled(nodes: dict[str, Node]) -> None:
    t4 = plan(nodes["pcie-4"].model, config()).resources[0].devices[0]
    assert t4.compute_capability == (7, 5)
    assert t4.memory_bytes == 15360 * 1024 * 1024
    v100 = plan(nodes["dgx-1"].model, config()).resources[0].devices[0]
    assert v100.compute_capability == (7, 0)


def test_mixed_on_a100_mig(nodes: dict[str, Node]) -> None:
    node = nodes["a100-mig"]
    model = node.model
    result = plan(model, config("mixed"), parse_mig_minors(node.minors_text))
    resources = by_name(result)
    expected = {
        "nvidia.com/mig-1g.5gb": [(0, 2), (0, 3)] + [(2, s) for s in range(7)],
        "nvidia.com/mig-1g.5gb.me": [(3, 2)],
        "nvidia.com/mig-2g.10gb": [(0, 1), (3, 1)],
        "nvidia.com/mig-3g.20gb": [(0, 0)],
        "nvidia.com/mig-4g.20gb": [(3, 0)],
        "nvidia.com/mig-7g.40gb": [(1, 0)],
    }
    assert [r.name for r in result.resources] == sorted(expected)
    for name, slots in expected.items():
        resource = resources[name]
        assert resource.socket_name == f"nvidia-{name.removeprefix('nvidia.com/')}.sock"
        assert ids(resource) == [mig_uuid(model, g, s) for g, s in slots]
        assert [d.index for d in resource.devices] == [f"{g}:{s}" for g, s in slots]
        assert all(d.is_mig for d in resource.devices)
    assert resources["nvidia.com/mig-1g.5gb.me"].socket_name == "nvidia-mig-1g.5gb.me.sock"
    assert "nvidia.com/gpu" not in resources  # every GPU is in MIG mode
    assert result.warnings == ()


def test_mig_devices_carry_parent_node_and_the_files_capability_nodes(nodes: dict[str, Node]) -> None:
    node = nodes["a100-mig"]
    model = node.model
    result = plan(model, config("mixed"), parse_mig_minors(node.minors_text))
    devices = {d.uuid: d for r in result.resources for d in r.devices}
    assert len(devices) == 4 + 1 + 7 + 3
    for gpu in model.gpus:
        for mig in gpu.mig_devices:
            device = devices[mig.uuid]
            assert device.paths == (
                f"/dev/nvidia{gpu.minor}",
                f"/dev/nvidia-caps/nvidia-cap{cap_minor(node.minors_text, gpu.minor, mig.gi_id)}",
                f"/dev/nvidia-caps/nvidia-cap{cap_minor(node.minors_text, gpu.minor, mig.gi_id, mig.ci_id)}",
            )
            assert device.units == (mig.uuid, gpu.uuid)
            assert device.numa_nodes == (gpu.index // 2,)
            assert device.memory_bytes == mig.memory_bytes
            assert device.compute_capability == (8, 0)


def test_without_the_minors_table_mig_devices_name_only_the_parent(nodes: dict[str, Node]) -> None:
    result = plan(nodes["a100-mig"].model, config("mixed"))
    seven = by_name(result)["nvidia.com/mig-7g.40gb"].devices[0]
    assert seven.paths == ("/dev/nvidia1",)


def test_a_minors_table_without_the_devices_entry_is_fatal(nodes: dict[str, Node]) -> None:
    model = nodes["a100-mig"].model
    with pytest.raises(PlanError, match="^missing MIG GPU instance capability path$"):
        plan(model, config("mixed"), {})
    only_gis = {k: v for k, v in parse_mig_minors(nodes["a100-mig"].minors_text).items()
                if k[2] is None}
    with pytest.raises(PlanError, match="^missing MIG compute instance capability path$"):
        plan(model, config("mixed"), only_gis)


def test_none_advertises_mig_gpus_whole(nodes: dict[str, Node]) -> None:
    model = nodes["a100-mig"].model
    result = plan(model, config("none"), parse_mig_minors(nodes["a100-mig"].minors_text))
    assert [r.name for r in result.resources] == ["nvidia.com/gpu"]
    gpu = result.resources[0]
    assert ids(gpu) == gpu_uuids(model)
    assert [d.paths for d in gpu.devices] == [(f"/dev/nvidia{i}",) for i in range(4)]
    # A whole GPU fails if any of its slices does.
    assert gpu.devices[3].units == (model.gpus[3].uuid, *(m.uuid for m in model.gpus[3].mig_devices))
    assert len(gpu.devices[2].units) == 8


def test_single_rejects_a100_mig_with_several_profiles(nodes: dict[str, Node]) -> None:
    with pytest.raises(PlanError, match="^more than one MIG device type present on node$"):
        plan(nodes["a100-mig"].model, config("single"))


def test_single_on_a_uniform_node() -> None:
    model = hand_node(hand_gpu(0, "3g.20gb", "3g.20gb"), hand_gpu(1, "3g.20gb", "3g.20gb"))
    result = plan(model, config("single", ids="index"))
    assert [r.name for r in result.resources] == ["nvidia.com/gpu"]
    assert ids(result.resources[0]) == ["0:0", "0:1", "1:0", "1:1"]
    assert result.resources[0].socket_name == "nvidia-gpu.sock"
    uuids = plan(model, config("single")).resources[0]
    assert ids(uuids) == [m.uuid for g in model.gpus for m in g.mig_devices]


def test_single_needs_mig_devices_on_every_mig_gpu() -> None:
    model = hand_node(hand_gpu(0, "1g.5gb"), hand_gpu(1, mig=True), hand_gpu(2, "1g.5gb"))
    with pytest.raises(PlanError, match="^device 1 has no MIG devices configured$"):
        plan(model, config("single"))


def test_single_rejects_mig_and_full_gpus_together() -> None:
    model = hand_node(hand_gpu(0, "1g.5gb", "1g.5gb"), hand_gpu(1))
    with pytest.raises(PlanError, match="^all devices on the node must be configured with the "
                                        "same migEnabled value$"):
        plan(model, config("single"))


def test_mixed_serves_mig_and_full_gpus_and_warns_about_an_empty_mig_gpu() -> None:
    model = hand_node(hand_gpu(0, "1g.5gb", "2g.10gb"), hand_gpu(1, mig=True), hand_gpu(2))
    result = plan(model, config("mixed"))
    assert {r.name: ids(r) for r in result.resources} == {
        "nvidia.com/gpu": [model.gpus[2].uuid],
        "nvidia.com/mig-1g.5gb": [mig_uuid(model, 0, 0)],
        "nvidia.com/mig-2g.10gb": [mig_uuid(model, 0, 1)],
    }
    assert len(result.warnings) == 1
    assert "device 1 has no MIG devices configured" in result.warnings[0]


def test_mixed_rejects_a_subdivided_profile() -> None:
    model = hand_node(hand_gpu(0, "2g.10gb", "1c.2g.10gb"))
    with pytest.raises(PlanError, match=r"^MIG profile '1c\.2g\.10gb' does not match any "
                                        r"resource patterns$"):
        plan(model, config("mixed"))


def test_a_user_mig_pattern_can_serve_a_subdivided_profile() -> None:
    model = hand_node(hand_gpu(0, "1c.2g.10gb", "1c.2g.10gb"))
    result = plan(model, config("mixed", migs=(ResourcePattern("*c.2g.10gb", "mig-2g-split"),)))
    assert {r.name: len(r.devices) for r in result.resources} == {"nvidia.com/mig-2g-split": 2}


def test_plan_error_is_a_config_error() -> None:
    assert issubclass(PlanError, ConfigError)


# --------------------------------------------------------------------------------------
# Device IDs


def test_index_ids(nodes: dict[str, Node]) -> None:
    gpus = plan(nodes["dgx-a100"].model, config(ids="index")).resources[0]
    assert ids(gpus) == [str(i) for i in range(8)]
    assert [d.uuid for d in gpus.devices] == gpu_uuids(nodes["dgx-a100"].model)
    mig = by_name(plan(nodes["a100-mig"].model, config("mixed", ids="index")))
    assert ids(mig["nvidia.com/mig-1g.5gb"]) == ["0:2", "0:3"] + [f"2:{s}" for s in range(7)]
    assert "2:3" in ids(mig["nvidia.com/mig-1g.5gb"])
    assert ids(mig["nvidia.com/mig-1g.5gb.me"]) == ["3:2"]
    assert mig["nvidia.com/mig-1g.5gb.me"].devices[0].uuid == mig_uuid(nodes["a100-mig"].model, 3, 2)


# --------------------------------------------------------------------------------------
# Resource patterns


def test_gpu_pattern_renames_a_model(nodes: dict[str, Node]) -> None:
    result = plan(nodes["pcie-4"].model, config(gpus=(ResourcePattern("*T4*", "t4"),)))
    assert [(r.name, r.socket_name, len(r.devices)) for r in result.resources] == [
        ("nvidia.com/t4", "nvidia-t4.sock", 4)]


def test_user_patterns_come_before_the_defaults_and_unmatched_gpus_fall_through() -> None:
    model = hand_node(hand_gpu(0, name="Tesla T4"), hand_gpu(1, name="Tesla V100-SXM2-16GB"))
    result = plan(model, config(gpus=(ResourcePattern("Tesla T4", "example.com/t4"),)))
    assert {r.name: (r.socket_name, ids(r)) for r in result.resources} == {
        "example.com/t4": ("example.com-t4.sock", [model.gpus[0].uuid]),
        "nvidia.com/gpu": ("nvidia-gpu.sock", [model.gpus[1].uuid]),
    }


def test_patterns_are_anchored(nodes: dict[str, Node]) -> None:
    # "T4" alone is not the whole name "Tesla T4": the default takes the GPUs.
    result = plan(nodes["pcie-4"].model, config(gpus=(ResourcePattern("T4", "t4"),)))
    assert [r.name for r in result.resources] == ["nvidia.com/gpu"]
    # "1g.5gb" must not take the "1g.5gb+me" slice.
    mixed = by_name(plan(nodes["a100-mig"].model,
                         config("mixed", migs=(ResourcePattern("1g.5gb", "mig-small"),))))
    assert len(mixed["nvidia.com/mig-small"].devices) == 9
    assert len(mixed["nvidia.com/mig-1g.5gb.me"].devices) == 1
    assert "nvidia.com/mig-1g.5gb" not in mixed


def test_glob_matches() -> None:
    assert glob_matches("*", "anything")
    assert glob_matches("*", "")
    assert glob_matches("1g.10gb", "1g.10gb")
    assert not glob_matches("1g.10gb", "1g.10gb+me")
    assert glob_matches("1g.10gb*", "1g.10gb+me")
    assert not glob_matches("1g.5gb", "1gx5gb")  # '.' is literal
    assert not glob_matches("A100", "NVIDIA A100-SXM4-40GB")
    assert glob_matches("*A100*", "NVIDIA A100-SXM4-40GB")
    assert glob_matches("NVIDIA*40GB", "NVIDIA A100-SXM4-40GB")


def test_socket_names() -> None:
    assert socket_name("nvidia.com/gpu") == "nvidia-gpu.sock"
    assert socket_name("nvidia.com/mig-1g.5gb") == "nvidia-mig-1g.5gb.sock"
    assert socket_name("nvidia.com/gpu.shared") == "nvidia-gpu.shared.sock"
    assert socket_name("example.com/gpu") == "example.com-gpu.sock"


# --------------------------------------------------------------------------------------
# Sharing


def test_time_slicing_rename_by_default_on_dgx_a100(nodes: dict[str, Node]) -> None:
    model = nodes["dgx-a100"].model
    # As the README's example: 8 GPUs, 10 replicas -> nvidia.com/gpu.shared: 80.
    for rename in ("nvidia.com/gpu.shared", None):  # Config fills it; a bare one may not
        entry = ReplicatedResource("nvidia.com/gpu", 10, rename=rename)
        result = plan(model, config(time_slicing=shared(entry, rename_by_default=True)))
        assert [r.name for r in result.resources] == ["nvidia.com/gpu.shared"]
        resource = result.resources[0]
        assert resource.socket_name == "nvidia-gpu.shared.sock"
        assert resource.sharing == "time-slicing"
        assert not resource.fail_requests_greater_than_one
        assert ids(resource) == [f"{u}::{n}" for u in gpu_uuids(model) for n in range(10)]
        assert [d.replica for d in resource.devices] == list(range(10)) * 8
        assert [d.base_id for d in resource.devices] == [u for u in gpu_uuids(model) for _ in range(10)]
        for device in resource.devices:
            gpu = model.gpu(device.uuid)
            assert device.units == (gpu.uuid,)
            assert device.paths == (f"/dev/nvidia{gpu.minor}",)
            assert device.numa_nodes == (gpu.index // 4,)
            assert device.index == str(gpu.index)


def test_time_slicing_without_rename_keeps_the_name(nodes: dict[str, Node]) -> None:
    model = nodes["pcie-4"].model
    sharing = shared(ReplicatedResource("nvidia.com/gpu", 2), fail=True)
    result = plan(model, config(ids="index", time_slicing=sharing))
    assert [r.name for r in result.resources] == ["nvidia.com/gpu"]
    assert ids(result.resources[0]) == ["0::0", "0::1", "1::0", "1::1", "2::0", "2::1",
                                        "3::0", "3::1"]
    assert result.resources[0].fail_requests_greater_than_one


def test_replicas_of_a_whole_mig_gpu_share_its_slices_units(nodes: dict[str, Node]) -> None:
    model = nodes["a100-mig"].model
    result = plan(model, config("none", time_slicing=shared(ReplicatedResource("gpu", 3))))
    gpu3 = model.gpus[3]
    replicas = [d for d in result.resources[0].devices if d.uuid == gpu3.uuid]
    assert [d.id for d in replicas] == [f"{gpu3.uuid}::{n}" for n in range(3)]
    assert {d.units for d in replicas} == {(gpu3.uuid, *(m.uuid for m in gpu3.mig_devices))}


def test_a_count_shares_the_first_devices_and_leaves_the_rest_unshared(nodes: dict[str, Node]) -> None:
    model = nodes["dgx-a100"].model
    entry = ReplicatedResource("nvidia.com/gpu", 4, rename="gpu.ts",
                               devices=ReplicatedDevices(all=False, count=2))
    result = by_name(plan(model, config(time_slicing=shared(entry))))
    uuids = gpu_uuids(model)
    assert ids(result["nvidia.com/gpu"]) == uuids[2:]
    assert result["nvidia.com/gpu"].sharing == "none"
    assert ids(result["nvidia.com/gpu.ts"]) == [f"{u}::{n}" for u in uuids[:2] for n in range(4)]
    assert result["nvidia.com/gpu.ts"].sharing == "time-slicing"
    assert result["nvidia.com/gpu.ts"].socket_name == "nvidia-gpu.ts.sock"


def test_different_replica_counts_for_different_gpus(nodes: dict[str, Node]) -> None:
    model = nodes["dgx-a100"].model
    uuids = gpu_uuids(model)
    small = ReplicatedResource("nvidia.com/gpu", 2, rename="gpu.small",
                               devices=ReplicatedDevices(all=False, ids=("0", "1")))
    big = ReplicatedResource("nvidia.com/gpu", 8, rename="nvidia.com/gpu.big",
                             devices=ReplicatedDevices(all=False, ids=(uuids[3], "2")))
    result = plan(model, config(ids="index", time_slicing=shared(small, big)))
    assert {r.name: ids(r) for r in result.resources} == {
        "nvidia.com/gpu": ["4", "5", "6", "7"],
        "nvidia.com/gpu.big": [f"{i}::{n}" for i in (2, 3) for n in range(8)],
        "nvidia.com/gpu.small": [f"{i}::{n}" for i in (0, 1) for n in range(2)],
    }
    assert [r.sharing for r in result.resources] == ["none", "time-slicing", "time-slicing"]


def test_shared_and_unshared_gpus_in_one_resource(nodes: dict[str, Node]) -> None:
    model = nodes["pcie-4"].model
    entry = ReplicatedResource("nvidia.com/gpu", 3,
                               devices=ReplicatedDevices(all=False, ids=("1",)))
    resource = plan(model, config(ids="index", time_slicing=shared(entry))).resources[0]
    assert ids(resource) == ["0", "1::0", "1::1", "1::2", "2", "3"]
    assert resource.sharing == "time-slicing"


def test_too_few_devices_for_the_count(nodes: dict[str, Node]) -> None:
    entry = ReplicatedResource("nvidia.com/gpu", 2, devices=ReplicatedDevices(all=False, count=5))
    with pytest.raises(PlanError, match="^requested 5 devices to be replicated, but only 4 "
                                        "devices available$"):
        plan(nodes["pcie-4"].model, config(time_slicing=shared(entry)))


def test_unknown_devices_in_the_list_name_the_devices_and_the_resource(nodes: dict[str, Node]) -> None:
    entry = ReplicatedResource("nvidia.com/gpu", 2,
                               devices=ReplicatedDevices(all=False, ids=("1", "7", "GPU-nope")))
    with pytest.raises(PlanError) as caught:
        plan(nodes["pcie-4"].model, config(time_slicing=shared(entry)))
    message = str(caught.value)
    assert "'7'" in message and "'GPU-nope'" in message and "nvidia.com/gpu" in message
    assert "'1'" not in message


def test_one_device_in_two_entries_is_an_error(nodes: dict[str, Node]) -> None:
    model = nodes["pcie-4"].model
    first = ReplicatedResource("nvidia.com/gpu", 2, rename="a",
                               devices=ReplicatedDevices(all=False, ids=("0", "1")))
    second = ReplicatedResource("nvidia.com/gpu", 4, rename="b",
                                devices=ReplicatedDevices(all=False, ids=(model.gpus[1].uuid,)))
    with pytest.raises(PlanError, match=re.escape(model.gpus[1].uuid)):
        plan(model, config(time_slicing=shared(first, second)))


def test_sharing_a_resource_not_on_the_node_only_warns(nodes: dict[str, Node]) -> None:
    sharing = shared(ReplicatedResource("nvidia.com/gpu", 2),
                     ReplicatedResource("nvidia.com/mig-1g.10gb", 2))
    result = plan(nodes["pcie-4"].model, config(time_slicing=sharing))
    assert [(r.name, len(r.devices)) for r in result.resources] == [("nvidia.com/gpu", 8)]
    # The entry's key path, what it asked for and what the node has instead (#14 item 6).
    assert result.warnings == (
        "sharing.timeSlicing.resources[1].name: no 'nvidia.com/mig-1g.10gb' devices on this "
        "node, nothing to share (resources on this node: nvidia.com/gpu)",)


def test_sharing_on_a_node_whose_gpus_are_renamed_names_the_new_name(
        nodes: dict[str, Node]) -> None:
    # resources.gpus renamed the T4s, so an entry for nvidia.com/gpu shares nothing: the
    # warning shows the name to write instead.
    renamed = config(gpus=(ResourcePattern("Tesla T4", "nvidia.com/t4"),),
                     mps=shared(ReplicatedResource("nvidia.com/gpu", 2)))
    result = plan(nodes["pcie-4"].model, renamed)
    assert [(r.name, len(r.devices)) for r in result.resources] == [("nvidia.com/t4", 4)]
    assert result.warnings == (
        "sharing.mps.resources[0].name: no 'nvidia.com/gpu' devices on this node, nothing to "
        "share (resources on this node: nvidia.com/t4)",)


def test_time_slicing_mig_devices_by_index_and_legacy_uuid(nodes: dict[str, Node]) -> None:
    model = nodes["a100-mig"].model
    legacy = model.gpus[2].mig_devices[5]
    entry = ReplicatedResource(
        "nvidia.com/mig-1g.5gb", 2, rename="mig-1g.5gb.shared",
        devices=ReplicatedDevices(all=False, ids=(
            "2:3", f"MIG-{legacy.parent_uuid}/{legacy.gi_id}/{legacy.ci_id}",
            mig_uuid(model, 0, 2))))
    result = by_name(plan(model, config("mixed", ids="index", time_slicing=shared(entry))))
    assert ids(result["nvidia.com/mig-1g.5gb.shared"]) == [
        "0:2::0", "0:2::1", "2:3::0", "2:3::1", "2:5::0", "2:5::1"]
    assert ids(result["nvidia.com/mig-1g.5gb"]) == ["0:3", "2:0", "2:1", "2:2", "2:4", "2:6"]
    assert result["nvidia.com/mig-1g.5gb.shared"].devices[0].units == (
        mig_uuid(model, 0, 2), model.gpus[0].uuid)


def test_mps_shares_full_gpus(nodes: dict[str, Node]) -> None:
    model = nodes["dgx-a100"].model
    mps = shared(ReplicatedResource("nvidia.com/gpu", 4))
    resource = plan(model, config(mps=mps)).resources[0]
    assert resource.name == "nvidia.com/gpu"
    assert resource.sharing == "mps"
    assert resource.fail_requests_greater_than_one  # MPS's default
    assert len(resource.devices) == 32


def test_mps_rejects_mig_devices(nodes: dict[str, Node]) -> None:
    mps = shared(ReplicatedResource("nvidia.com/mig-1g.5gb", 2))
    with pytest.raises(PlanError, match="^sharing using MPS is not supported for MIG devices$"):
        plan(nodes["a100-mig"].model, config("mixed", mps=mps))


def test_single_replicated_as_nvidia_com_gpu() -> None:
    model = hand_node(hand_gpu(0, "3g.20gb", "3g.20gb"))
    sharing = shared(ReplicatedResource("nvidia.com/gpu", 2), rename_by_default=True)
    result = plan(model, config("single", ids="index", time_slicing=sharing))
    assert {r.name: ids(r) for r in result.resources} == {
        "nvidia.com/gpu.shared": ["0:0::0", "0:0::1", "0:1::0", "0:1::1"]}


# --------------------------------------------------------------------------------------
# mig-minors


def test_parse_the_simulators_mig_minors(nodes: dict[str, Node]) -> None:
    text = nodes["a100-mig"].minors_text
    minors = parse_mig_minors(text)
    # config and monitor are dropped; per GPU minor 15 GIs, each with 8 CIs.
    assert len(minors) == 4 * 15 * (1 + 8)
    for line in text.splitlines():
        name, value = line.split()
        if match := re.fullmatch(r"gpu(\d+)/gi(\d+)/access", name):
            assert minors[(int(match[1]), int(match[2]), None)] == int(value)
        elif match := re.fullmatch(r"gpu(\d+)/gi(\d+)/ci(\d+)/access", name):
            assert minors[(int(match[1]), int(match[2]), int(match[3]))] == int(value)
        else:
            assert name in ("config", "monitor")


def test_parse_mig_minors_small() -> None:
    text = "config 1\nmonitor 2\n\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\n"
    assert parse_mig_minors(text) == {(0, 1, None): 12, (0, 1, 0): 13}
    assert mig_cap_paths(parse_mig_minors(text), 0, 1, 0) == (
        "/dev/nvidia-caps/nvidia-cap12", "/dev/nvidia-caps/nvidia-cap13")


@pytest.mark.parametrize("line", ["gpu0/gi1/access", "gpu0/gi1/access x", "gpu0/gix/access 3",
                                  "gpu0/gi1/ci0/write 4", "bogus 5", "gpu0/gi1/access 3 4"])
def test_malformed_mig_minors_lines_name_the_line(line: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_mig_minors(f"config 1\nmonitor 2\n{line}\n")
    assert "line 3" in str(caught.value) and line in str(caught.value)


def test_a_capability_listed_twice_is_malformed() -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_mig_minors("gpu0/gi1/access 3\ngpu0/gi1/access 4\n")


def test_mig_cap_paths_errors() -> None:
    with pytest.raises(PlanError, match="^missing MIG GPU instance capability path$"):
        mig_cap_paths({(0, 1, 0): 13}, 0, 1, 0)
    with pytest.raises(PlanError, match="^missing MIG compute instance capability path$"):
        mig_cap_paths({(0, 1, None): 12}, 0, 1, 0)
    with pytest.raises(PlanError, match="^missing MIG GPU instance capability path$"):
        mig_cap_paths({(0, 1, None): 12, (0, 1, 0): 13}, 1, 1, 0)  # another GPU's minor
