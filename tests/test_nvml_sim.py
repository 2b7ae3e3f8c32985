"""The simulated NVML: pynvml's shapes and errors, presets, MIG as the driver lays it out,
events across threads, fault injection, node files and the fake driver root."""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import json
import math
import pathlib
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

import pynvml
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gpu_plugin._nvml import NO_INSTANCE, NVML, text
from trio_gpu_plugin._nvml_sim import (
    FAILABLE_CALLS,
    PRESETS,
    SimGpuSpec,
    SimNodeSpec,
    SimulatedNVML,
    load_node_file,
    node_from,
)
from trio_gpu_plugin._sim_models import DEFAULT_CI_PROFILES, MODELS

MiB = 1024 * 1024
GiB = 1024 * MiB
A100 = "NVIDIA A100-SXM4-40GB"
XID_AND_DBE = 0x8 | 0x2


@pytest.fixture
def opened() -> Iterator[list[SimulatedNVML]]:
    """Simulators the test opened; each must end with its references and sets released."""
    sims: list[SimulatedNVML] = []
    yield sims
    for sim in sims:
        assert sim.waiting == 0


def start(node: str | SimNodeSpec, sims: list[SimulatedNVML] | None = None,
          **kwargs: Any) -> SimulatedNVML:
    """An initialised simulator; privileged unless told otherwise, as go-nvlib's own
    queries (below) need, and as NVIDIA's plugin runs on MIG nodes."""
    kwargs.setdefault("privileged", True)
    sim = SimulatedNVML(node_from(node) if isinstance(node, str) else node, **kwargs)
    sim.nvmlInit()
    if sims is not None:
        sims.append(sim)
    return sim


def handles(sim: SimulatedNVML) -> list[Any]:
    return [sim.nvmlDeviceGetHandleByIndex(i) for i in range(sim.nvmlDeviceGetCount())]


def wait_in_thread(sim: SimulatedNVML, event_set: Any, timeout_ms: int) -> tuple[threading.Thread, list[Any]]:
    """Start a thread blocked in nvmlEventSetWait_v2; its result or exception lands in the
    list.  Returns once the thread is inside the wait."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(sim.nvmlEventSetWait_v2(event_set, timeout_ms))
        except pynvml.NVMLError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 2
    while sim.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sim.waiting >= 1
    return thread, outcome


# -- the protocol ----------------------------------------------------------------------


def test_every_nvml_protocol_method_exists_with_pynvmls_parameters() -> None:
    members = [name for name in vars(NVML) if name.startswith("nvml")]
    assert len(members) > 30
    for name in members:
        assert callable(getattr(SimulatedNVML, name, None)), name
        ours = list(inspect.signature(getattr(SimulatedNVML, name)).parameters)
        theirs = list(inspect.signature(getattr(NVML, name)).parameters)
        assert ours == theirs, name
        assert hasattr(pynvml, name), name  # and the real thing has it too


def test_calls_fail_uninitialized_and_init_is_reference_counted() -> None:
    sim = SimulatedNVML(PRESETS["single-t4"])
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        sim.nvmlDeviceGetCount()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        sim.nvmlShutdown()
    sim.nvmlInit()
    sim.nvmlInit()
    assert sim.init_count == 2
    sim.nvmlShutdown()
    assert sim.nvmlDeviceGetCount() == 1
    handle = sim.nvmlDeviceGetHandleByIndex(0)
    sim.nvmlShutdown()
    assert sim.init_count == 0
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        sim.nvmlDeviceGetUUID(handle)
    assert sim.calls["nvmlInit"] == 2 and sim.calls["nvmlDeviceGetCount"] == 2


@pytest.mark.parametrize(("code", "error"), [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVMLError_LibraryNotFound),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVMLError_DriverNotLoaded),
])
def test_init_error(code: int, error: type[Exception]) -> None:
    sim = SimulatedNVML(PRESETS["single-t4"], init_error=code)
    with pytest.raises(error):
        sim.nvmlInit()
    assert sim.init_count == 0
    sim.set_init_error(None)
    sim.nvmlInit()
    assert sim.init_count == 1
    sim.set_init_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        sim.nvmlInit()


# -- presets -----------------------------------------------------------------------------

EXPECTED_PRESETS = {
    # name: (count, model, MiB, compute capability, NUMA nodes)
    "dgx-a100": (8, A100, 40960, (8, 0), [0, 0, 0, 0, 1, 1, 1, 1]),
    "dgx-1": (8, "Tesla V100-SXM2-16GB", 16384, (7, 0), [0, 0, 0, 0, 1, 1, 1, 1]),
    "pcie-4": (4, "Tesla T4", 15360, (7, 5), [0, 0, 1, 1]),
    "a100-mig": (4, A100, 40960, (8, 0), [0, 0, 1, 1]),
    "dgx-h100": (8, "NVIDIA H100 80GB HBM3", 81559, (9, 0), [0, 0, 0, 0, 1, 1, 1, 1]),
    "single-t4": (1, "Tesla T4", 15360, (7, 5), [0]),
}


def test_the_presets_are_the_documented_ones() -> None:
    assert set(EXPECTED_PRESETS) <= set(PRESETS)
    # Specs are values: equal, hashable, and a caller's dict cannot change them later.
    links = {1: 2}
    spec = SimGpuSpec(nvlinks=links)
    links[1] = 9
    assert spec.nvlinks == {1: 2} and spec == SimGpuSpec(nvlinks={1: 2})
    assert len({PRESETS["dgx-1"], node_from("dgx-1"), PRESETS["pcie-4"]}) == 2


@pytest.mark.parametrize("preset", sorted(EXPECTED_PRESETS))
def test_preset_enumerates(preset: str, tmp_path: pathlib.Path) -> None:
    count, model, mib, cc, numa = EXPECTED_PRESETS[preset]
    sim = start(preset)
    assert sim.nvmlSystemGetDriverVersion() == "550.54.15"
    gpus = handles(sim)
    assert len(gpus) == count
    uuids = [sim.nvmlDeviceGetUUID(h) for h in gpus]
    assert len(set(uuids)) == count and all(u.startswith("GPU-") for u in uuids)
    # Stable: derived from the preset name and index (the same as _simulated's UUIDs).
    namespace = uuidlib.UUID("7f0c8a52-3f5e-4c1e-9a53-1b1f5f7e8a11")
    assert uuids == [f"GPU-{uuidlib.uuid5(namespace, f'{preset}/{i}')}" for i in range(count)]
    other = start(preset)
    assert uuids == [other.nvmlDeviceGetUUID(h) for h in handles(other)]
    buses = []
    for i, h in enumerate(gpus):
        assert sim.nvmlDeviceGetName(h) == model
        memory = sim.nvmlDeviceGetMemoryInfo(h)
        assert memory.total == mib * MiB and memory.free + memory.used == memory.total
        assert sim.nvmlDeviceGetCudaComputeCapability(h) == cc
        assert sim.nvmlDeviceGetMinorNumber(h) == i == sim.nvmlDeviceGetIndex(h)
        assert sim.nvmlDeviceIsMigDeviceHandle(h) == 0
        pci = sim.nvmlDeviceGetPciInfo(h)
        assert isinstance(pci.busId, bytes)  # a char array inside a structure
        bus = text(pci.busId)
        assert bus == f"{pci.domain:08X}:{pci.bus:02X}:{pci.device:02X}.0"
        buses.append(bus)
        assert sim.nvmlDeviceGetHandleByUUID(uuids[i]) is h
    assert len(set(buses)) == count
    sim.write_driver_root(tmp_path)
    for bus, node in zip(buses, numa):
        sysfs = tmp_path / "sys/bus/pci/devices" / bus[4:].lower() / "numa_node"
        assert sysfs.read_text() == f"{node}\n"


def test_dgx_a100_bus_ids_switches_and_numa() -> None:
    sim = start("dgx-a100")
    gpus = handles(sim)
    assert [text(sim.nvmlDeviceGetPciInfo(h).busId) for h in gpus] == [
        f"00000000:{b}:00.0" for b in ("07", "0F", "47", "4E", "87", "90", "B7", "BD")]
    level = sim.nvmlDeviceGetTopologyCommonAncestor
    assert level(gpus[0], gpus[1]) == level(gpus[6], gpus[7]) == pynvml.NVML_TOPOLOGY_SINGLE
    assert level(gpus[1], gpus[2]) == level(gpus[0], gpus[3]) == pynvml.NVML_TOPOLOGY_NODE
    assert level(gpus[0], gpus[4]) == level(gpus[3], gpus[7]) == pynvml.NVML_TOPOLOGY_SYSTEM
    assert level(gpus[2], gpus[2]) == pynvml.NVML_TOPOLOGY_INTERNAL
    pcie_sim = start("pcie-4")
    pcie = handles(pcie_sim)
    assert pcie_sim.nvmlDeviceGetTopologyCommonAncestor(pcie[0], pcie[1]) == 40
    assert pcie_sim.nvmlDeviceGetTopologyCommonAncestor(pcie[1], pcie[2]) == 50


def nvlink_peers(sim: SimulatedNVML, handle: Any) -> list[str]:
    """Remote bus IDs of active links, as discovery reads them: every link number NVML
    has, going on past the ones that answer an error (holes, and numbers past the part's
    own links)."""
    remotes = []
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            if sim.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED:
                remotes.append(text(sim.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId))
        except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_InvalidArgument):
            continue
    return remotes


def test_dgx1_nvlink_matrix_is_the_hybrid_cube_mesh() -> None:
    expected = {(0, 1): 1, (0, 2): 1, (0, 3): 2, (0, 4): 2, (1, 2): 2, (1, 3): 1, (1, 5): 2,
                (2, 3): 2, (2, 6): 1, (3, 7): 1, (4, 5): 1, (4, 6): 1, (4, 7): 2, (5, 6): 2,
                (5, 7): 1, (6, 7): 2}
    sim = start("dgx-1")
    gpus = handles(sim)
    by_bus = {text(sim.nvmlDeviceGetPciInfo(h).busId): i for i, h in enumerate(gpus)}
    found: dict[tuple[int, int], int] = {}
    for i, h in enumerate(gpus):
        remotes = nvlink_peers(sim, h)
        assert len(remotes) == 6
        for remote in remotes:
            found[(i, by_bus[remote])] = found.get((i, by_bus[remote]), 0) + 1
    assert found == expected | {(b, a): n for (a, b), n in expected.items()}
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetNvLinkState(gpus[0], pynvml.NVML_NVLINK_MAX_LINKS)
    # A V100 has 6 links: link number 6 is past them, not an inactive link.
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetNvLinkState(gpus[0], 6)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetNvLinkRemotePciInfo(gpus[0], 6)


@pytest.mark.parametrize(("preset", "links", "switches"), [("dgx-a100", 12, 6), ("dgx-h100", 18, 4)])
def test_nvswitch_links_end_at_switches_that_are_no_gpu(preset: str, links: int, switches: int) -> None:
    sim = start(preset)
    gpus = handles(sim)
    gpu_buses = {text(sim.nvmlDeviceGetPciInfo(h).busId) for h in gpus}
    seen: set[str] = set()
    for h in gpus:
        remotes = nvlink_peers(sim, h)
        assert len(remotes) == links
        seen.update(remotes)
    assert len(seen) == switches and not seen & gpu_buses


def test_gpus_without_nvlink_say_not_supported() -> None:
    sim = start("pcie-4")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        sim.nvmlDeviceGetNvLinkState(handles(sim)[0], 0)
    a100 = start("a100-mig")  # NVLink hardware with no link up: all inactive
    assert nvlink_peers(a100, handles(a100)[0]) == []
    assert a100.nvmlDeviceGetNvLinkState(handles(a100)[0], 11) == 0  # the A100's last link
    with pytest.raises(pynvml.NVMLError_NotSupported):
        a100.nvmlDeviceGetNvLinkRemotePciInfo(handles(a100)[0], 11)  # an inactive link


def test_asymmetric_nvlinks_are_representable() -> None:
    node = SimNodeSpec("asym", (SimGpuSpec(A100, nvlinks={1: 4}), SimGpuSpec(A100, nvlinks={0: 2})))
    sim = start(node)
    a, b = handles(sim)
    assert len(nvlink_peers(sim, a)) == 4 and len(nvlink_peers(sim, b)) == 2


# -- MIG ---------------------------------------------------------------------------------


def go_nvlib_profile(sim: SimulatedNVML, mig: Any) -> str:
    """A MIG device's profile name as NVIDIA's go-nvlib derives it."""
    parent = sim.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)
    total = sim.nvmlDeviceGetMemoryInfo(parent).total
    gi = sim.nvmlDeviceGetGpuInstanceById(parent, sim.nvmlDeviceGetGpuInstanceId(mig))
    gi_profile_id = sim.nvmlGpuInstanceGetInfo(gi).profileId
    ci = sim.nvmlGpuInstanceGetComputeInstanceById(gi, sim.nvmlDeviceGetComputeInstanceId(mig))
    ci_profile_id = sim.nvmlComputeInstanceGetInfo(ci).profileId
    gi_index, gi_info = None, None
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = sim.nvmlDeviceGetGpuInstanceProfileInfo(parent, index)
        except pynvml.NVMLError_NotSupported:
            continue
        if info.id == gi_profile_id:
            gi_index, gi_info = index, info
            break
    ci_info = None
    for index in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
        try:
            info = sim.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                gi, index, pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
        except pynvml.NVMLError_NotSupported:
            continue
        if info.id == ci_profile_id:
            ci_info = info
            break
    assert gi_info is not None and ci_info is not None
    # Go's math.Round rounds half away from zero (Python's round() halves to even).
    gb = math.floor(math.ceil(gi_info.memorySizeMB * MiB / total * 8) / 8 * math.ceil(total / GiB) + 0.5)
    me = "+me" if gi_index in (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1,
                               pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1) else ""
    g, c = gi_info.sliceCount, ci_info.sliceCount
    return (f"{g}g" if c == g else f"{c}c.{g}g") + f".{gb}gb{me}"


def mig_devices(sim: SimulatedNVML, parent: Any) -> list[Any]:
    found = []
    for slot in range(sim.nvmlDeviceGetMaxMigDeviceCount(parent)):
        try:
            found.append(sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot))
        except pynvml.NVMLError_NotFound:
            continue
    return found


def test_a100_mig_enumerates_like_the_driver() -> None:
    sim = start("a100-mig")
    expected = [("3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"), ("7g.40gb",), ("1g.5gb",) * 7,
                ("4g.20gb", "2g.10gb", "1g.5gb+me")]
    all_uuids = []
    for i, parent in enumerate(handles(sim)):
        assert sim.nvmlDeviceGetMigMode(parent) == [1, 1]
        assert sim.nvmlDeviceGetMaxMigDeviceCount(parent) == 7
        migs = mig_devices(sim, parent)
        assert len(migs) == len(expected[i])
        # Slots past the last device are empty (NOT_FOUND) up to the maximum, then invalid.
        if len(migs) < 7:
            with pytest.raises(pynvml.NVMLError_NotFound):
                sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, len(migs))
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, 7)
        assert tuple(go_nvlib_profile(sim, m) for m in migs) == expected[i]
        gi_ids = [sim.nvmlDeviceGetGpuInstanceId(m) for m in migs]
        assert len(set(gi_ids)) == len(gi_ids) and all(0 <= g <= 14 for g in gi_ids)
        assert all(sim.nvmlDeviceGetComputeInstanceId(m) == 0 for m in migs)
        for m in migs:
            mig_uuid = sim.nvmlDeviceGetUUID(m)
            all_uuids.append(mig_uuid)
            assert mig_uuid.startswith("MIG-")
            assert sim.nvmlDeviceIsMigDeviceHandle(m) == 1
            assert sim.nvmlDeviceGetHandleByUUID(mig_uuid) is m
            assert sim.nvmlDeviceGetUUID(sim.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(m)) == \
                sim.nvmlDeviceGetUUID(parent)
            attributes = sim.nvmlDeviceGetAttributes(m)
            assert sim.nvmlDeviceGetMemoryInfo(m).total == attributes.memorySizeMB * MiB
            assert sim.nvmlDeviceGetName(m).startswith(f"{A100} MIG ")
    assert len(set(all_uuids)) == len(all_uuids) == 15
    # The driver's GI IDs: 7g takes the whole GPU (0), 1g slices are eighths (7..13).
    gpus = handles(sim)
    assert [sim.nvmlDeviceGetGpuInstanceId(m) for m in mig_devices(sim, gpus[1])] == [0]
    assert [sim.nvmlDeviceGetGpuInstanceId(m) for m in mig_devices(sim, gpus[2])] == list(range(7, 14))
    # Stable across simulators.
    again = start("a100-mig")
    assert all_uuids == [again.nvmlDeviceGetUUID(m) for g in handles(again) for m in mig_devices(again, g)]


def test_mig_attributes_and_profile_tables() -> None:
    sim = start("a100-mig")
    parent = handles(sim)[0]
    three, two, one, _ = mig_devices(sim, parent)
    attributes = sim.nvmlDeviceGetAttributes(three)
    assert (attributes.gpuInstanceSliceCount, attributes.computeInstanceSliceCount,
            attributes.memorySizeMB, attributes.multiprocessorCount) == (3, 3, 19968, 42)
    table = {}
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = sim.nvmlDeviceGetGpuInstanceProfileInfo(parent, index)
        except pynvml.NVMLError_NotSupported:
            continue
        table[index] = (info.id, info.sliceCount, info.memorySizeMB, info.instanceCount)
    assert table == {0: (19, 1, 4864, 7), 7: (20, 1, 4864, 1), 9: (15, 1, 9856, 4),
                     1: (14, 2, 9856, 3), 2: (9, 3, 19968, 2), 3: (5, 4, 19968, 1),
                     4: (0, 7, 40192, 1)}
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetGpuInstanceProfileInfo(parent, pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT)
    gi = sim.nvmlDeviceGetGpuInstanceById(parent, sim.nvmlDeviceGetGpuInstanceId(two))
    assert sim.nvmlGpuInstanceGetInfo(gi).profileId == 14
    ci_sizes = {}
    for index in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
        try:
            info = sim.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, index, 0)
        except pynvml.NVMLError_NotSupported:
            continue
        ci_sizes[index] = info.sliceCount
    assert ci_sizes == {0: 1, 1: 2}  # nothing bigger than the 2-slice GI
    with pytest.raises(pynvml.NVMLError_NotFound):
        sim.nvmlDeviceGetGpuInstanceById(parent, 14)
    with pytest.raises(pynvml.NVMLError_NotFound):
        sim.nvmlGpuInstanceGetComputeInstanceById(gi, 1)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetGpuInstanceId(parent)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(parent)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        sim.nvmlDeviceGetPciInfo(one)  # GPU-only calls refuse MIG handles


def test_compute_instance_profiles_and_the_80gb_tables() -> None:
    node = SimNodeSpec("ci", (SimGpuSpec(A100, mig=("1c.2g.10gb", "2c.3g.20gb", "1g.10gb")),
                              SimGpuSpec("NVIDIA A100-SXM4-80GB", mig=("1g.10gb+me", "3g.40gb")),
                              SimGpuSpec("NVIDIA H100 80GB HBM3", mig=("1g.20gb", "4g.40gb"))))
    sim = start(node)
    names = [[go_nvlib_profile(sim, m) for m in mig_devices(sim, g)] for g in handles(sim)]
    assert names == [["1c.2g.10gb", "2c.3g.20gb", "1g.10gb"], ["1g.10gb+me", "3g.40gb"],
                     ["1g.20gb", "4g.40gb"]]
    attributes = sim.nvmlDeviceGetAttributes(mig_devices(sim, handles(sim)[0])[0])
    assert (attributes.gpuInstanceSliceCount, attributes.computeInstanceSliceCount) == (2, 1)


def test_mig_off_and_mig_less_gpus_answer_like_nvml() -> None:
    sim = start("dgx-a100")
    gpu = handles(sim)[0]
    assert sim.nvmlDeviceGetMigMode(gpu) == [0, 0]
    assert sim.nvmlDeviceGetMaxMigDeviceCount(gpu) == 0
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)
    t4 = start("single-t4")
    with pytest.raises(pynvml.NVMLError_NotSupported):
        t4.nvmlDeviceGetMigMode(handles(t4)[0])
    assert t4.nvmlDeviceGetMaxMigDeviceCount(handles(t4)[0]) == 0


@pytest.mark.parametrize(("mig", "model", "message"), [
    (("2g.5gb",), A100, "gpus[0].mig[0]: unknown MIG profile '2g.5gb'"),
    (("3g.20gb", "3g.20gb", "1g.5gb"), A100, "do not fit"),
    (("1g.5gb+me", "1g.5gb+me"), A100, "at most 1 × 1g.5gb+me"),
    (("3c.4g.20gb",), A100, "unknown MIG profile"),
    (("1g.5gb",), "Tesla T4", "gpus[0].mig: 'Tesla T4' has no MIG profile table"),
])
def test_impossible_mig_layouts_are_refused(mig: tuple[str, ...], model: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SimNodeSpec("bad", (SimGpuSpec(model, mig=mig),))
    assert message in str(info.value)
    if "unknown" in message:
        assert "1g.5gb, 1g.5gb+me" in str(info.value)  # the valid ones are listed


def test_creation_order_does_not_matter_for_fit() -> None:
    # A 3g first at slice 0 would strand a compute slice; the driver can place it at 4.
    SimNodeSpec("ok", (SimGpuSpec(A100, mig=("3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb")),))
    SimNodeSpec("ok", (SimGpuSpec(A100, mig=("4g.20gb", "3g.20gb")),))


# -- events ------------------------------------------------------------------------------


def test_injected_events_reach_registered_sets_in_order() -> None:
    sim = start("a100-mig")
    gpus = handles(sim)
    events = sim.nvmlEventSetCreate()
    assert sim.open_event_sets == 1
    sim.nvmlDeviceRegisterEvents(gpus[0], XID_AND_DBE, events)
    sim.xid(0, 48)
    sim.ecc_dbe("0")
    mig = mig_devices(sim, gpus[0])[1]
    sim.xid(sim.nvmlDeviceGetUUID(mig), 94)
    sim.xid(sim.nvmlDeviceGetUUID(gpus[0]), 31, gi=3, ci=0)
    got = [sim.nvmlEventSetWait_v2(events, 0) for _ in range(4)]
    assert [(e.eventType, e.eventData, e.gpuInstanceId, e.computeInstanceId) for e in got] == [
        (0x8, 48, NO_INSTANCE, NO_INSTANCE), (0x2, 0, NO_INSTANCE, NO_INSTANCE),
        (0x8, 94, sim.nvmlDeviceGetGpuInstanceId(mig), 0), (0x8, 31, 3, 0)]
    assert all(sim.nvmlDeviceGetUUID(e.device) == sim.nvmlDeviceGetUUID(gpus[0]) for e in got)
    sim.nvmlEventSetFree(events)
    assert sim.open_event_sets == 0


def test_unregistered_gpus_and_types_are_dropped() -> None:
    sim = start("dgx-a100")
    gpus = handles(sim)
    events = sim.nvmlEventSetCreate()
    sim.nvmlDeviceRegisterEvents(gpus[0], 0x8, events)
    sim.ecc_dbe(0)  # type not registered
    sim.xid(1, 43)  # GPU not registered
    with pytest.raises(pynvml.NVMLError_Timeout):
        sim.nvmlEventSetWait_v2(events, 0)
    assert sim.nvmlDeviceGetSupportedEventTypes(gpus[0]) == 0x400B
    with pytest.raises(pynvml.NVMLError_NotSupported):
        sim.nvmlDeviceRegisterEvents(gpus[0], 0x10, events)  # clock events: not supported
    sim.nvmlEventSetFree(events)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        sim.nvmlEventSetWait_v2(events, 0)


def test_mig_handles_cannot_register_events() -> None:
    sim = start("a100-mig")
    events = sim.nvmlEventSetCreate()
    with pytest.raises(pynvml.NVMLError_NotSupported):
        sim.nvmlDeviceRegisterEvents(mig_devices(sim, handles(sim)[1])[0], 0x8, events)
    sim.nvmlEventSetFree(events)


def test_wait_times_out_after_the_timeout() -> None:
    sim = start("single-t4")
    events = sim.nvmlEventSetCreate()
    began = time.monotonic()
    with pytest.raises(pynvml.NVMLError_Timeout):
        sim.nvmlEventSetWait_v2(events, 100)
    assert 0.09 <= time.monotonic() - began < 1
    sim.nvmlEventSetFree(events)


async def test_a_waiting_worker_thread_wakes_at_once_for_an_event(opened: list[SimulatedNVML]) -> None:
    sim = start("dgx-a100", opened)
    events = sim.nvmlEventSetCreate()
    sim.nvmlDeviceRegisterEvents(handles(sim)[3], 0x8, events)
    async with trio.open_nursery() as nursery:
        got: list[Any] = []

        async def wait() -> None:
            got.append(await trio.to_thread.run_sync(sim.nvmlEventSetWait_v2, events, 10_000))

        nursery.start_soon(wait)
        with trio.fail_after(2):
            while sim.waiting == 0:
                await trio.sleep(0.001)
        began = time.monotonic()
        sim.xid(3, 79)
        with trio.fail_after(2):
            while not got:
                await trio.sleep(0.001)
        assert time.monotonic() - began < 0.5
    assert got[0].eventData == 79
    sim.nvmlEventSetFree(events)


def test_freeing_a_set_a_thread_waits_on_is_detected() -> None:
    sim = start("single-t4")
    events = sim.nvmlEventSetCreate()
    thread, outcome = wait_in_thread(sim, events, 10_000)
    sim.nvmlEventSetFree(events)
    thread.join(2)
    assert sim.freed_while_waiting == 1
    assert isinstance(outcome[0], pynvml.NVMLError_Uninitialized)
    assert sim.open_event_sets == 0 and sim.waiting == 0


# -- faults ------------------------------------------------------------------------------


def test_a_hung_gpu_blocks_every_call_naming_it_until_unhung() -> None:
    sim = start("a100-mig")
    gpus = handles(sim)
    mig = mig_devices(sim, gpus[2])[0]
    gpu_uuid, mig_uuid = sim.nvmlDeviceGetUUID(gpus[2]), sim.nvmlDeviceGetUUID(mig)
    events = sim.nvmlEventSetCreate()
    sim.nvmlDeviceRegisterEvents(gpus[0], 0x8, events)
    sim.hang(gpu_uuid)
    calls = [lambda: sim.nvmlDeviceGetMemoryInfo(gpus[2]), lambda: sim.nvmlDeviceGetUUID(mig),
             lambda: sim.nvmlDeviceGetHandleByIndex(2),
             lambda: sim.nvmlDeviceGetHandleByUUID(gpu_uuid),
             lambda: sim.nvmlDeviceGetHandleByUUID(mig_uuid)]
    returned: list[object] = []
    threads = [threading.Thread(target=lambda c=c: returned.append(c()), daemon=True)
               for c in calls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while sim.blocked < len(calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.blocked == len(calls) and returned == []
    # Other GPUs, the library and event waits go on meanwhile.
    assert sim.nvmlDeviceGetUUID(gpus[1]) != gpu_uuid
    assert sim.nvmlDeviceGetCount() == len(gpus)
    sim.xid(0, 79)
    assert sim.nvmlEventSetWait_v2(events, 0).eventData == 79
    sim.unhang(2)
    for thread in threads:
        thread.join(5)
    assert sim.blocked == 0 and len(returned) == len(calls)
    sim.nvmlEventSetFree(events)


def test_a_lost_gpu_says_so_until_it_is_reset() -> None:
    sim = start("a100-mig")
    gpus = handles(sim)
    mig = mig_devices(sim, gpus[2])[0]
    gpu_uuid, mig_uuid = sim.nvmlDeviceGetUUID(gpus[2]), sim.nvmlDeviceGetUUID(mig)
    events = sim.nvmlEventSetCreate()
    sim.nvmlDeviceRegisterEvents(gpus[2], 0x8, events)
    sim.lose(gpu_uuid)
    event = sim.nvmlEventSetWait_v2(events, 0)
    assert (event.eventType, event.eventData) == (0x8, 79)
    for call in (lambda: sim.nvmlDeviceGetUUID(gpus[2]), lambda: sim.nvmlDeviceGetUUID(mig),
                 lambda: sim.nvmlDeviceGetHandleByIndex(2),
                 lambda: sim.nvmlDeviceGetHandleByUUID(gpu_uuid),
                 lambda: sim.nvmlDeviceGetHandleByUUID(mig_uuid),
                 lambda: sim.nvmlDeviceGetMemoryInfo(gpus[2])):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            call()
    assert sim.nvmlDeviceGetCount() == 4 and sim.nvmlDeviceGetUUID(gpus[1])
    assert sim.describe()[2]["lost"] is True
    sim.recover(2)
    assert sim.nvmlDeviceGetUUID(mig) == mig_uuid
    sim.nvmlEventSetFree(events)


def test_page_retirement_before_ampere_and_row_remapping_after() -> None:
    sim = start("dgx-1")  # V100: retires pages
    v100 = handles(sim)[1]
    assert sim.nvmlDeviceGetRetiredPagesPendingStatus(v100) == 0
    sim.ecc_dbe(1)
    assert sim.nvmlDeviceGetRetiredPagesPendingStatus(v100) == 1
    with pytest.raises(pynvml.NVMLError_NotSupported):
        sim.nvmlDeviceGetRemappedRows(v100)
    sim.recover(1)
    assert sim.nvmlDeviceGetRetiredPagesPendingStatus(v100) == 0
    sim.set_pending(1, retired_pages=True)
    assert sim.nvmlDeviceGetRetiredPagesPendingStatus(v100) == 1

    a100_sim = start("dgx-a100")  # A100: remaps rows
    a100 = handles(a100_sim)[0]
    assert a100_sim.nvmlDeviceGetRemappedRows(a100) == (0, 0, 0, 0)
    a100_sim.ecc_dbe(0)
    assert a100_sim.nvmlDeviceGetRemappedRows(a100) == (0, 1, 1, 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        a100_sim.nvmlDeviceGetRetiredPagesPendingStatus(a100)
    a100_sim.set_pending(0, row_remap=False)
    assert a100_sim.nvmlDeviceGetRemappedRows(a100)[2] == 0
    with pytest.raises(ValueError, match="remaps rows"):
        a100_sim.set_pending(0, retired_pages=True)


def test_nvml_down_fails_everything_and_wakes_waiters() -> None:
    sim = start("single-t4")
    events = sim.nvmlEventSetCreate()
    thread, outcome = wait_in_thread(sim, events, 10_000)
    began = time.monotonic()
    sim.nvml_down()
    thread.join(2)
    assert time.monotonic() - began < 0.5
    assert isinstance(outcome[0], pynvml.NVMLError_Unknown)
    with pytest.raises(pynvml.NVMLError_Unknown):
        sim.nvmlDeviceGetCount()
    with pytest.raises(pynvml.NVMLError_Unknown):
        sim.nvmlEventSetWait_v2(events, 0)
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        sim.nvmlInit()
    # Teardown still releases what it names, then reports the failure.
    with pytest.raises(pynvml.NVMLError_Unknown):
        sim.nvmlEventSetFree(events)
    with pytest.raises(pynvml.NVMLError_Unknown):
        sim.nvmlShutdown()
    assert (sim.open_event_sets, sim.init_count) == (0, 0)
    sim.nvml_up()
    sim.nvmlInit()
    assert sim.nvmlDeviceGetCount() == 1


def test_gpu_references_resolve_or_list_the_valid_ones() -> None:
    sim = SimulatedNVML(PRESETS["a100-mig"])
    described = sim.describe()
    assert [d["index"] for d in described] == [0, 1, 2, 3]
    assert described[3]["mig_profiles"] == ["4g.20gb", "2g.10gb", "1g.5gb+me"]
    assert sim.gpu_index(2) == sim.gpu_index("2") == sim.gpu_index(described[2]["uuid"]) == 2
    assert sim.gpu_index(described[1]["mig_uuids"][0]) == 1
    for bad in (4, "GPU-nope", "x", True):
        with pytest.raises(KeyError, match="0, 1, 2, 3"):
            sim.xid(bad, 13)


# -- node descriptions -------------------------------------------------------------------


def test_node_spec_validation_names_the_key() -> None:
    cases = [
        ((SimGpuSpec("Mystery GPU"),), "gpus[0].memory_mib: required for 'Mystery GPU'"),
        ((SimGpuSpec("Mystery GPU", memory_mib=1024),), "gpus[0].compute_capability"),
        ((SimGpuSpec(nvlinks={0: 2}),), "gpus[0].nvlinks[0]"),
        ((SimGpuSpec(nvlinks={3: 2}), SimGpuSpec()), "gpus[0].nvlinks[3]"),
        ((SimGpuSpec("Tesla T4", nvswitch_links=2),), "Tesla T4 has no NVLink"),
        ((SimGpuSpec(uuid="GPU-a"), SimGpuSpec(uuid="GPU-a")), "gpus[1].uuid"),
        ((SimGpuSpec(pci_bus_id="7:0.0"),), "gpus[0].pci_bus_id"),
        ((SimGpuSpec(minor=3), SimGpuSpec(minor=3)), "gpus[1].minor"),
        ((SimGpuSpec(numa_node=-2),), "gpus[0].numa_node"),
    ]
    for gpus, message in cases:
        with pytest.raises(ValueError) as info:
            SimNodeSpec("n", gpus)
        assert message in str(info.value), gpus
    custom = SimNodeSpec("n", (SimGpuSpec("Mystery GPU", memory_mib=1024, compute_capability=(8, 9)),))
    sim = start(custom)
    assert sim.nvmlDeviceGetCudaComputeCapability(handles(sim)[0]) == (8, 9)


GOOD_YAML = """\
driver_version: "535.104.05"
gpus:
  - model: NVIDIA A100-SXM4-40GB
    numa_node: 0
    nvlinks: {1: 12}
    mig: [3g.20gb, 2g.10gb]
    pci_bus_id: "00000000:07:00.0"
  - model: Tesla T4
    compute_capability: "7.5"
    numa_node: null
    pcie_switch: 1
"""


def test_yaml_node_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "lab-node.yaml"
    path.write_text(GOOD_YAML)
    node = load_node_file(path)
    assert node.name == "lab-node" and node.driver_version == "535.104.05"
    first, second = node.gpus
    assert (first.name, first.numa_node, dict(first.nvlinks), first.mig) == (
        A100, 0, {1: 12}, ("3g.20gb", "2g.10gb"))
    assert (second.name, second.compute_capability, second.numa_node, second.pcie_switch) == (
        "Tesla T4", (7, 5), None, 1)
    assert node_from(str(path)) == node


def test_json_node_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"name": "j", "gpus": [
        {"model": A100, "nvlinks": {"1": 2}, "numa_node": -1},
        {"model": "Mystery", "memory_mib": 2048, "compute_capability": [8, 6], "mig": None}]}))
    node = load_node_file(path)
    assert node.name == "j" and dict(node.gpus[0].nvlinks) == {1: 2}
    assert node.gpus[0].numa_node is None and node.gpus[1].compute_capability == (8, 6)


@pytest.mark.parametrize(("suffix", "content", "message"), [
    (".yaml", "gpus:\n  - model: Tesla T4\n    numa: 0\n", "gpus[0].numa: unknown key (did you mean 'numa_node'?)"),
    (".yaml", "gpus:\n  - {numa_node: 0}\n  - {numa_node: zero}\n", "gpus[1].numa_node: must be an integer >= -1 or null"),
    (".yaml", "gpus:\n  - pci_bus_id: 00000000:07:00.0\n", "gpus[0].pci_bus_id: must be a quoted string"),
    (".yaml", "gpus:\n  - compute_capability: eight\n", "gpus[0].compute_capability: must be \"major.minor\""),
    (".yaml", "gpus:\n  - nvlinks: {5: 1}\n", "gpus[0].nvlinks[5]: peer must be another GPU's index"),
    (".yaml", "gpus:\n  - mig: [3g.20gb, 9g.99gb]\n", "gpus[0].mig[1]: unknown MIG profile '9g.99gb'"),
    (".yaml", "gpus:\n  - model: Mystery\n", "gpus[0].memory_mib: required for 'Mystery'"),
    (".yaml", "name: x\n", "gpus: missing"),
    (".yaml", "gpus: {a: 1}\n", "gpus: must be a list"),
    (".yaml", "", "empty"),
    (".yaml", "gpus: [\n  - oops", "not valid YAML"),
    (".yaml", "drivers: 1\ngpus: []\n", "drivers: unknown key"),
    (".yaml", "driver_version: 550.54\ngpus: []\n", "driver_version: must be a string"),
    (".json", '{"gpus": [{"numa_node": 0,}]}', "not valid JSON: Expecting property name"),
    (".yaml", '{"gpus": [\n\t{"numa_node": 0}\n], }', "not valid JSON"),
    (".json", '{"gpus": [{"mig": "1g.5gb"}]}', "gpus[0].mig: must be a list"),
])
def test_bad_node_files_name_the_file_and_key(tmp_path: pathlib.Path, suffix: str, content: str,
                                              message: str) -> None:
    path = tmp_path / f"node{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        load_node_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_tabbed_json_yaml_rejects_is_still_read(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "tabs.yaml"
    path.write_text('{\n\t"gpus": [\n\t\t{"numa_node": 1}\n\t]\n}\n')
    assert load_node_file(path).gpus[0].numa_node == 1


def test_node_from_lists_presets_for_anything_else(tmp_path: pathlib.Path) -> None:
    assert node_from("dgx-1") is PRESETS["dgx-1"]
    with pytest.raises(ValueError, match="dgx-a100, dgx-1") as info:
        node_from(str(tmp_path / "missing.yaml"))
    assert "missing.yaml" in str(info.value)


# -- driver root -------------------------------------------------------------------------


def test_driver_root_layout(tmp_path: pathlib.Path) -> None:
    sim = SimulatedNVML(PRESETS["a100-mig"])
    sim.write_driver_root(tmp_path)
    dev = tmp_path / "dev"
    for name in ("nvidia0", "nvidia3", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"):
        assert (dev / name).is_file() and (dev / name).read_bytes() == b""
    assert not (dev / "nvidia4").exists()
    assert (tmp_path / "sys/bus/pci/devices/0000:87:00.0/numa_node").read_text() == "1\n"
    lines = (tmp_path / "proc/driver/nvidia-caps/mig-minors").read_text().splitlines()
    assert lines[:5] == ["config 1", "monitor 2", "gpu0/gi0/access 3", "gpu0/gi0/ci0/access 4",
                         "gpu0/gi0/ci1/access 5"]
    assert lines[11] == "gpu0/gi1/access 12"
    assert len(lines) == 2 + 4 * 15 * 9
    minors = dict(line.rsplit(" ", 1) for line in lines)
    assert list(map(int, minors.values())) == list(range(1, len(lines) + 1))
    caps = {p.name for p in (dev / "nvidia-caps").iterdir()}
    expected = {"nvidia-cap1", "nvidia-cap2"}
    for described in sim.describe():
        g = described["minor"]
        for mig_uuid in described["mig_uuids"]:
            sim.nvmlInit()
            mig = sim.nvmlDeviceGetHandleByUUID(mig_uuid)
            gi, ci = sim.nvmlDeviceGetGpuInstanceId(mig), sim.nvmlDeviceGetComputeInstanceId(mig)
            sim.nvmlShutdown()
            expected.add(f"nvidia-cap{minors[f'gpu{g}/gi{gi}/access']}")
            expected.add(f"nvidia-cap{minors[f'gpu{g}/gi{gi}/ci{ci}/access']}")
    assert caps == expected


def test_unknown_numa_is_minus_one_and_bus_ids_are_generated(tmp_path: pathlib.Path) -> None:
    sim = SimulatedNVML(SimNodeSpec("n", (SimGpuSpec("Tesla T4"), SimGpuSpec("Tesla T4", minor=7))))
    sim.write_driver_root(tmp_path)
    files = sorted((tmp_path / "sys/bus/pci/devices").glob("*/numa_node"))
    assert [f.read_text() for f in files] == ["-1\n", "-1\n"]
    assert (tmp_path / "dev/nvidia7").is_file()
    assert not (tmp_path / "proc/driver/nvidia-caps").exists()  # no MIG, no caps


# -- what real nodes do (issue 13) ---------------------------------------------------------


def test_without_privilege_a_mig_parent_refuses_its_aggregate_and_instances() -> None:
    sim = start("a100-mig", privileged=False)
    parent = sim.nvmlDeviceGetHandleByIndex(0)
    mig = sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        sim.nvmlDeviceGetMemoryInfo(parent)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        sim.nvmlDeviceGetGpuInstanceById(parent, sim.nvmlDeviceGetGpuInstanceId(mig))
    # What needs no privilege still answers: the slice's own memory, attributes, profiles.
    assert sim.nvmlDeviceGetMemoryInfo(mig).total == 19968 * 2**20
    assert sim.nvmlDeviceGetAttributes(mig).memorySizeMB == 19968
    assert sim.nvmlDeviceGetGpuInstanceProfileInfo(parent, 0).name == "MIG 1g.5gb"
    sim.set_privileged(True)
    assert sim.nvmlDeviceGetMemoryInfo(parent).total == 40960 * 2**20
    # A GPU without MIG answers anyone.
    t4 = start("single-t4", privileged=False)
    assert t4.nvmlDeviceGetMemoryInfo(t4.nvmlDeviceGetHandleByIndex(0)).total > 0


def test_a_wait_on_a_set_with_a_lost_gpu_fails_after_the_xid() -> None:
    sim = start("pcie-4")
    events = sim.nvmlEventSetCreate()
    for h in handles(sim):
        sim.nvmlDeviceRegisterEvents(h, 0x8, events)
    sim.lose(1)
    assert sim.nvmlEventSetWait_v2(events, 0).eventData == 79
    for _ in range(3):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            sim.nvmlEventSetWait_v2(events, 1000)  # at once, not after the timeout
    sim.recover(1)
    with pytest.raises(pynvml.NVMLError_Timeout):
        sim.nvmlEventSetWait_v2(events, 0)
    sim.nvmlEventSetFree(events)


def test_injected_call_failures_name_the_call_and_undo() -> None:
    sim = start("pcie-4")
    sim.fail(2, ["nvmlDeviceGetMinorNumber"], pynvml.NVML_ERROR_GPU_IS_LOST)
    gpu = sim.nvmlDeviceGetHandleByIndex(2)
    assert sim.nvmlDeviceGetUUID(gpu).startswith("GPU-")  # the rest answers
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        sim.nvmlDeviceGetMinorNumber(gpu)
    assert sim.nvmlDeviceGetMinorNumber(sim.nvmlDeviceGetHandleByIndex(1)) == 1
    sim.unfail(2)
    assert sim.nvmlDeviceGetMinorNumber(gpu) == 2
    with pytest.raises(ValueError, match="nvmlDeviceGetMinor"):
        sim.fail(2, ["nvmlDeviceGetMinor"], pynvml.NVML_ERROR_UNKNOWN)


def test_unsupported_link_numbers_come_before_the_active_ones() -> None:
    node = SimNodeSpec("holes", (SimGpuSpec(nvlinks={1: 2}, nvlink_unsupported=(0, 3)),
                                 SimGpuSpec(nvlinks={0: 2})))
    sim = start(node)
    a, b = handles(sim)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        sim.nvmlDeviceGetNvLinkState(a, 0)
    assert [sim.nvmlDeviceGetNvLinkState(a, n) for n in (1, 2, 4)] == [1, 1, 0]
    with pytest.raises(pynvml.NVMLError_NotSupported):
        sim.nvmlDeviceGetNvLinkState(a, 3)
    peer = sim.nvmlDeviceGetPciInfo(b).busId
    assert sim.nvmlDeviceGetNvLinkRemotePciInfo(a, 2).busId == peer
    with pytest.raises(ValueError, match="nvlink_unsupported"):
        SimNodeSpec("bad", (SimGpuSpec(nvlink_unsupported=(0, 0)),))


def test_the_recovery_action_field_is_a_value_or_not_supported() -> None:
    field = pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION
    old = start("single-t4")
    [value] = old.nvmlDeviceGetFieldValues(old.nvmlDeviceGetHandleByIndex(0), [field])
    assert value.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    node = SimNodeSpec("new", (SimGpuSpec("Tesla T4", recovery_action=0),))
    sim = start(node)
    gpu = sim.nvmlDeviceGetHandleByIndex(0)
    assert sim.nvmlDeviceGetSupportedEventTypes(gpu) & 0x8000
    events = sim.nvmlEventSetCreate()
    sim.nvmlDeviceRegisterEvents(gpu, 0x8 | 0x8000, events)
    sim.xid(0, 79, recovery_action=pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET)
    assert [sim.nvmlEventSetWait_v2(events, 0).eventType for _ in range(2)] == [0x8000, 0x8]
    [value, other] = sim.nvmlDeviceGetFieldValues(gpu, [(field, 0), 1])
    assert (value.nvmlReturn, value.value.uiVal) == (0, pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET)
    assert other.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    sim.recover(0)  # a reset: the driver asks for nothing any more
    assert sim.nvmlDeviceGetFieldValues(gpu, [field])[0].value.uiVal == 0
    sim.lose(0)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        sim.nvmlDeviceGetFieldValues(gpu, [field])
    sim.nvmlEventSetFree(events)


def test_a_failed_row_remap_outlives_a_reset_and_volatile_ecc_counts_do_not() -> None:
    sim = start("dgx-a100")
    gpu = sim.nvmlDeviceGetHandleByIndex(3)
    unc, vol, agg = (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC,
                     pynvml.NVML_AGGREGATE_ECC)
    sim.ecc_dbe(3)
    sim.add_ecc_errors(3, 4)
    sim.set_pending(3, row_remap_failed=True)
    assert sim.nvmlDeviceGetRemappedRows(gpu) == (0, 1, 1, 1)
    assert sim.nvmlDeviceGetTotalEccErrors(gpu, unc, vol) == 5
    sim.recover(3)
    assert sim.nvmlDeviceGetRemappedRows(gpu) == (0, 1, 0, 1)
    assert sim.nvmlDeviceGetTotalEccErrors(gpu, unc, vol) == 0
    assert sim.nvmlDeviceGetTotalEccErrors(gpu, unc, agg) == 5
    assert sim.nvmlDeviceGetTotalEccErrors(gpu, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, agg) == 0


def test_tearing_nvml_down_under_a_hung_call_is_counted() -> None:
    sim = start("pcie-4")
    gpu = sim.nvmlDeviceGetHandleByIndex(0)
    sim.hang(0)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            sim.nvmlDeviceGetMemoryInfo(gpu)
        except pynvml.NVMLError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not sim.blocked and time.monotonic() < deadline:
        time.sleep(0.01)
    sim.nvmlShutdown()
    assert sim.shutdown_under_live_call == 1
    sim.unhang(0)
    thread.join(5)
    assert [type(e) for e in errors] == [pynvml.NVMLError_Uninitialized]


def test_an_a30_splits_in_four_as_the_driver_numbers_it() -> None:
    node = SimNodeSpec("a30", (SimGpuSpec("NVIDIA A30", mig=("2g.12gb", "1g.6gb", "1g.6gb")),))
    sim = start(node)
    gpu = sim.nvmlDeviceGetHandleByIndex(0)
    assert sim.nvmlDeviceGetMaxMigDeviceCount(gpu) == 4
    migs = [sim.nvmlDeviceGetMigDeviceHandleByIndex(gpu, i) for i in range(3)]
    # Swizzle IDs over 4 memory slices: 0 all, 1-2 halves, 3-6 quarters.
    assert sorted(sim.nvmlDeviceGetGpuInstanceId(m) for m in migs) == [1, 5, 6]
    with pytest.raises(ValueError, match="4 compute slices, 4 memory slices"):
        SimNodeSpec("too-much", (SimGpuSpec("NVIDIA A30", mig=("4g.24gb", "1g.6gb")),))


def test_the_a30_readings_layout_gets_the_readings_ids() -> None:
    # A real A30's ``nvidia-smi mig -lgi``: 1g GIs at slices 0 and 1 got IDs 3 and 4, a 2g
    # at slice 2 got ID 2 (see _sim_models.GpuModel).
    node = SimNodeSpec("a30", (SimGpuSpec("NVIDIA A30", mig=("1g.6gb", "1g.6gb", "2g.12gb")),))
    sim = start(node)
    parent = sim.nvmlDeviceGetHandleByIndex(0)
    migs = mig_devices(sim, parent)
    assert [sim.nvmlDeviceGetGpuInstanceId(m) for m in migs] == [3, 4, 2]
    starts = [sim.nvmlGpuInstanceGetInfo(sim.nvmlDeviceGetGpuInstanceById(
        parent, sim.nvmlDeviceGetGpuInstanceId(m))).placement.start for m in migs]
    assert starts == [0, 1, 2]
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, 4)  # 4 slots on an A30, not 7
    with pytest.raises(pynvml.NVMLError_NotFound):
        sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, 3)
    info = sim.nvmlDeviceGetGpuInstanceProfileInfo(parent, pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1)
    assert (info.name, info.id, info.memorySizeMB) == ("MIG 2g.12gb+me", 6, 11968)
    with pytest.raises(pynvml.NVMLError_NotSupported):  # an A30 has no 3g or 7g
        sim.nvmlDeviceGetGpuInstanceProfileInfo(parent, pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE)


@pytest.mark.parametrize(("model", "layout", "ids", "names"), [
    ("NVIDIA H200", ("3g.71gb", "2g.35gb", "1g.18gb", "1g.18gb"), [2, 3, 9, 10],
     ["3g.71gb", "2g.35gb", "1g.18gb", "1g.18gb"]),
    ("NVIDIA H200", ("1g.18gb",) * 7, list(range(7, 14)), ["1g.18gb"] * 7),
    ("NVIDIA B200", ("4g.90gb", "3g.90gb"), [1, 2], ["4g.90gb", "3g.90gb"]),
    ("NVIDIA B200", ("7g.180gb",), [0], ["7g.180gb"]),
    ("NVIDIA B200", ("1g.45gb", "1c.2g.45gb"), [3, 4], ["1g.45gb", "1c.2g.45gb"]),
])
def test_h200_and_b200_mig_nodes_simulate_as_their_tables_say(
        model: str, layout: tuple[str, ...], ids: list[int], names: list[str]) -> None:
    sim = start(SimNodeSpec("mig", (SimGpuSpec(model, mig=layout),)))
    parent = sim.nvmlDeviceGetHandleByIndex(0)
    assert sim.nvmlDeviceGetMaxMigDeviceCount(parent) == 7
    migs = mig_devices(sim, parent)
    assert [sim.nvmlDeviceGetGpuInstanceId(m) for m in migs] == ids
    assert [sim.nvmlDeviceGetName(m) for m in migs] == [f"{model} MIG {n}" for n in names]
    # Every GI profile answers with NVML's own name, as ``nvidia-smi mig -lgip`` prints it.
    table = MODELS[model].mig
    for profile in table:
        info = sim.nvmlDeviceGetGpuInstanceProfileInfo(parent, profile.index)
        assert (info.name, info.id, info.sliceCount, info.memorySizeMB, info.instanceCount) == (
            f"MIG {profile.name}", profile.id, profile.slices, profile.memory_mb, profile.instances)
    # go-nvlib's naming from the profile info agrees with the layout's names.
    assert [go_nvlib_profile(sim, m) for m in migs] == names


def test_ci_profiles_are_the_parts_own() -> None:
    sim = start(SimNodeSpec("ci", (SimGpuSpec(A100, mig=("7g.40gb",)),)))
    parent = sim.nvmlDeviceGetHandleByIndex(0)
    [mig] = mig_devices(sim, parent)
    gi = sim.nvmlDeviceGetGpuInstanceById(parent, sim.nvmlDeviceGetGpuInstanceId(mig))
    offered = {}
    for index in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
        try:
            info = sim.nvmlGpuInstanceGetComputeInstanceProfileInfo(gi, index, 0)
        except pynvml.NVMLError_NotSupported:
            continue
        offered[index] = (info.sliceCount, info.name)
    # 1_SLICE_REV1 (7) and 7_SLICE_NVL (8) are not the A100's; 3 slices in a 7-slice GI are.
    assert offered == {0: (1, "MIG 1c.7g.40gb"), 1: (2, "MIG 2c.7g.40gb"),
                       2: (3, "MIG 3c.7g.40gb"), 3: (4, "MIG 4c.7g.40gb"), 4: (7, "MIG 7g.40gb")}
    ci = sim.nvmlGpuInstanceGetComputeInstanceById(gi, 0)
    assert sim.nvmlComputeInstanceGetInfo(ci).profileId == pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE


def test_a_part_offering_a_revised_ci_profile_offers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    base = MODELS[A100]
    part = dataclasses.replace(base, ci_profiles=(*DEFAULT_CI_PROFILES, 7))
    monkeypatch.setitem(MODELS, "Test GPU", part)
    sim = start(SimNodeSpec("rev", (SimGpuSpec("Test GPU", mig=("1g.5gb",)),)))
    parent = sim.nvmlDeviceGetHandleByIndex(0)
    [mig] = mig_devices(sim, parent)
    gi = sim.nvmlDeviceGetGpuInstanceById(parent, sim.nvmlDeviceGetGpuInstanceId(mig))
    rev1 = sim.nvmlGpuInstanceGetComputeInstanceProfileInfo(
        gi, pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE_REV1, 0)
    assert (rev1.id, rev1.sliceCount) == (7, 1)
    # The CI itself is the plain 1-slice profile: the first the part offers.
    ci = sim.nvmlGpuInstanceGetComputeInstanceById(gi, 0)
    assert sim.nvmlComputeInstanceGetInfo(ci).profileId == 0


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_layout_that_fits_gets_distinct_swizzle_ids(data: st.DataObject) -> None:
    model_name = data.draw(st.sampled_from([n for n, m in MODELS.items() if m.mig]))
    model = MODELS[model_name]
    layout = data.draw(st.lists(st.sampled_from([p.name for p in model.mig]), max_size=8))
    try:
        node = SimNodeSpec("h", (SimGpuSpec(model_name, mig=tuple(layout)),))
    except ValueError:
        return  # does not fit: refused, as the driver would
    sim = start(node)
    parent = sim.nvmlDeviceGetHandleByIndex(0)
    assert sim.nvmlDeviceGetMaxMigDeviceCount(parent) == model.compute_slices
    used_compute = used_memory = 0
    seen = set()
    for mig in mig_devices(sim, parent):
        gi_id = sim.nvmlDeviceGetGpuInstanceId(mig)
        info = sim.nvmlGpuInstanceGetInfo(sim.nvmlDeviceGetGpuInstanceById(parent, gi_id))
        start_, size = info.placement.start, info.placement.size
        slices = sim.nvmlDeviceGetAttributes(mig).gpuInstanceSliceCount
        # Aligned to its size, inside the part, and the swizzle ID is the slot's.
        assert start_ % size == 0 and start_ + slices <= model.compute_slices
        assert gi_id == model.memory_slices // size - 1 + start_ // size
        compute, memory = ((1 << slices) - 1) << start_, ((1 << size) - 1) << start_
        assert not (compute & used_compute or memory & used_memory)
        used_compute, used_memory = used_compute | compute, used_memory | memory
        seen.add(gi_id)
    assert len(seen) == len(layout)


def test_gpu_and_compute_instance_lists_need_privilege_too() -> None:
    sim = start("a100-mig", privileged=False)
    parent = sim.nvmlDeviceGetHandleByIndex(2)  # seven 1g.5gb
    count = ctypes.c_uint(0)
    found: list[Any] = [None] * 7
    with pytest.raises(pynvml.NVMLError_NoPermission):
        sim.nvmlDeviceGetGpuInstances(parent, 19, found, ctypes.byref(count))
    assert count.value == 0 and found == [None] * 7  # nothing written
    sim.set_privileged(True)
    assert sim.nvmlDeviceGetGpuInstances(parent, 19, found, ctypes.byref(count)) == 0
    assert count.value == 7
    assert sorted(sim.nvmlGpuInstanceGetInfo(g).id for g in found) == list(range(7, 14))
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetGpuInstances(parent, 19, [None] * 6, count)  # too small a buffer
    assert sim.nvmlDeviceGetGpuInstances(parent, 0, found, count) == 0 and count.value == 0
    cis: list[Any] = [None]
    assert sim.nvmlGpuInstanceGetComputeInstances(found[0], 0, cis, count) == 0
    assert count.value == 1 and sim.nvmlComputeInstanceGetInfo(cis[0]).id == 0
    sim.set_privileged(False)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        sim.nvmlGpuInstanceGetComputeInstances(found[0], 0, cis, count)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        sim.nvmlGpuInstanceGetComputeInstanceById(found[0], 0)
    # Without privilege the rest still answers: slots, UUIDs, names, GI/CI IDs, profiles.
    mig = sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)
    assert sim.nvmlDeviceGetUUID(mig).startswith("MIG-")
    assert sim.nvmlDeviceGetName(mig) == f"{A100} MIG 1g.5gb"
    assert (sim.nvmlDeviceGetGpuInstanceId(mig), sim.nvmlDeviceGetComputeInstanceId(mig)) == (7, 0)
    assert sim.nvmlGpuInstanceGetComputeInstanceProfileInfo(found[0], 0, 0).sliceCount == 1


def test_privilege_is_the_nodes_unless_the_constructor_says(tmp_path: pathlib.Path) -> None:
    assert SimulatedNVML(PRESETS["a100-mig"]).privileged is False  # the default
    path = tmp_path / "root.yaml"
    path.write_text("privileged: true\ngpus:\n  - model: NVIDIA A100-SXM4-40GB\n    mig: [7g.40gb]\n")
    node = load_node_file(path)
    assert node.privileged is True
    sim = SimulatedNVML(node)
    sim.nvmlInit()
    assert sim.privileged
    assert sim.nvmlDeviceGetMemoryInfo(sim.nvmlDeviceGetHandleByIndex(0)).total == 40960 * MiB
    assert SimulatedNVML(node, privileged=False).privileged is False
    path.write_text("privileged: yes please\ngpus: []\n")
    with pytest.raises(ValueError, match="privileged: must be true or false"):
        load_node_file(path)


def test_link_numbers_stop_at_the_parts_own() -> None:
    sim = start(SimNodeSpec("links", (SimGpuSpec(A100, nvlinks={1: 10}, nvlink_unsupported=(0, 1)),
                                      SimGpuSpec(A100, nvlinks={0: 10}))))
    a = sim.nvmlDeviceGetHandleByIndex(0)
    assert [sim.nvmlDeviceGetNvLinkState(a, n) for n in range(2, 12)] == [1] * 10
    for link in (12, pynvml.NVML_NVLINK_MAX_LINKS - 1):  # an A100 has 12 links
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            sim.nvmlDeviceGetNvLinkState(a, link)
    assert len(nvlink_peers(sim, a)) == 10
    for holes, message in [((0, 1, 2), "10 active links do not fit beside 3"),
                           ((12,), "0..11"), ((-1,), "0..11")]:
        with pytest.raises(ValueError, match=message):
            SimNodeSpec("bad", (SimGpuSpec(A100, nvlinks={1: 10}, nvlink_unsupported=holes),
                                SimGpuSpec(A100)))
    with pytest.raises(ValueError, match="has no NVLink"):
        SimNodeSpec("bad", (SimGpuSpec("Tesla T4", nvlink_unsupported=(0,)),))


def test_injected_failures_cover_mig_devices_and_instances() -> None:
    sim = start("a100-mig")
    parent = sim.nvmlDeviceGetHandleByIndex(0)
    mig = sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)
    gi = sim.nvmlDeviceGetGpuInstanceById(parent, sim.nvmlDeviceGetGpuInstanceId(mig))
    sim.fail(sim.nvmlDeviceGetUUID(mig), ["nvmlDeviceGetUUID", "nvmlGpuInstanceGetInfo"],
             pynvml.NVML_ERROR_UNKNOWN)  # a MIG UUID names its parent GPU
    for call in (lambda: sim.nvmlDeviceGetUUID(parent), lambda: sim.nvmlDeviceGetUUID(mig),
                 lambda: sim.nvmlGpuInstanceGetInfo(gi)):
        with pytest.raises(pynvml.NVMLError_Unknown):
            call()
    assert sim.nvmlDeviceGetName(mig).endswith("MIG 3g.20gb")
    sim.fail(0, "nvmlDeviceGetName", pynvml.NVML_ERROR_GPU_IS_LOST)  # adds up
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        sim.nvmlDeviceGetName(mig)
    with pytest.raises(pynvml.NVMLError_Unknown):
        sim.nvmlDeviceGetUUID(mig)
    sim.unfail(0)
    assert sim.nvmlDeviceGetUUID(parent).startswith("GPU-")
    assert "nvmlInit" not in FAILABLE_CALLS and "nvmlDeviceGetMinorNumber" in FAILABLE_CALLS
    for calls, code, message in [(["nvmlInit"], 1, "valid: nvmlComputeInstanceGetInfo"),
                                 ([], 1, "none given"),
                                 (["nvmlDeviceGetName"], 0, "NVML_ERROR_"),
                                 (["nvmlDeviceGetName"], True, "NVML_ERROR_")]:
        with pytest.raises(ValueError, match=message):
            sim.fail(0, calls, code)
    with pytest.raises(KeyError):
        sim.fail(9, ["nvmlDeviceGetName"], 1)


def test_the_recovery_action_field_comes_and_goes_with_its_event_type() -> None:
    field = pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION
    sim = start("pcie-4")
    gpu = sim.nvmlDeviceGetHandleByIndex(0)
    assert not sim.nvmlDeviceGetSupportedEventTypes(gpu) & 0x8000  # not reported: no event
    with pytest.raises(pynvml.NVMLError_NotSupported):
        sim.nvmlDeviceRegisterEvents(gpu, 0x8000, sim.nvmlEventSetCreate())
    sim.set_recovery_action(0, pynvml.NVML_GPU_RECOVERY_ACTION_NONE)
    assert sim.nvmlDeviceGetSupportedEventTypes(gpu) & 0x8000
    events = sim.nvmlEventSetCreate()
    sim.nvmlDeviceRegisterEvents(gpu, 0x8000, events)
    sim.set_recovery_action(0, pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT)
    sim.set_recovery_action(0, pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT)  # no change: no event
    event = sim.nvmlEventSetWait_v2(events, 0)
    assert (event.eventType, event.eventData, event.gpuInstanceId) == (0x8000, 2, NO_INSTANCE)
    with pytest.raises(pynvml.NVMLError_Timeout):
        sim.nvmlEventSetWait_v2(events, 0)
    [value] = sim.nvmlDeviceGetFieldValues(gpu, [field])
    assert (value.fieldId, value.scopeId, value.valueType, value.nvmlReturn) == (
        field, 0, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, pynvml.NVML_SUCCESS)
    assert value.value.uiVal == value.value.ullVal == 2
    sim.set_recovery_action(0, None)  # a driver that stops reporting it
    assert not sim.nvmlDeviceGetSupportedEventTypes(gpu) & 0x8000
    assert sim.nvmlDeviceGetFieldValues(gpu, [field])[0].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(pynvml.NVMLError_Timeout):
        sim.nvmlEventSetWait_v2(events, 0)
    sim.recover(0)  # a reset leaves an unsupported field unsupported
    assert sim.nvmlDeviceGetFieldValues(gpu, [field])[0].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    with pytest.raises(ValueError):
        sim.set_recovery_action(0, -1)


def test_ecc_counters_by_type_and_a_remap_failure_cleared_only_by_hand() -> None:
    sim = start("dgx-a100")
    gpu = sim.nvmlDeviceGetHandleByIndex(0)
    cor, unc = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    vol, agg = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC
    sim.add_ecc_errors(0, 3, corrected=True)
    counts = {(e, c): sim.nvmlDeviceGetTotalEccErrors(gpu, e, c) for e in (cor, unc) for c in (vol, agg)}
    assert counts == {(cor, vol): 3, (cor, agg): 3, (unc, vol): 0, (unc, agg): 0}
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetTotalEccErrors(gpu, 7, vol)
    with pytest.raises(ValueError):
        sim.add_ecc_errors(0, -1)
    sim.set_pending(0, row_remap_failed=True)
    for _ in range(2):
        sim.recover(0)
        assert sim.nvmlDeviceGetRemappedRows(gpu)[3] == 1
    sim.set_pending(0, row_remap_failed=False)  # the GPU serviced or replaced
    assert sim.nvmlDeviceGetRemappedRows(gpu)[3] == 0
    v100 = start("dgx-1")
    with pytest.raises(ValueError, match="retires pages"):
        v100.set_pending(0, row_remap_failed=True)


def test_a_teardown_while_a_thread_waits_for_events_is_counted(opened: list[SimulatedNVML]) -> None:
    sim = start("pcie-4", opened)
    sim.nvmlInit()  # two references: dropping one is no teardown
    events = sim.nvmlEventSetCreate()
    sim.nvmlDeviceRegisterEvents(sim.nvmlDeviceGetHandleByIndex(0), 0x8, events)
    thread, outcome = wait_in_thread(sim, events, 10_000)
    sim.nvmlShutdown()
    assert sim.shutdown_under_live_call == 0
    sim.xid(0, 13)
    thread.join(5)
    assert outcome[0].eventData == 13
    thread, outcome = wait_in_thread(sim, events, 10_000)
    sim.nvmlShutdown()  # the last reference, under a live wait
    thread.join(5)
    assert sim.shutdown_under_live_call == 1
    assert isinstance(outcome[0], pynvml.NVMLError_Uninitialized)


def test_the_gpu_count_can_fail_alone() -> None:
    sim = start("pcie-4")
    sim.fail_node("nvmlDeviceGetCount", pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(pynvml.NVMLError_Unknown):
        sim.nvmlDeviceGetCount()
    assert sim.nvmlDeviceGetUUID(sim.nvmlDeviceGetHandleByIndex(3)).startswith("GPU-")
    assert sim.nvmlSystemGetDriverVersion() == "550.54.15"
    for calls, code, message in [(["nvmlDeviceGetName"], 1, "valid: nvmlDeviceGetCount"),
                                 ([], 1, "none given"),
                                 ("nvmlDeviceGetCount", 0, "NVML_ERROR_")]:
        with pytest.raises(ValueError, match=message):
            sim.fail_node(calls, code)
    sim.unfail_node()
    assert sim.nvmlDeviceGetCount() == 4
