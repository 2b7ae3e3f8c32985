"""What a real GPU node does that a naive simulator hid: GPUs that fall off the bus and
come back, MIG without privilege, link numbers with holes, calls that never return, lasting
memory damage and the driver's own recovery verdict.

Each test here failed on the plugin before the fix it pins down, once the simulated NVML
had learned the real behaviour (its docstring's table names where each comes from).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import pynvml
import pytest
import trio

from trio_gpu_plugin._discovery import discover
from trio_gpu_plugin._health import HealthChecks
from trio_gpu_plugin._nvml_sim import SimGpuSpec, SimNodeSpec, SimulatedNVML, node_from
from trio_gpu_plugin._nvml_source import NvmlNode, mig_slices

from .test_nvml_source import HANG_GUARD, Recorder, start

LOST = pynvml.NVML_ERROR_GPU_IS_LOST


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "driver-root"


def simulated(node: str | SimNodeSpec, root: pathlib.Path, **kwargs: Any) -> SimulatedNVML:
    nvml = SimulatedNVML(node_from(node) if isinstance(node, str) else node, **kwargs)
    nvml.write_driver_root(root)
    return nvml


async def until(predicate: Any, timeout: float = HANG_GUARD) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def ids(devices: Recorder) -> list[str]:
    return sorted(d.id for d in devices.lists[-1])


# --- 1. a lost GPU stays advertised, Unhealthy, and comes back -------------------------------

async def test_a_lost_gpu_stays_advertised_across_a_new_nvml_session_and_comes_back(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=0.2)
    everything = ids(devices)
    uuid = node.model.gpus[2].uuid  # type: ignore[union-attr]
    nvml.lose(2)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    sessions = node.sessions
    nvml.nvml_down()  # the driver restarts: a new session discovers the node again
    await devices.wait_until(lambda: len(devices.unhealthy) == 4)
    nvml.nvml_up()
    await until(lambda: node.sessions > sessions)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    assert ids(devices) == everything  # the kubelet still sees its capacity, Unhealthy
    nvml.recover(2)
    await devices.wait_until(lambda: devices.unhealthy == set())
    assert ids(devices) == everything
    assert node.model is not None and node.model.gpu(uuid).minor == 2


async def test_a_lost_gpu_failing_the_event_wait_restarts_no_session_for_the_others(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=60)
    uuid = node.model.gpus[1].uuid  # type: ignore[union-attr]
    nvml.lose(1)  # XID 79, then every wait on the set fails with GPU_IS_LOST
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    await trio.sleep(0.5)
    assert node.sessions == 1
    assert all({d.id for d in lst if not d.healthy} <= {uuid} for lst in devices.lists)
    nvml.xid(3, 48)  # the other GPUs' events still arrive
    other = node.model.gpus[3].uuid  # type: ignore[union-attr]
    await devices.wait_until(lambda: devices.unhealthy == {uuid, other})
    waits = [r for r in caplog.records if "event wait failed" in r.getMessage()]
    assert len(waits) == 1, [r.getMessage() for r in waits]


async def test_a_gpu_lost_before_start_up_is_served_once_it_answers(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    nvml.lose(3)  # NVML cannot even give its handle: it is unknown, not advertised
    node, devices = await start(nursery, nvml, root, window=0.2)
    assert len(ids(devices)) == 3
    nvml.recover(3)
    await devices.wait_until(lambda: len(ids(devices)) == 4 and devices.unhealthy == set())
    assert node.model is not None and [g.minor for g in node.model.gpus] == [0, 1, 2, 3]


# --- 10. facts that could not be read are read again before the GPU is Healthy --------------

async def test_a_gpu_half_read_at_start_up_is_read_again_before_it_is_healthy(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("dgx-a100", root)
    # Falling off the bus during discovery: its handle and UUID answered, then nothing.
    nvml.fail(4, ["nvmlDeviceGetMinorNumber", "nvmlDeviceGetMemoryInfo",
                  "nvmlDeviceGetPciInfo"], LOST)
    node, devices = await start(nursery, nvml, root, window=0.1)
    assert node.model is not None
    uuid = node.model.gpus[4].uuid
    assert uuid in devices.unhealthy
    nvml.unfail(4)
    await devices.wait_until(lambda: devices.unhealthy == set())
    gpu = node.model.gpu(uuid)
    assert (gpu.minor, gpu.name, gpu.numa_node) == (4, "NVIDIA A100-SXM4-40GB", 1)
    assert gpu.pci_bus_id and node.model.pcie[(uuid, node.model.gpus[5].uuid)] == 10


async def test_a_gpu_that_answers_but_still_cannot_be_read_backs_off(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    nvml.fail(1, ["nvmlDeviceGetMinorNumber"], LOST)
    node, devices = await start(nursery, nvml, root, window=0.05, probe=0.02)
    uuid = node.model.gpus[1].uuid  # type: ignore[union-attr]
    await trio.sleep(1.0)
    assert devices.unhealthy == {uuid}  # never Healthy while its minor is unknown
    # Re-reads after 0.04, 0.08, 0.16, 0.32... s, not one per 0.02 s probe.
    assert node.sessions <= 7, node.sessions


# --- 2. MIG without privilege ---------------------------------------------------------------

def test_mig_profiles_are_named_without_privilege(root: pathlib.Path) -> None:
    nvml = simulated("a100-mig", root)  # unprivileged, as a pod without the monitor cap
    nvml.nvmlInit()
    try:
        result = discover(nvml, root)
    finally:
        nvml.nvmlShutdown()
    assert [[m.profile for m in g.mig_devices] for g in result.model.gpus] == [
        ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"], ["7g.40gb"], ["1g.5gb"] * 7,
        ["4g.20gb", "2g.10gb", "1g.5gb+me"]]
    assert result.problems == {}
    assert all(g.memory_bytes > 0 for g in result.model.gpus)
    assert any("privileged" in note for notes in result.notes.values() for note in notes)


@pytest.mark.parametrize("privileged", [False, True])
@pytest.mark.parametrize(("model", "profiles"), [
    ("NVIDIA H200", ("3g.71gb", "4g.71gb")),  # half away from zero: 70.5 -> 71
    ("NVIDIA B200", ("1g.23gb", "1g.23gb+me", "2g.45gb", "3g.90gb")),  # 22.5 -> 23
    ("NVIDIA A30", ("2g.12gb+me", "1g.6gb", "1g.6gb")),
    ("NVIDIA H100 NVL", ("1g.12gb", "1g.24gb", "3g.47gb")),
])
def test_mig_slices_are_named_as_nvidia_names_them(root: pathlib.Path, privileged: bool,
                                                   model: str, profiles: tuple[str, ...]) -> None:
    node = SimNodeSpec("mig", (SimGpuSpec(model, mig=profiles),))
    nvml = simulated(node, root, privileged=privileged)
    nvml.nvmlInit()
    try:
        result = discover(nvml, root)
    finally:
        nvml.nvmlShutdown()
    assert tuple(m.profile for m in result.model.gpus[0].mig_devices) == profiles


async def test_mig_slices_stay_healthy_when_nvml_refuses_the_parents_memory(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trio_gpu_plugin.nvml")
    nvml = simulated("a100-mig", root)
    node, devices = await start(nursery, nvml, root, select=mig_slices, probe=0.02)
    await trio.sleep(0.5)  # some 25 probes
    assert devices.unhealthy == set()
    refused = [r for r in caplog.records if "not a device failure" in r.getMessage()]
    assert len(refused) == 4  # once per MIG-enabled GPU
    uuid = node.model.gpus[1].mig_devices[0].uuid  # type: ignore[union-attr]
    nvml.lose(1)  # a MIG parent that really is gone is still found by the probes
    await devices.wait_until(lambda: uuid in devices.unhealthy)


# --- 4. NVLink numbers with holes -----------------------------------------------------------

def test_nvlinks_after_unsupported_link_numbers_are_found(root: pathlib.Path) -> None:
    gpus = tuple(SimGpuSpec("NVIDIA A100-SXM4-40GB", nvlinks={1 - i: 4},
                            nvlink_unsupported=(0, 1, 2)) for i in range(2))
    nvml = simulated(SimNodeSpec("holes", gpus), root)
    nvml.nvmlInit()
    try:
        model = discover(nvml, root).model
    finally:
        nvml.nvmlShutdown()
    a, b = model.gpus
    assert a.nvlinks == {b.uuid: 4} and b.nvlinks == {a.uuid: 4}


# --- 5. no nvmlShutdown under a hung call ---------------------------------------------------

async def test_nvml_is_not_torn_down_under_a_call_that_hangs(root: pathlib.Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    nvml = simulated("pcie-4", root)
    async with trio.open_nursery() as nursery:
        node, devices = await start(nursery, nvml, root, probe=0.02, call_timeout=0.2)
        uuid = node.model.gpus[2].uuid  # type: ignore[union-attr]
        nvml.hang(2)
        await devices.wait_until(lambda: uuid in devices.unhealthy)
        nursery.cancel_scope.cancel()  # stop the plugin while the probe thread is stuck
    assert nvml.shutdown_under_live_call == 0
    assert nvml.init_count == 1  # kept for the stuck call
    assert "NVML stays initialised until they do" in caplog.text
    nvml.unhang(2)
    await until(lambda: nvml.init_count == 0)
    assert nvml.shutdown_under_live_call == 0


# --- 11. lasting damage holds recovery --------------------------------------------------------

async def test_a_failed_row_remap_keeps_the_gpu_unhealthy_and_says_why(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = simulated("dgx-a100", root)
    node, devices = await start(nursery, nvml, root, window=0.1)
    uuid = node.model.gpus[6].uuid  # type: ignore[union-attr]
    nvml.ecc_dbe(6)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    nvml.set_pending(6, row_remap_failed=True)
    nvml.recover(6)  # the reset clears the pending remap, not the failed one
    await trio.sleep(0.6)
    assert devices.unhealthy == {uuid}
    held = [r.getMessage() for r in caplog.records if "remapping failed" in r.getMessage()]
    assert held == [f"GPU 6 ({uuid}) stays unhealthy: row remapping failed (the GPU needs service)"]
    assert "held: row remapping failed" in node.reasons()[uuid]
    nvml.set_pending(6, row_remap_failed=False)  # serviced
    await devices.wait_until(lambda: devices.unhealthy == set())


async def test_climbing_uncorrectable_ecc_errors_hold_recovery_until_they_stop(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=0.2, probe=0.02)
    uuid = node.model.gpus[0].uuid  # type: ignore[union-attr]
    nvml.xid(0, 48)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    for _ in range(40):  # 0.8 s, four windows, errors still coming
        nvml.add_ecc_errors(0, 1)
        await trio.sleep(0.02)
    assert devices.unhealthy == {uuid}
    assert "uncorrectable ECC errors keep climbing" in caplog.text
    await devices.wait_until(lambda: devices.unhealthy == set())


# --- the driver's recovery action -----------------------------------------------------------

ACTIONS = {name.removeprefix("NVML_GPU_RECOVERY_ACTION_"): getattr(pynvml, name)
           for name in dir(pynvml) if name.startswith("NVML_GPU_RECOVERY_ACTION_")}


def reporting(preset: str) -> SimNodeSpec:
    """A preset whose driver reports recovery actions (NONE to start with)."""
    spec = node_from(preset)
    return SimNodeSpec(spec.name, tuple(
        SimGpuSpec(**{**{f: getattr(g, f) for f in g.__dataclass_fields__}, "recovery_action": 0})
        for g in spec.gpus), spec.driver_version)


@pytest.mark.parametrize("action", sorted(set(ACTIONS) - {"NONE"}))
async def test_an_xid_the_driver_wants_acted_on_is_unhealthy_until_the_action_reads_none(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture,
        action: str) -> None:
    nvml = simulated(reporting("pcie-4"), root)
    node, devices = await start(nursery, nvml, root, window=0.1, probe=0.02)
    uuid = node.model.gpus[2].uuid  # type: ignore[union-attr]
    # XID 13 is an application error to NVIDIA's filter; the driver knows better here.
    nvml.xid(2, 13, recovery_action=ACTIONS[action])
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    assert f"GPU 2 ({uuid}): the driver asks for {action}" in caplog.text
    await trio.sleep(0.4)  # windows pass; the driver still asks
    assert devices.unhealthy == {uuid}
    assert node.recovery_action(uuid) == action
    nvml.set_recovery_action(2, ACTIONS["NONE"])
    await devices.wait_until(lambda: devices.unhealthy == set())
    assert node.recovery_action(uuid) == "NONE"


async def test_a_recovery_action_found_by_a_probe_marks_the_gpu_without_an_xid(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated(reporting("pcie-4"), root)
    node, devices = await start(nursery, nvml, root, window=0.1, probe=0.02)
    uuid = node.model.gpus[0].uuid  # type: ignore[union-attr]
    nvml.set_recovery_action(0, ACTIONS["DRAIN_P2P"])
    await devices.wait_until(lambda: devices.unhealthy == {uuid})


async def test_an_xid_the_driver_calls_harmless_follows_the_xid_policy(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated(reporting("pcie-4"), root)
    node, devices = await start(nursery, nvml, root, window=0.1, probe=0.02)
    uuid = node.model.gpus[1].uuid  # type: ignore[union-attr]
    nvml.xid(1, 13, recovery_action=ACTIONS["NONE"])
    await trio.sleep(0.2)
    assert devices.unhealthy == set()
    nvml.xid(1, 79, recovery_action=ACTIONS["NONE"])  # NVIDIA's filter counts 79
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    await devices.wait_until(lambda: devices.unhealthy == set())  # the window passes


async def test_where_the_driver_reports_no_recovery_action_the_xid_policy_holds(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trio_gpu_plugin.nvml")
    nvml = simulated("pcie-4", root)  # recovery_action None: the field is NOT_SUPPORTED
    node, devices = await start(nursery, nvml, root, window=0.1, probe=0.02)
    uuid = node.model.gpus[1].uuid  # type: ignore[union-attr]
    nvml.xid(1, 13)
    await trio.sleep(0.2)
    assert devices.unhealthy == set()
    nvml.xid(1, 79)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    await devices.wait_until(lambda: devices.unhealthy == set())
    assert node.recovery_action(uuid) is None
    lines = [r for r in caplog.records if "does not report recovery actions" in r.getMessage()]
    assert len(lines) == 4  # once per GPU


async def test_disabling_xid_checks_disables_the_recovery_action_too(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated(reporting("pcie-4"), root)
    node, devices = await start(nursery, nvml, root, env={"DP_DISABLE_HEALTHCHECKS": "xids"},
                                window=0.1, probe=0.02)
    nvml.set_recovery_action(0, ACTIONS["GPU_RESET"])
    await trio.sleep(0.3)
    assert devices.unhealthy == set()
    assert node.recovery_action(node.model.gpus[0].uuid) is None  # type: ignore[union-attr]


async def test_the_recovery_action_is_a_metric_per_gpu(nursery: trio.Nursery,
                                                        root: pathlib.Path) -> None:
    from trio_gpu_plugin._metrics import Metrics

    metrics = Metrics()
    nvml = simulated(reporting("pcie-4"), root)
    node = NvmlNode(nvml, root=root, checks=HealthChecks(), recovery_window=0.1,
                    probe_interval=0.02, observer=metrics)
    await nursery.start(node.run)
    uuid = node.model.gpus[3].uuid  # type: ignore[union-attr]
    nvml.set_recovery_action(3, ACTIONS["NODE_REBOOT"])
    series = f'trio_gpu_plugin_gpu_recovery_action{{action="NODE_REBOOT",gpu="{uuid}"}} 1.0'
    await until(lambda: series in metrics.render().decode())
    nvml.set_recovery_action(3, ACTIONS["NONE"])
    await until(lambda: f'action="NONE",gpu="{uuid}"' in metrics.render().decode())
    assert "NODE_REBOOT" not in metrics.render().decode()


async def test_a_gpu_count_that_fails_alone_costs_no_health_and_no_crash(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    # The probe task counts GPUs every interval to see GPUs come and go; NVML may answer
    # that count with UNKNOWN while every GPU still answers (CI once caught it racing a
    # driver restart: the error ended the whole node).
    caplog.set_level(logging.INFO, "trio_gpu_plugin.nvml")
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=0.2)
    nvml.fail_node("nvmlDeviceGetCount", pynvml.NVML_ERROR_UNKNOWN)
    counted = nvml.calls["nvmlDeviceGetCount"]
    await until(lambda: nvml.calls["nvmlDeviceGetCount"] >= counted + 3)
    assert devices.unhealthy == set() and node.sessions == 1
    nvml.xid(1, 48)  # still watched
    uuid = node.model.gpus[1].uuid  # type: ignore[union-attr]
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    failed = [r for r in caplog.records if "could not count" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelname == "WARNING", failed
    nvml.unfail_node()
    await until(lambda: any("counts GPUs again" in r.getMessage() for r in caplog.records))
    assert node.sessions == 1


async def test_a_gpu_count_saying_nvml_is_gone_restarts_the_session(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=0.2)
    nvml.fail_node("nvmlDeviceGetCount", pynvml.NVML_ERROR_UNINITIALIZED)
    await devices.wait_until(lambda: len(devices.unhealthy) == 4)
    nvml.unfail_node()
    await until(lambda: node.sessions > 1)
    await devices.wait_until(lambda: devices.unhealthy == set())


async def test_every_gpu_and_the_count_failing_is_nvml_failing_and_a_new_session_follows(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    # The event waits still answer here, so only the probes can tell that nothing else
    # does: a driver being reloaded answers UNKNOWN to every call.
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=0.2)
    nvml.fail_node("nvmlDeviceGetCount", pynvml.NVML_ERROR_UNKNOWN)
    for gpu in range(4):
        nvml.fail(gpu, ["nvmlDeviceGetHandleByUUID", "nvmlDeviceGetMemoryInfo"],
                  pynvml.NVML_ERROR_UNKNOWN)
    await devices.wait_until(lambda: len(devices.unhealthy) == 4)
    nvml.unfail_node()
    for gpu in range(4):
        nvml.unfail(gpu)
    await until(lambda: node.sessions > 1)
    await devices.wait_until(lambda: devices.unhealthy == set())
