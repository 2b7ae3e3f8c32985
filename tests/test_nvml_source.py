"""The NVML device source over the simulated NVML: discovery of every preset, each health
rule, recovery, NVML failing at start and mid-run, no log flood, prompt cancellation."""

from __future__ import annotations

import logging
import math
import pathlib
import re
from collections.abc import Sequence

import pynvml
import pytest
import trio

from trio_gpu_plugin import DevicePlugin, Resource
from trio_gpu_plugin._devices import DeviceInfo
from trio_gpu_plugin._discovery import DiscoveryError, discover, numa_node_path
from trio_gpu_plugin._mig_profiles import profile_name
from trio_gpu_plugin._health import HealthChecks
from trio_gpu_plugin._logging import REMINDER_INTERVAL
from trio_gpu_plugin._nvml_sim import PRESETS, SimulatedNVML, node_from
from trio_gpu_plugin._nvml_source import (
    NvmlInitError,
    NvmlNode,
    mig_slices,
    whole_gpus,
    with_replicas,
)
from trio_gpu_plugin.testing import FakeKubelet

GPU = "nvidia.com/gpu"
HANG_GUARD = 10.0
DGX1_LINKS = {(0, 1): 1, (0, 2): 1, (0, 3): 2, (0, 4): 2, (1, 2): 2, (1, 3): 1, (1, 5): 2,
              (2, 3): 2, (2, 6): 1, (3, 7): 1, (4, 5): 1, (4, 6): 1, (4, 7): 2, (5, 6): 2,
              (5, 7): 1, (6, 7): 2}


def simulated(preset: str, root: pathlib.Path, **kwargs: object) -> SimulatedNVML:
    nvml = SimulatedNVML(node_from(preset), **kwargs)  # type: ignore[arg-type]
    nvml.write_driver_root(root)
    return nvml


def discovered(preset: str, root: pathlib.Path) -> tuple[SimulatedNVML, object]:
    nvml = simulated(preset, root)
    nvml.nvmlInit()
    try:
        return nvml, discover(nvml, root)
    finally:
        nvml.nvmlShutdown()


class Recorder:
    """A publish callback that keeps every list and wakes waiters."""

    def __init__(self) -> None:
        self.lists: list[list[DeviceInfo]] = []
        self._changed = trio.Event()

    def __call__(self, devices: Sequence[DeviceInfo]) -> None:
        self.lists.append(list(devices))
        self._changed.set()
        self._changed = trio.Event()

    @property
    def unhealthy(self) -> set[str]:
        return {d.id for d in self.lists[-1] if not d.healthy}

    async def wait_until(self, predicate: object, timeout: float = HANG_GUARD) -> None:
        with trio.fail_after(timeout):
            while not (self.lists and predicate()):  # type: ignore[operator]
                await self._changed.wait()


async def start(nursery: trio.Nursery, nvml: SimulatedNVML, root: pathlib.Path, *,
                env: dict[str, str] | None = None, window: float = 0.3, probe: float = 0.05,
                select: object = whole_gpus, fail: bool = True,
                call_timeout: float = 10.0) -> tuple[NvmlNode, Recorder]:
    node = NvmlNode(nvml, root=root, checks=HealthChecks.from_env(env or {}),
                    recovery_window=window, probe_interval=probe, fail_on_init_error=fail,
                    call_timeout=call_timeout)
    await nursery.start(node.run)
    recorder = Recorder()
    await nursery.start(node.source(select).run, recorder)  # type: ignore[arg-type]
    return node, recorder


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "driver-root"


# --- discovery ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_discovered_with_identity_memory_numa_and_paths(
        preset: str, root: pathlib.Path) -> None:
    nvml, result = discovered(preset, root)
    model = result.model  # type: ignore[attr-defined]
    spec = node_from(preset)
    assert result.problems == {}  # type: ignore[attr-defined]
    assert [g.index for g in model.gpus] == list(range(len(spec.gpus)))
    assert len({g.uuid for g in model.gpus}) == len(spec.gpus)
    for gpu, gpu_spec in zip(model.gpus, spec.gpus):
        assert gpu.uuid.startswith("GPU-")
        assert gpu.name == gpu_spec.name
        assert gpu.minor == gpu.index
        assert gpu.memory_bytes > 0 and gpu.memory_bytes % (1024 * 1024) == 0
        assert gpu.numa_node == gpu_spec.numa_node
        assert gpu.compute_capability[0] >= 7
        assert pathlib.Path(numa_node_path(root, gpu.pci_bus_id)).exists()
    assert model.driver_version


def test_dgx_a100_is_eight_a100s_behind_nvswitches_on_two_numa_nodes(root: pathlib.Path) -> None:
    _, result = discovered("dgx-a100", root)
    model = result.model  # type: ignore[attr-defined]
    assert [g.name for g in model.gpus] == ["NVIDIA A100-SXM4-40GB"] * 8
    assert [g.numa_node for g in model.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(g.nvswitch_links == 12 and not g.nvlinks for g in model.gpus)
    assert [g.memory_bytes for g in model.gpus] == [40960 * 2**20] * 8
    g = model.gpus
    assert model.pcie[(g[0].uuid, g[1].uuid)] == 10  # one PCIe switch
    assert model.pcie[(g[0].uuid, g[2].uuid)] == 40  # same NUMA node
    assert model.pcie[(g[0].uuid, g[4].uuid)] == model.pcie[(g[4].uuid, g[0].uuid)] == 50


def test_dgx_1_nvlink_is_the_hybrid_cube_mesh(root: pathlib.Path) -> None:
    _, result = discovered("dgx-1", root)
    model = result.model  # type: ignore[attr-defined]
    uuids = [g.uuid for g in model.gpus]
    found = {}
    for gpu in model.gpus:
        assert sum(gpu.nvlinks.values()) == 6 and gpu.nvswitch_links == 0
        for peer, count in gpu.nvlinks.items():
            a, b = sorted((gpu.index, uuids.index(peer)))
            found[(a, b)] = count
    assert found == DGX1_LINKS


def test_pcie_4_has_no_nvlink_and_spans_two_numa_nodes(root: pathlib.Path) -> None:
    _, result = discovered("pcie-4", root)
    model = result.model  # type: ignore[attr-defined]
    assert [g.name for g in model.gpus] == ["Tesla T4"] * 4
    assert [g.numa_node for g in model.gpus] == [0, 0, 1, 1]
    assert all(not g.nvlinks and g.nvswitch_links == 0 for g in model.gpus)
    assert all(g.compute_capability == (7, 5) for g in model.gpus)


def test_a100_mig_slices_carry_parent_ids_profiles_and_numa(root: pathlib.Path) -> None:
    nvml, result = discovered("a100-mig", root)
    model = result.model  # type: ignore[attr-defined]
    assert all(g.mig_enabled for g in model.gpus)
    assert [[m.profile for m in g.mig_devices] for g in model.gpus] == [
        ["3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"], ["7g.40gb"], ["1g.5gb"] * 7,
        ["4g.20gb", "2g.10gb", "1g.5gb+me"]]
    for gpu in model.gpus:
        assert len({m.gi_id for m in gpu.mig_devices}) == len(gpu.mig_devices)
        for slot, mig in enumerate(gpu.mig_devices):
            assert mig.uuid.startswith("MIG-")
            assert (mig.parent_uuid, mig.parent_index, mig.index) == (gpu.uuid, gpu.index, slot)
            assert mig.numa_node == gpu.numa_node
    assert model.gpus[1].mig_devices[0].memory_bytes == 40192 * 2**20


def test_profile_names_follow_go_nvlib() -> None:
    total = 40960 * 2**20
    assert profile_name(0, 0, 4864, total) == "1g.5gb"
    assert profile_name(7, 0, 4864, total) == "1g.5gb+me"
    assert profile_name(9, 0, 9856, total) == "1g.10gb"
    assert profile_name(1, 0, 9856, total) == "1c.2g.10gb"
    assert profile_name(4, 4, 40192, total) == "7g.40gb"
    assert profile_name(0, 0, 9728, 81920 * 2**20) == "1g.10gb"


def test_numa_node_is_read_from_sysfs_as_nvidia_reads_it(root: pathlib.Path) -> None:
    assert numa_node_path("/", "00000000:3B:00.0") == "/sys/bus/pci/devices/0000:3b:00.0/numa_node"
    nvml = simulated("pcie-4", root)
    nvml.nvmlInit()
    first = discover(nvml, root).model.gpus[0]
    path = pathlib.Path(numa_node_path(root, first.pci_bus_id))
    path.write_text("-1\n")
    assert discover(nvml, root).model.gpus[0].numa_node is None
    path.unlink()
    assert discover(nvml, root).model.gpus[0].numa_node is None
    path.write_text("zero\n")
    with pytest.raises(DiscoveryError, match="numa_node: expected a NUMA node number, found 'zero'"):
        discover(nvml, root)
    nvml.nvmlShutdown()


# --- health events ------------------------------------------------------------------------

async def test_an_xid_marks_its_gpu_unhealthy_and_no_other(nursery: trio.Nursery,
                                                           root: pathlib.Path) -> None:
    nvml = simulated("dgx-a100", root)
    node, devices = await start(nursery, nvml, root)
    assert len(devices.lists[-1]) == 8 and devices.unhealthy == set()
    victim = node.model.gpus[3].uuid  # type: ignore[union-attr]
    nvml.xid(3, 79)
    await devices.wait_until(lambda: devices.unhealthy == {victim})


@pytest.mark.parametrize("xid", [13, 31, 43, 45, 68, 109])
async def test_application_xids_are_ignored_as_nvidia_ignores_them(
        nursery: trio.Nursery, root: pathlib.Path, xid: int) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root)
    nvml.xid(0, xid)
    nvml.xid(1, 79)  # a critical one after it: once it shows, the first was handled
    await devices.wait_until(lambda: devices.unhealthy == {node.model.gpus[1].uuid})  # type: ignore[union-attr]


@pytest.mark.parametrize(("env", "counted", "ignored"), [
    ({"DP_DISABLE_HEALTHCHECKS": "79"}, 48, 79),
    ({"DP_ENABLE_HEALTHCHECKS": "31"}, 31, 13),
    ({"DP_DISABLE_HEALTHCHECKS": "all", "DP_ENABLE_HEALTHCHECKS": "79"}, 79, 48),
    ({"DP_DISABLE_HEALTHCHECKS": "13, 48", "DP_ENABLE_HEALTHCHECKS": "all"}, 13, None),
])
async def test_the_environment_knobs_choose_which_xids_count(
        nursery: trio.Nursery, root: pathlib.Path, env: dict[str, str], counted: int,
        ignored: int | None) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, env=env)
    uuids = [g.uuid for g in node.model.gpus]  # type: ignore[union-attr]
    if ignored is not None:
        nvml.xid(0, ignored)
    nvml.xid(1, counted)
    await devices.wait_until(lambda: uuids[1] in devices.unhealthy)
    assert devices.unhealthy == {uuids[1]}


async def test_all_health_checks_disabled_means_no_event_set_and_no_probe(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, env={"DP_DISABLE_HEALTHCHECKS": "all"})
    nvml.xid(0, 79)
    nvml.lose(1)
    await trio.sleep(0.3)
    assert devices.unhealthy == set()
    assert nvml.calls["nvmlEventSetCreate"] == 0
    assert nvml.calls["nvmlDeviceGetMemoryInfo"] == len(node.model.gpus)  # type: ignore[union-attr]  # discovery only


async def test_an_xid_marks_every_replica_of_its_gpu(nursery: trio.Nursery,
                                                     root: pathlib.Path) -> None:
    nvml = simulated("dgx-a100", root)
    node, devices = await start(nursery, nvml, root, select=with_replicas(whole_gpus, 4))
    assert len(devices.lists[-1]) == 32
    uuid = node.model.gpus[2].uuid  # type: ignore[union-attr]
    nvml.xid(2, 94)
    await devices.wait_until(lambda: devices.unhealthy == {f"{uuid}::{n}" for n in range(4)})


async def test_a_whole_gpu_xid_marks_every_mig_slice_and_a_slice_xid_only_that_slice(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("a100-mig", root)
    node, devices = await start(nursery, nvml, root, select=mig_slices)
    model = node.model
    assert model is not None
    gpu0, gpu3 = model.gpus[0], model.gpus[3]
    slice_ = gpu3.mig_devices[1]
    nvml.xid(3, 94, gi=slice_.gi_id, ci=slice_.ci_id)
    await devices.wait_until(lambda: devices.unhealthy == {slice_.uuid})
    nvml.xid(0, 79)  # GI/CI are the 0xFFFFFFFF sentinel: the whole GPU
    every = {m.uuid for m in gpu0.mig_devices} | {slice_.uuid}
    await devices.wait_until(lambda: devices.unhealthy == every)


async def test_an_xid_on_a_mig_gpu_marks_the_whole_gpu_device_under_strategy_none(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("a100-mig", root)
    node, devices = await start(nursery, nvml, root)
    model = node.model
    assert model is not None
    mig = model.gpus[2].mig_devices[5]
    nvml.xid(mig.uuid, 94)
    await devices.wait_until(lambda: devices.unhealthy == {model.gpus[2].uuid})


async def test_double_bit_ecc_is_acted_on_and_holds_until_the_page_is_retired(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=0.1)
    uuid = node.model.gpus[2].uuid  # type: ignore[union-attr]
    nvml.ecc_dbe(2)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    await trio.sleep(0.5)  # several windows: the retirement is still pending
    assert devices.unhealthy == {uuid}
    nvml.recover(2)  # a GPU reset retires the page
    await devices.wait_until(lambda: devices.unhealthy == set())


async def test_a_lost_gpu_goes_unhealthy_and_back_after_it_is_reset(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("dgx-a100", root)
    node, devices = await start(nursery, nvml, root, window=0.2)
    uuid = node.model.gpus[5].uuid  # type: ignore[union-attr]
    nvml.lose(5)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    await trio.sleep(0.5)
    assert devices.unhealthy == {uuid}  # NVML cannot reach it: no recovery
    nvml.recover(5)
    await devices.wait_until(lambda: devices.unhealthy == set())


async def test_gpu_unavailable_events_count_and_single_bit_ecc_does_not(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root)
    uuids = [g.uuid for g in node.model.gpus]  # type: ignore[union-attr]
    nvml.event(0, 0x1)  # single-bit ECC: corrected, nothing to act on
    nvml.event(1, 0x4000)  # GPU unavailable
    await devices.wait_until(lambda: devices.unhealthy == {uuids[1]})
    assert node.tracker.reason(uuids[1]) == "GPU unavailable"


async def test_a_lost_gpu_is_found_by_probes_when_xid_checks_are_off(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, env={"DP_DISABLE_HEALTHCHECKS": "xids"})
    uuid = node.model.gpus[0].uuid  # type: ignore[union-attr]
    nvml.lose(0)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    assert "GPU 0 (%s) is unhealthy: NVML cannot reach it: GPU is lost" % uuid in caplog.text


async def test_recovery_waits_a_whole_window_after_the_last_critical_event(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=0.6, probe=0.02)
    uuid = node.model.gpus[1].uuid  # type: ignore[union-attr]
    marked = trio.current_time()
    nvml.xid(1, 48)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    await trio.sleep(0.4)
    nvml.xid(1, 48)  # again, inside the window: the hold-down starts over
    again = trio.current_time()
    await trio.sleep(0.05)
    assert devices.unhealthy == {uuid}
    await devices.wait_until(lambda: devices.unhealthy == set())
    recovered = trio.current_time()
    assert recovered - again >= 0.6 - 0.01
    assert recovered - marked >= 1.0 - 0.01


async def test_window_zero_never_recovers_as_nvidia(nursery: trio.Nursery, root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=0, probe=0.02)
    uuid = node.model.gpus[1].uuid  # type: ignore[union-attr]
    nvml.xid(1, 79)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    await trio.sleep(0.5)
    assert devices.unhealthy == {uuid}


# --- NVML failing ---------------------------------------------------------------------------

async def test_nvml_init_failure_stops_start_up_with_what_to_check(root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root, init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    node = NvmlNode(nvml, root=root, checks=HealthChecks())
    with pytest.raises(NvmlInitError) as caught:
        await node.run()
    message = str(caught.value)
    assert "NVML could not start: NVML Shared Library Not Found" in message
    assert "nvidia-smi" in message and "--fail-on-init-error=false" in message


async def test_without_fail_on_init_error_it_retries_and_starts_once_nvml_works(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = simulated("pcie-4", root, init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    node = NvmlNode(nvml, root=root, checks=HealthChecks(), fail_on_init_error=False,
                    retry_initial=0.01, retry_cap=0.16)
    started = trio.Event()

    async def run() -> None:
        await nursery.start(node.run)
        started.set()

    def retries() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "NVML unavailable" in r.getMessage()]

    with caplog.at_level(logging.DEBUG, "trio_gpu_plugin.nvml"):
        nursery.start_soon(run)
        with trio.fail_after(HANG_GUARD):
            while len(retries()) < 5:
                await trio.sleep(0.01)
        assert not started.is_set() and node.model is None
        # One WARNING, saying what to check; the back-off steps after it at debug level.
        [warning] = [r.getMessage() for r in retries() if r.levelno >= logging.WARNING]
        assert "Driver Not Loaded" in warning and "nvidia-smi" in warning
        # The flag is false already: advising to set it would be no advice at all.
        assert "--fail-on-init-error" not in caplog.text
        nvml.set_init_error(None)
        with trio.fail_after(HANG_GUARD):
            await started.wait()
    assert node.model is not None and len(node.model.gpus) == 4


async def test_a_missing_driver_is_one_warning_then_a_reminder_every_ten_minutes(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture,
        autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    node = NvmlNode(simulated("pcie-4", root), root=root, checks=HealthChecks(),
                    fail_on_init_error=False)  # the default back-off: up to every 30 s
    attempts = 0

    async def no_driver() -> None:
        # What init gives without a driver, without the worker thread: the mock clock
        # would jump past a thread that is still running.
        nonlocal attempts
        attempts += 1
        await trio.lowlevel.checkpoint()
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(node, "_start_session", no_driver)
    with caplog.at_level(logging.DEBUG, "trio_gpu_plugin.nvml"):
        nursery.start_soon(node.run)
        await trio.sleep(25 * 60)
    assert REMINDER_INTERVAL == 600
    lines = [r for r in caplog.records if "NVML" in r.getMessage()]
    said = [r.getMessage() for r in lines if r.levelno >= logging.WARNING]
    # ~50 back-off steps in 25 minutes; three lines say so: at first, after 10 and 20 min.
    assert attempts > 40
    assert len(said) == 3, said
    assert said[0].startswith("NVML unavailable: Driver Not Loaded; retrying in ")
    # A reminder comes with the first retry at least 10 minutes after the last line; the
    # back-off's jitter (up to 30 s a step) decides which, so the minutes may run over.
    minutes = [re.match(r"NVML still unavailable after (\d+) min: Driver Not Loaded", line)
               for line in said[1:]]
    assert all(minutes), said
    first, second = (int(m[1]) for m in minutes if m)
    assert 10 <= first <= 11 and second - first >= 10 and second <= 22, said
    assert sum(r.levelno == logging.DEBUG for r in lines) == attempts - 3


async def test_nvml_dying_mid_run_marks_everything_then_recovers(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=0.2)
    uuids = {g.uuid for g in node.model.gpus}  # type: ignore[union-attr]
    nvml.nvml_down()
    await devices.wait_until(lambda: devices.unhealthy == uuids)
    assert "is unhealthy: NVML failed: event wait failed: Unknown Error" in caplog.text
    await trio.sleep(1.5)
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING and "NVML" in r.getMessage()]
    assert len(failures) <= 8, [r.getMessage() for r in failures]
    nvml.nvml_up()
    await devices.wait_until(lambda: devices.unhealthy == set())
    assert node.sessions >= 2


async def test_a_storm_of_xids_logs_one_line(nursery: trio.Nursery, root: pathlib.Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root)
    uuid = node.model.gpus[3].uuid  # type: ignore[union-attr]
    for _ in range(200):
        nvml.xid(3, 79)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    with trio.fail_after(HANG_GUARD):
        while node.tracker.repeats(uuid) < 199:
            await trio.sleep(0.01)
    lines = [r for r in caplog.records if uuid in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(lines) == 1


# --- NVML hanging ---------------------------------------------------------------------------

def hang_warnings(caplog: pytest.LogCaptureFixture, uuid: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and uuid in r.getMessage()]


async def test_a_gpu_hung_in_nvml_goes_unhealthy_alone_and_recovers_when_it_answers(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trio_gpu_plugin")
    nvml = simulated("pcie-4", root)
    node, devices = await start(nursery, nvml, root, window=0.3, call_timeout=0.3)
    uuids = [g.uuid for g in node.model.gpus]  # type: ignore[union-attr]
    nvml.hang(2)
    try:
        await devices.wait_until(lambda: devices.unhealthy == {uuids[2]})
        assert node.tracker.reason(uuids[2]) == "NVML hangs in a health probe"
        # The others keep their health current meanwhile: an XID on GPU 0 comes and goes.
        nvml.xid(0, 79)
        await devices.wait_until(lambda: devices.unhealthy == {uuids[0], uuids[2]})
        await devices.wait_until(lambda: devices.unhealthy == {uuids[2]})
        await trio.sleep(1.0)  # many probe rounds while it stays hung
        assert devices.unhealthy == {uuids[2]}
        assert nvml.blocked == 1  # one thread left in the driver, not one per round
        assert node.limiter.total_tokens == 3  # its token is lent out for as long
        # Once per cause: the hang, not a line per probe round.
        assert len(hang_warnings(caplog, uuids[2])) == 1, hang_warnings(caplog, uuids[2])
        assert "has not returned from a health probe for 0.3 s" in hang_warnings(caplog, uuids[2])[0]
    finally:
        nvml.unhang()
    await devices.wait_until(lambda: devices.unhealthy == set())
    assert nvml.blocked == 0 and node.limiter.total_tokens == 2
    assert "NVML returned from a health probe after" in caplog.text
    assert "is healthy again" in caplog.text


async def test_every_hung_gpu_is_found_in_one_round(nursery: trio.Nursery,
                                                    root: pathlib.Path) -> None:
    nvml = simulated("dgx-a100", root)
    node, devices = await start(nursery, nvml, root, call_timeout=0.2)
    uuids = {g.uuid for g in node.model.gpus}  # type: ignore[union-attr]
    nvml.hang()  # the whole driver wedged: each GPU's probe hangs in turn
    try:
        # Each hung GPU costs one timeout, then the round goes on with the next: eight
        # in about 1.6 s, not one per probe interval.
        await devices.wait_until(lambda: devices.unhealthy == uuids, timeout=2.0 + 8 * 0.2)
        assert nvml.blocked == 8
    finally:
        nvml.unhang()
    await devices.wait_until(lambda: devices.unhealthy == set())


async def test_stopping_never_waits_for_a_hung_call(root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    try:
        async with trio.open_nursery() as nursery:
            node, devices = await start(nursery, nvml, root, call_timeout=5.0)
            nvml.hang(1)
            with trio.fail_after(HANG_GUARD):
                while not nvml.blocked:  # a probe is in the hung call now
                    await trio.sleep(0.01)
            cancelled = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - cancelled < 1.0
        assert nvml.open_event_sets == 0 and nvml.freed_while_waiting == 0
    finally:
        nvml.unhang()


async def test_a_start_up_that_hangs_fails_with_what_hung(root: pathlib.Path) -> None:
    nvml = simulated("pcie-4", root)
    nvml.hang(3)
    try:
        node = NvmlNode(nvml, root=root, checks=HealthChecks(), call_timeout=0.3)
        with trio.fail_after(HANG_GUARD), pytest.raises(NvmlInitError) as caught:
            await node.run()
        assert "NVML start-up (init and discovery) has not returned within 0.3 s" in str(caught.value)
    finally:
        nvml.unhang()
    with trio.fail_after(HANG_GUARD):
        while nvml.init_count:  # the late session is shut down by the thread that opened it
            await trio.sleep(0.01)


async def test_a_hung_start_up_is_retried_only_once_it_returned(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = simulated("pcie-4", root)
    nvml.hang(0)
    node = NvmlNode(nvml, root=root, checks=HealthChecks(), fail_on_init_error=False,
                    call_timeout=0.2, retry_initial=0.05, retry_cap=0.2)
    started = trio.Event()

    async def run() -> None:
        await nursery.start(node.run)
        started.set()

    try:
        nursery.start_soon(run)
        await trio.sleep(1.5)
        assert not started.is_set()
        assert nvml.calls["nvmlInit"] == 1  # no second start-up piled on the hung one
        assert nvml.blocked == 1
        assert "has not returned within 0.2 s" in caplog.text
        assert "the last NVML start-up (init and discovery) has still not returned" in caplog.text
    finally:
        nvml.unhang()
    with trio.fail_after(HANG_GUARD):
        await started.wait()
    assert node.model is not None and len(node.model.gpus) == 4
    assert nvml.init_count == 1  # the live session; the late one was shut down


# --- cancellation ---------------------------------------------------------------------------

async def test_cancelling_the_event_task_is_prompt_and_frees_nvml(root: pathlib.Path) -> None:
    nvml = simulated("dgx-a100", root)
    node = NvmlNode(nvml, root=root, checks=HealthChecks())
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        with trio.fail_after(HANG_GUARD):
            while not nvml.waiting:
                await trio.sleep(0.01)
        cancelled = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - cancelled < 1.0
    assert nvml.open_event_sets == 0
    assert nvml.freed_while_waiting == 0
    assert nvml.init_count == 0


# --- allocate and the runtime ---------------------------------------------------------------

async def test_allocate_names_each_gpu_once_even_for_replicas(nursery: trio.Nursery,
                                                              root: pathlib.Path) -> None:
    nvml = simulated("dgx-a100", root)
    node = NvmlNode(nvml, root=root, checks=HealthChecks())
    await nursery.start(node.run)
    source = node.source(with_replicas(whole_gpus, 2))
    uuid = node.model.gpus[0].uuid  # type: ignore[union-attr]
    other = node.model.gpus[1].uuid  # type: ignore[union-attr]
    response = source.allocate([f"{uuid}::0", f"{uuid}::1", f"{other}::1"])
    assert response.envs == {"NVIDIA_VISIBLE_DEVICES": f"{uuid},{other}"}


async def test_an_injected_xid_reaches_the_kubelet(nursery: trio.Nursery, root: pathlib.Path,
                                                   fake_kubelet: FakeKubelet) -> None:
    nvml = simulated("dgx-a100", root)
    node = NvmlNode(nvml, root=root, checks=HealthChecks())
    await nursery.start(node.run)
    plugin = DevicePlugin([Resource(GPU, node.source(), "nvidia-gpu.sock")],
                          kubelet_socket=fake_kubelet.kubelet_socket)
    await nursery.start(plugin.run)
    view = fake_kubelet.resources[GPU]
    assert view.capacity == 8 and view.allocatable == 8
    assert view.topology[node.model.gpus[7].uuid] == [1]  # type: ignore[union-attr]
    nvml.xid(6, 79)
    await fake_kubelet.wait_until(lambda: fake_kubelet.resources[GPU].unhealthy
                                  == {node.model.gpus[6].uuid})  # type: ignore[union-attr]
    assert fake_kubelet.resources[GPU].allocatable == 7


def test_backoff_is_capped() -> None:
    from trio_gpu_plugin._nvml_source import RETRY_CAP, _backoff

    assert max(_backoff(n) for n in range(100)) <= RETRY_CAP
    assert not math.isnan(_backoff(10_000))


async def test_the_test_kit_nvml_node_fixture_serves_and_recovers(nvml_node: NvmlNode,
                                                                  nursery: trio.Nursery) -> None:
    recorder = Recorder()
    await nursery.start(nvml_node.source().run, recorder)
    nvml = nvml_node.nvml
    assert isinstance(nvml, SimulatedNVML)
    uuid = nvml_node.model.gpus[3].uuid  # type: ignore[union-attr]
    nvml.xid(3, 79)
    await recorder.wait_until(lambda: recorder.unhealthy == {uuid})
    await recorder.wait_until(lambda: recorder.unhealthy == set())  # 0.2 s window


def test_the_nvml_interface_names_only_real_pynvml_functions() -> None:
    from trio_gpu_plugin._nvml import NVML

    names = [n for n in vars(NVML) if n.startswith("nvml")]
    assert len(names) >= 35
    missing = [n for n in names if not callable(getattr(pynvml, n, None))]
    assert missing == []


async def test_nvml_that_flaps_backs_off_instead_of_flooding(
        nursery: trio.Nursery, root: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = simulated("pcie-4", root)
    node = NvmlNode(nvml, root=root, checks=HealthChecks(), retry_initial=0.02, retry_cap=0.32)
    await nursery.start(node.run)

    async def flap() -> None:
        while True:  # NVML starts, then fails at once, again and again
            with trio.fail_after(HANG_GUARD):
                while not nvml.waiting:
                    await trio.sleep(0.001)
            nvml.nvml_down()
            with trio.fail_after(HANG_GUARD):
                while nvml.waiting:  # the waiting thread has seen NVML fail
                    await trio.sleep(0.001)
            nvml.nvml_up()

    nursery.start_soon(flap)
    await trio.sleep(2.0)
    sessions = node.sessions
    # Delays 0.02, 0.04, ... doubling to 0.32 s (jittered by half at most): at most
    # ~log2(16) + 2 / 0.16 sessions in 2 s, where a reset back-off would allow ~100.
    assert 3 <= sessions <= 20, sessions
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) <= 3 * sessions + 8


async def test_a_gpu_falling_off_the_bus_never_takes_the_others_down(
        nursery: trio.Nursery, root: pathlib.Path) -> None:
    # NVML cannot name a lost GPU's handle any more; NVIDIA then marks every GPU of the
    # node Unhealthy. We know the handle from registration and mark that GPU only.
    nvml = simulated("dgx-a100", root)
    node, devices = await start(nursery, nvml, root, window=60)
    uuid = node.model.gpus[5].uuid  # type: ignore[union-attr]
    nvml.lose(5)
    await devices.wait_until(lambda: devices.unhealthy == {uuid})
    await trio.sleep(0.3)
    assert all({d.id for d in lst if not d.healthy} <= {uuid} for lst in devices.lists)
