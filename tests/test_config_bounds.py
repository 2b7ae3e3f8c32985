"""Bounded sizes (#14 item 1): ``replicas`` and the devices of one resource are bounded
by what the kubelet can read, a ListAndWatchResponse of at most 4 MiB (grpc-go's default
receive limit, which the kubelet's device-plugin client keeps).

The bounds are pinned by encoding: the largest allowed device list, encoded by our codec
and by protobuf, fits in 4 MiB, and one device more does not.  A value that can never
fit is refused while the file is read, before anything is allocated; one that cannot fit
this node is refused when the node is planned, naming the key; a reload with either is
refused while the old configuration keeps serving, and the plugin still stops on SIGINT
or SIGTERM.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import signal
import subprocess
import tracemalloc
import types

import pytest

from tests.test_cli import GPU, HANG_GUARD, read_stderr_until, run_cli, start_cli, wait_exit
from trio_gpu_plugin._config import (
    Config,
    ConfigError,
    Flags,
    PluginFlags,
    ReplicatedDevices,
    ReplicatedResource,
    Sharing,
    SharingStrategy,
    resolve_config,
)
from trio_gpu_plugin._devices import DeviceInfo
from trio_gpu_plugin._discovery import discover
from trio_gpu_plugin._node_model import GpuInfo, NodeModel
from trio_gpu_plugin._nvml_sim import PRESETS, SimulatedNVML
from trio_gpu_plugin._plan_model import (
    MAX_LIST_AND_WATCH_BYTES,
    MAX_REPLICAS,
    PlannedDevice,
    PlannedResource,
)
from trio_gpu_plugin._resources import PlanError, plan
from trio_gpu_plugin.proto import v1beta1
from trio_gpu_plugin.testing import FakeKubelet

FOUR_MIB = 4 * 1024 * 1024
ABSURD = 99_999_999_999
REPLICAS_KEY = "sharing.timeSlicing.resources[0].replicas"


def sharing_config(replicas: int, *, ids: str = "uuid") -> Config:
    """Time-slicing of every ``nvidia.com/gpu``, built by hand (no parse-time check)."""
    strategy = SharingStrategy(resources=(ReplicatedResource("nvidia.com/gpu", replicas),))
    return Config(flags=Flags(plugin=PluginFlags(device_id_strategy=ids)),
                  sharing=Sharing(time_slicing=strategy))


def sharing_document(replicas: int) -> dict[str, object]:
    return {"version": "v1", "sharing": {"timeSlicing": {"resources": [
        {"name": "nvidia.com/gpu", "replicas": replicas}]}}}


def one_gpu(numa_node: int | None = None, uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
            ) -> NodeModel:
    return NodeModel(gpus=(GpuInfo(
        uuid=uuid, index=0, minor=0, name="NVIDIA A100-SXM4-40GB", memory_bytes=40 << 30,
        pci_bus_id="00000000:07:00.0", compute_capability=(8, 0), numa_node=numa_node,
        mig_enabled=False, mig_devices=()),))


def worst_case_response(resource: PlannedResource) -> v1beta1.ListAndWatchResponse:
    """The resource's device list as the plugin publishes it, every device unhealthy
    (the longer health string): the largest that list can be."""
    return v1beta1.ListAndWatchResponse(devices=[
        DeviceInfo(d.id, healthy=False, numa_nodes=d.numa_nodes).to_proto()
        for d in resource.devices])


@pytest.fixture(scope="module")
def pcie4(tmp_path_factory: pytest.TempPathFactory) -> NodeModel:
    nvml = SimulatedNVML(PRESETS["pcie-4"])
    nvml.nvmlInit()
    root = tmp_path_factory.mktemp("pcie-4")
    nvml.write_driver_root(root)
    return discover(nvml, root).model


# --------------------------------------------------------------------------------------
# The bounds, pinned by encoding


def test_the_limit_is_the_kubelets_4_mib() -> None:
    assert MAX_LIST_AND_WATCH_BYTES == FOUR_MIB


def test_the_replica_bound_is_the_most_that_fit_in_4_mib_for_the_smallest_device(
        pb2: types.ModuleType) -> None:
    # The smallest device there can be: ID "0" (GPU 0, deviceIDStrategy index), no NUMA
    # node; its replicas are "0::0", "0::1", ...  All unhealthy: the list must fit in
    # any health.
    def encoded(count: int) -> int:
        return len(v1beta1.ListAndWatchResponse(devices=[
            v1beta1.Device(ID=f"0::{n}", health=v1beta1.UNHEALTHY)
            for n in range(count)]).SerializeToString())

    assert encoded(MAX_REPLICAS) <= FOUR_MIB < encoded(MAX_REPLICAS + 1)
    # protobuf, which the kubelet's side of the wire speaks, agrees on the size.
    reference = pb2.ListAndWatchResponse(devices=[
        pb2.Device(ID=f"0::{n}", health="Unhealthy") for n in range(MAX_REPLICAS)])
    assert reference.ByteSize() == encoded(MAX_REPLICAS)


def test_the_largest_allowed_plan_completes_and_fits() -> None:
    result = plan(one_gpu(), sharing_config(MAX_REPLICAS, ids="index"))
    [resource] = result.resources
    assert len(resource.devices) == MAX_REPLICAS
    assert resource.devices[-1].id == f"0::{MAX_REPLICAS - 1}"
    assert len(worst_case_response(resource).SerializeToString()) <= FOUR_MIB


def node_bound(model: NodeModel, config: Config) -> int:
    """The most replicas the planner says fit on ``model``, read from its error."""
    with pytest.raises(PlanError) as info:
        plan(model, config)
    found = re.search(r"at most (\d+) replicas fit here on this node", str(info.value))
    assert found, str(info.value)
    return int(found[1])


@pytest.mark.parametrize("numa_node", [None, 1])
def test_a_nodes_bound_is_tight_for_its_device_ids_and_topology(
        pcie4: NodeModel, numa_node: int | None) -> None:
    # pcie-4: four T4s named by UUID (each on a NUMA node); a hand-made GPU with or
    # without one.  At the bound the encoded list fits; one replica more it would not.
    for model in (pcie4, one_gpu(numa_node)):
        bound = node_bound(model, sharing_config(MAX_REPLICAS))
        assert 2 <= bound < MAX_REPLICAS
        [resource] = plan(model, sharing_config(bound)).resources
        assert len(resource.devices) == bound * len(model.gpus)
        assert len(worst_case_response(resource).SerializeToString()) <= FOUR_MIB
        one_more = [*resource.devices, *(next_replica(d, bound) for d in resource.devices
                                         if d.replica == 0)]
        assert len(worst_case_response(
            PlannedResource(resource.name, resource.socket_name, tuple(one_more))
        ).SerializeToString()) > FOUR_MIB


def next_replica(device: PlannedDevice, n: int) -> PlannedDevice:
    return dataclasses.replace(device, id=f"{device.base_id}::{n}", replica=n)


def test_too_many_replicas_for_this_node_name_the_key_the_limit_and_what_fits(
        pcie4: NodeModel) -> None:
    bound = node_bound(pcie4, sharing_config(MAX_REPLICAS))
    with pytest.raises(PlanError) as info:
        plan(pcie4, sharing_config(100_000))
    assert re.fullmatch(re.escape(
        f"{REPLICAS_KEY}: 100000 replicas of 4 device(s) would give 'nvidia.com/gpu' 400000 "
        "devices, a device list of ") + r"\d+" + re.escape(
        f" bytes; the kubelet takes at most {FOUR_MIB} bytes (4 MiB) in one ListAndWatch "
        f"response, so at most {bound} replicas fit here on this node"), str(info.value))


def test_entries_sharing_into_one_resource_count_together(pcie4: NodeModel) -> None:
    # Two entries renamed to one resource: each alone fits, together they do not; the
    # error names the later entry and what fits beside the earlier one.  Each entry asks
    # for one replica more than fits when all four GPUs carry the same count.
    each = node_bound(pcie4, sharing_config(MAX_REPLICAS)) + 1
    entries = tuple(ReplicatedResource("nvidia.com/gpu", each, rename="nvidia.com/slice",
                                       devices=ReplicatedDevices(all=False, ids=ids))
                    for ids in (("0", "1"), ("2", "3")))
    both = Config(sharing=Sharing(time_slicing=SharingStrategy(resources=entries)))
    with pytest.raises(PlanError, match=re.escape(
            "sharing.timeSlicing.resources[1].replicas: ") + rf"{each} replicas of 2 device"
            r"\(s\) would give 'nvidia.com/slice' " + str(4 * each) + r" devices, .* at most "
            r"\d+ replicas fit here on this node"):
        plan(pcie4, both)
    alone = Config(sharing=Sharing(time_slicing=SharingStrategy(resources=entries[:1])))
    assert len(plan(pcie4, alone).resource("nvidia.com/slice").devices) == 2 * each  # type: ignore[union-attr]


def test_a_resource_with_one_device_too_large_is_refused() -> None:
    # No sharing: a device list can still be too long (here: an absurd UUID).
    with pytest.raises(PlanError, match=re.escape(
            "'nvidia.com/gpu': 1 devices make a device list of ")):
        plan(one_gpu(uuid="GPU-" + "0" * FOUR_MIB), Config())


# --------------------------------------------------------------------------------------
# A value that can never fit allocates nothing


def test_an_absurd_replicas_value_is_refused_while_the_file_is_read() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config({}, {}, sharing_document(ABSURD), source="config file /etc/c.yaml")
    assert str(info.value) == (
        f"config file /etc/c.yaml: {REPLICAS_KEY}: {ABSURD} replicas can never be served: at "
        f"most {MAX_REPLICAS} fit in the 4 MiB ListAndWatch response the kubelet accepts, "
        "even for a single GPU (fewer on a node with more GPUs or longer device IDs)")
    with pytest.raises(ConfigError, match=re.escape(REPLICAS_KEY)):
        resolve_config({}, {}, sharing_document(MAX_REPLICAS + 1))
    config, _ = resolve_config({}, {}, sharing_document(MAX_REPLICAS))
    assert config.sharing.time_slicing is not None
    assert config.sharing.time_slicing.resources[0].replicas == MAX_REPLICAS


def peak_bytes_of(action: object) -> int:
    assert callable(action)
    tracemalloc.start()
    try:
        action()
    except ConfigError:
        pass
    else:
        raise AssertionError("the action was not refused")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_refusing_an_absurd_count_allocates_next_to_nothing(pcie4: NodeModel) -> None:
    # 99,999,999,999 replicas would be terabytes; refusing them must not even build one.
    # Both doors: the file reader, and the planner given a Config built by hand.
    assert peak_bytes_of(lambda: resolve_config({}, {}, sharing_document(ABSURD))) < 256 * 1024
    assert peak_bytes_of(lambda: plan(pcie4, sharing_config(ABSURD))) < 256 * 1024
    assert peak_bytes_of(lambda: plan(pcie4, sharing_config(100_000))) < 256 * 1024


# --------------------------------------------------------------------------------------
# The process: a reload with such a file is refused, the old configuration serves on


def write_sharing_file(path: pathlib.Path, replicas: int) -> None:
    path.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                    f"    - name: nvidia.com/gpu\n      replicas: {replicas}\n")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
async def test_a_reload_with_too_many_replicas_is_refused_and_the_old_devices_serve_on(
        fake_kubelet: FakeKubelet, socket_dir: pathlib.Path, stop: int) -> None:
    config = socket_dir / "config.yaml"
    write_sharing_file(config, 2)
    process = await start_cli(fake_kubelet, "--simulate", "pcie-4", "--config-file", str(config))
    output = bytearray()
    try:
        await fake_kubelet.wait_registered(GPU, timeout=HANG_GUARD)
        before = set(fake_kubelet.resources[GPU].healthy)
        assert len(before) == 8
        registrations = fake_kubelet.registration_count(GPU)
        # Never fits anywhere (refused while read); fits the reader but not 4 T4s.
        for replicas, reason in ((ABSURD, "can never be served"),
                                 (100_000, "replicas fit here on this node")):
            write_sharing_file(config, replicas)
            process.send_signal(signal.SIGHUP)
            await read_stderr_until(
                process, output, b"SIGHUP: keeping the running configuration: ")
            await read_stderr_until(process, output, reason.encode())
        text = output.decode()
        assert f"{REPLICAS_KEY}: {ABSURD} replicas" in text
        assert f"{REPLICAS_KEY}: 100000 replicas of 4 device(s)" in text
        assert "Traceback" not in text
        # Still serving the old devices, on the old registration: a pod can get one.
        assert fake_kubelet.registration_count(GPU) == registrations
        assert set(fake_kubelet.resources[GPU].healthy) == before
        admission = await fake_kubelet.admit(GPU, 1)
        assert set(admission.device_ids) <= before
        process.send_signal(stop)
        assert await wait_exit(process) == 0
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


@pytest.mark.parametrize(("replicas", "expected"), [
    (ABSURD, f"{REPLICAS_KEY}: {ABSURD} replicas can never be served"),
    (100_000, f"{REPLICAS_KEY}: 100000 replicas of 4 device(s) would give 'nvidia.com/gpu'"),
])
def test_inspect_with_too_many_replicas_says_so_and_exits_1(
        socket_dir: pathlib.Path, replicas: int, expected: str) -> None:
    config = socket_dir / "config.yaml"
    write_sharing_file(config, replicas)
    result: subprocess.CompletedProcess[str] = run_cli(
        "--simulate", "pcie-4", "--config-file", str(config), "inspect")
    assert result.returncode == 1, result.stderr
    assert expected in result.stderr
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
