"""MIG profile naming (trio_gpu_plugin._mig_profiles) against NVIDIA's names.

Golden tests: every GPU instance profile of every part the simulator knows is named from
its NVML index and memory size exactly as NVML/NVIDIA names it, and the simulator's
tables are themselves pinned to NVIDIA's published profile names, so neither can drift.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Mapping
from fractions import Fraction

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gpu_plugin._mig_profiles import (
    CI_PROFILE_SLICES,
    GI_PROFILE_ATTRIBUTE,
    GI_PROFILE_SLICES,
    match_gi_profile,
    memory_gb,
    profile_from_nvml_name,
    profile_name,
)
from trio_gpu_plugin._nvml_sim import SimGpuSpec, SimNodeSpec, SimulatedNVML
from trio_gpu_plugin._sim_models import MODELS, GiProfile, ci_slices_in, mig_profile_names

MiB = 2**20
GiB = 2**30

#: NVIDIA's published GPU instance profile names per part: the MIG user guide's
#: "Supported MIG Profiles" tables (A30, A100, H100, H200, B200) and, for the parts the
#: guide names but does not tabulate (H100 NVL 94GB, GH200 96GB and 144GB), the profile
#: names in NVIDIA's mig-parted / gpu-operator default config for their PCI device IDs.
PUBLISHED: Mapping[str, tuple[str, ...]] = {
    "NVIDIA A30": ("1g.6gb", "1g.6gb+me", "2g.12gb", "2g.12gb+me", "4g.24gb"),
    "NVIDIA A100-SXM4-40GB": ("1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb",
                              "4g.20gb", "7g.40gb"),
    "NVIDIA A100-SXM4-80GB": ("1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb",
                              "4g.40gb", "7g.80gb"),
    "NVIDIA H100 80GB HBM3": ("1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb",
                              "4g.40gb", "7g.80gb"),
    "NVIDIA H100 NVL": ("1g.12gb", "1g.12gb+me", "1g.24gb", "2g.24gb", "3g.47gb", "4g.47gb",
                        "7g.94gb"),
    "NVIDIA H200": ("1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb",
                    "7g.141gb"),
    "NVIDIA GH200 480GB": ("1g.12gb", "1g.12gb+me", "1g.24gb", "2g.24gb", "3g.48gb",
                           "4g.48gb", "7g.96gb"),
    "NVIDIA GH200 144G HBM3e": ("1g.18gb", "1g.18gb+me", "1g.36gb", "2g.36gb", "3g.72gb",
                                "4g.72gb", "7g.144gb"),
    "NVIDIA B200": ("1g.23gb", "1g.23gb+me", "1g.45gb", "2g.45gb", "3g.90gb", "4g.90gb",
                    "7g.180gb"),
}

MIG_PARTS = [name for name, model in MODELS.items() if model.mig]
GI_ROWS = [pytest.param(name, gi, id=f"{name}:{gi.name}")
           for name in MIG_PARTS for gi in MODELS[name].mig]

#: The CI profile index of each slice count's first (plain) profile.
CI_INDEX = {1: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE,
            2: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE,
            3: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE,
            4: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE,
            6: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_6_SLICE,
            7: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE,
            8: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_8_SLICE}


def total_bytes(part: str) -> int:
    return MODELS[part].memory_mib * MiB


# --- golden: the simulator's tables against NVIDIA's names --------------------------------

def test_every_mig_part_has_its_published_names() -> None:
    assert sorted(MIG_PARTS) == sorted(PUBLISHED)
    for part, names in PUBLISHED.items():
        assert tuple(gi.name for gi in MODELS[part].mig) == names, part


@pytest.mark.parametrize(("part", "gi"), GI_ROWS)
def test_gi_profiles_are_named_as_nvml_names_them(part: str, gi: GiProfile) -> None:
    assert GI_PROFILE_SLICES[gi.index] == gi.slices
    assert profile_name(gi.index, CI_INDEX[gi.slices], gi.memory_mb, total_bytes(part)) == gi.name


@pytest.mark.parametrize("part", MIG_PARTS)
def test_every_ci_profile_the_simulator_offers_is_named_as_nvidia_names_it(part: str) -> None:
    model = MODELS[part]
    ours = []
    for gi in sorted(model.mig, key=lambda p: (p.slices, p.memory_mb, p.index)):
        for c in [gi.slices] + [c for c in ci_slices_in(gi) if c < gi.slices]:
            ours.append(profile_name(gi.index, CI_INDEX[c], gi.memory_mb, total_bytes(part)))
    assert ours == mig_profile_names(model)


@pytest.mark.parametrize(("part", "gi_name", "ci_index", "expected"), [
    ("NVIDIA A100-SXM4-40GB", "2g.10gb", pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE, "1c.2g.10gb"),
    ("NVIDIA A100-SXM4-40GB", "3g.20gb", pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE, "2c.3g.20gb"),
    ("NVIDIA A100-SXM4-40GB", "7g.40gb", pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE, "1c.7g.40gb"),
    ("NVIDIA A100-SXM4-40GB", "7g.40gb", pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE_NVL, "7g.40gb"),
    ("NVIDIA A100-SXM4-40GB", "1g.5gb+me", pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE_REV1,
     "1g.5gb+me"),
    ("NVIDIA H100 80GB HBM3", "4g.40gb", pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE, "2c.4g.40gb"),
    ("NVIDIA H200", "3g.71gb", pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE, "1c.3g.71gb"),
    ("NVIDIA H200", "7g.141gb", pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE_NVL, "7g.141gb"),
    ("NVIDIA B200", "2g.45gb", pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE_REV1, "1c.2g.45gb"),
    ("NVIDIA A30", "4g.24gb", pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE, "2c.4g.24gb"),
])
def test_ci_profiles(part: str, gi_name: str, ci_index: int, expected: str) -> None:
    gi = next(p for p in MODELS[part].mig if p.name == gi_name)
    assert profile_name(gi.index, ci_index, gi.memory_mb, total_bytes(part)) == expected


def test_half_gb_rounds_away_from_zero_as_go() -> None:
    """go-nvlib's math.Round rounds halves away from zero; Python's round to even."""
    h200, b200 = total_bytes("NVIDIA H200"), total_bytes("NVIDIA B200")
    # H200: 4/8 of 141 GiB is 70.5; B200: 1/8 of 180 GiB is 22.5.
    assert round(70.5) == 70 and round(22.5) == 22  # what the old naming did
    assert profile_name(pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE,
                        pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE, 71168, h200) == "3g.71gb"
    assert profile_name(pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE,
                        pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE, 71168, h200) == "4g.71gb"
    assert profile_name(pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE,
                        pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE, 20992, b200) == "1g.23gb"
    assert profile_name(pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1,
                        pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE, 20992, b200) == "1g.23gb+me"
    # And 1g.22gb's former reading on B200 (22.00 GiB, NVIDIA/gpu-operator#1242) too.
    assert memory_gb(22528, b200) == 23


def test_the_cases_discovery_named_before_are_unchanged() -> None:
    total = 40960 * MiB
    assert profile_name(0, 0, 4864, total) == "1g.5gb"
    assert profile_name(7, 0, 4864, total) == "1g.5gb+me"
    assert profile_name(9, 0, 9856, total) == "1g.10gb"
    assert profile_name(1, 0, 9856, total) == "1c.2g.10gb"
    assert profile_name(4, 4, 40192, total) == "7g.40gb"
    assert profile_name(0, 0, 9728, 81920 * MiB) == "1g.10gb"


#: NVIDIA's RTX PRO 6000 Blackwell profiles (MIG user guide table, the only published one
#: with -me, +me.all and +gfx variants), memory from a real ``nvidia-smi mig -lgip``
#: (GoogleCloudPlatform/container-engine-accelerators#564: 23.62, 47.38, 95.00 GiB) of a
#: 97887 MiB Server Edition.  Not a simulated part; the NVML index of each row is inferred
#: from its name (NVML names the index's variant), which is what this checks against.
RTX_PRO_6000 = [
    (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 24192, "1g.24gb"),
    (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 24192, "1g.24gb+me"),
    (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX, 24192, "1g.24gb+gfx"),
    (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME, 24192, "1g.24gb+me.all"),
    (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME, 24192, "1g.24gb-me"),
    (pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 48512, "2g.48gb"),
    (pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX, 48512, "2g.48gb+gfx"),
    (pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME, 48512, "2g.48gb+me.all"),
    (pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME, 48512, "2g.48gb-me"),
    (pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 97280, "4g.96gb"),
    (pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX, 97280, "4g.96gb+gfx"),
]


@pytest.mark.parametrize(("gi_index", "memory_mb", "expected"), RTX_PRO_6000)
def test_attribute_suffixes_on_nvidias_published_names(gi_index: int, memory_mb: int,
                                                        expected: str) -> None:
    g = GI_PROFILE_SLICES[gi_index]
    assert profile_name(gi_index, CI_INDEX[g], memory_mb, 97887 * MiB) == expected
    assert profile_name(gi_index, CI_INDEX[1], memory_mb, 97887 * MiB) == (
        expected if g == 1 else f"1c.{expected}")


def test_suffixes_of_every_variant() -> None:
    total = 40960 * MiB  # A100-40GB sizes, whatever part has the variant
    p = pynvml
    assert profile_name(p.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1, 1, 9856, total) == "2g.10gb+me"
    assert profile_name(p.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME, 0, 4864, total) == "1g.5gb-me"
    assert profile_name(p.NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME, 0, 9856, total) == "1c.2g.10gb-me"
    assert profile_name(p.NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME, 0, 4864, total) == "1g.5gb+me.all"
    assert profile_name(p.NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX, 2, 19968, total) == "3g.20gb+gfx"
    assert profile_name(p.NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX, 3, 19968, total) == "4g.20gb+gfx"
    assert profile_name(p.NVML_GPU_INSTANCE_PROFILE_8_SLICE, 5, 40192, total) == "8g.40gb"
    assert profile_name(p.NVML_GPU_INSTANCE_PROFILE_6_SLICE, 6, 30720, total) == "6g.30gb"


def test_unknown_indexes_are_named_in_the_error() -> None:
    with pytest.raises(ValueError, match=r"unknown GPU instance profile index 18\b"):
        profile_name(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT, 0, 4864, 40960 * MiB)
    with pytest.raises(ValueError, match=r"unknown compute instance profile index 9\b"):
        profile_name(0, pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT, 4864, 40960 * MiB)
    with pytest.raises(ValueError, match="total memory must be positive"):
        profile_name(0, 0, 4864, 0)
    with pytest.raises(ValueError, match="must not be negative"):
        memory_gb(-1, 40960 * MiB)


# --- the tables hold every pynvml constant and nothing else --------------------------------

def constants(prefix: str) -> dict[str, int]:
    return {name[len(prefix):]: getattr(pynvml, name) for name in dir(pynvml)
            if name.startswith(prefix) and name != prefix + "COUNT"}


def test_tables_hold_every_pynvml_profile_index_and_nothing_else() -> None:
    gi = constants("NVML_GPU_INSTANCE_PROFILE_")
    ci = constants("NVML_COMPUTE_INSTANCE_PROFILE_")  # not ..._ENGINE_PROFILE_*: other prefix
    assert gi and ci and not any(name.startswith("ENGINE") for name in ci)
    assert set(GI_PROFILE_SLICES) == set(GI_PROFILE_ATTRIBUTE) == set(gi.values())
    assert set(CI_PROFILE_SLICES) == set(ci.values())
    assert len(set(gi.values())) == len(gi) and len(set(ci.values())) == len(ci)
    assert all(0 <= i < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT for i in gi.values())
    assert all(0 <= i < pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT for i in ci.values())


def test_tables_agree_with_the_constants_names() -> None:
    """``<N>_SLICE[_VARIANT]``: N slices; the variant gives go-nvlib's suffix."""
    variant_suffix = {"": "", "REV1": "+me", "REV2": "", "GFX": "+gfx", "NO_ME": "-me",
                      "ALL_ME": "+me.all"}
    for name, index in constants("NVML_GPU_INSTANCE_PROFILE_").items():
        match = re.fullmatch(r"(\d+)_SLICE(?:_(\w+))?", name)
        assert match is not None, name
        assert GI_PROFILE_SLICES[index] == int(match[1]), name
        assert GI_PROFILE_ATTRIBUTE[index] == variant_suffix[match[2] or ""], name
    for name, index in constants("NVML_COMPUTE_INSTANCE_PROFILE_").items():
        match = re.fullmatch(r"(\d+)_SLICE(?:_(REV1|NVL))?", name)
        assert match is not None, name
        assert CI_PROFILE_SLICES[index] == int(match[1]), name


def test_tables_are_read_only() -> None:
    for table in (GI_PROFILE_SLICES, GI_PROFILE_ATTRIBUTE, CI_PROFILE_SLICES):
        assert isinstance(table, types.MappingProxyType)


# --- memory_gb against go-nvlib's float64 arithmetic --------------------------------------

def go_round(x: float) -> float:
    """Go's math.Round: to the nearest integer, halves away from zero (exactly)."""
    t = math.trunc(x)
    if abs(x - t) >= 0.5:
        t += int(math.copysign(1, x))
    return float(t)


def go_memory_gb(total: int, memory_mb: int) -> int:
    """go-nvlib's getMigMemorySizeGB, transcribed to Python floats (IEEE doubles)."""
    fractional = (float(memory_mb) * float(MiB)) / float(total)
    fractional = math.ceil(fractional * 8) / 8
    total_gb = float((total + GiB - 1) // GiB)
    return int(go_round(fractional * total_gb))


@pytest.mark.parametrize(("part", "gi"), GI_ROWS)
def test_memory_gb_is_go_nvlibs_on_every_simulated_profile(part: str, gi: GiProfile) -> None:
    assert memory_gb(gi.memory_mb, total_bytes(part)) == go_memory_gb(total_bytes(part), gi.memory_mb)


@settings(max_examples=2000, deadline=None)
@given(total_mib=st.integers(1024, 2 * 1024 * 1024), data=st.data())
def test_memory_gb_is_go_nvlibs(total_mib: int, data: st.DataObject) -> None:
    """Totals of 1 GiB to 2 TiB in MiB (as NVML's are), profiles up to the total;
    exact eighths and their neighbours, where ceil would differ, drawn often."""
    total = total_mib * MiB
    eighth = data.draw(st.integers(1, 8))
    exact = eighth * total_mib // 8
    memory_mb = data.draw(st.one_of(st.integers(0, total_mib),
                                    st.integers(max(0, exact - 2), min(total_mib, exact + 2))))
    assert memory_gb(memory_mb, total) == go_memory_gb(total, memory_mb)


@settings(max_examples=1000, deadline=None)
@given(total=st.integers(GiB, 2**41), share=st.fractions(0, 1))
def test_memory_gb_is_go_nvlibs_for_any_byte_total(total: int, share: Fraction) -> None:
    memory_mb = int(share * total) // MiB
    assert memory_gb(memory_mb, total) == go_memory_gb(total, memory_mb)


# --- NVML's own profile names -------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    (b"MIG 3g.71gb", (3, 71, "")),
    ("MIG 1g.10gb+me", (1, 10, "+me")),
    ("MIG 1g.23gb-me", (1, 23, "-me")),
    ("MIG 1g.23gb+me.all", (1, 23, "+me.all")),
    ("MIG 2g.48gb+gfx", (2, 48, "+gfx")),
    ("7g.180gb", (7, 180, "")),
    (b"MIG 7g.80gb\0\0\0", (7, 80, "")),
    ("MIG 1g.24gb+me,gfx", (1, 24, "+me,gfx")),  # go-nvlib allows attribute lists
])
def test_nvml_names_parse(name: str | bytes, expected: tuple[int, int, str]) -> None:
    assert profile_from_nvml_name(name) == expected


@pytest.mark.parametrize("name", [
    "", "MIG", "MIG 1c.2g.10gb", "MIG 1g.10gb+", "MIG 1g.10gb+me+gfx", "MIG 1g.10gb+me-gfx",
    "MIG 1g.10gb+me,me", "MIG 1g.10gb+.me", "MIG 1g.10gb+me.", "MIG 1g.10gb+1me",
    "MIG 1g.10GB", " MIG 1g.10gb", "MIG  1g.10gb", "MIG g.10gb", "MIG 1g.gb", "MIG 1g.10gb+m e",
    b"MIG 1g.10gb\xff", "MIG 1g.10gb\n",
])
def test_other_names_do_not_parse(name: str | bytes) -> None:
    assert profile_from_nvml_name(name) is None


@pytest.mark.parametrize(("part", "gi"), GI_ROWS)
def test_nvml_names_give_what_profile_name_computes(part: str, gi: GiProfile) -> None:
    parsed = profile_from_nvml_name(f"MIG {gi.name}".encode())
    assert parsed is not None
    g, gb, suffix = parsed
    assert (g, gb, suffix) == (gi.slices, memory_gb(gi.memory_mb, total_bytes(part)),
                               GI_PROFILE_ATTRIBUTE[gi.index])


# --- matching a MIG device's attributes to its GI profile ---------------------------------

def info(gi: GiProfile) -> types.SimpleNamespace:
    """``nvmlDeviceGetGpuInstanceProfileInfo`` of a table row."""
    return types.SimpleNamespace(
        id=gi.id, sliceCount=gi.slices, memorySizeMB=gi.memory_mb, copyEngineCount=gi.copy_engines,
        decoderCount=gi.decoders, encoderCount=0, jpegCount=gi.jpegs, ofaCount=gi.ofas,
        name=f"MIG {gi.name}".encode())


def attributes(gi: GiProfile) -> types.SimpleNamespace:
    """``nvmlDeviceGetAttributes`` of a MIG device of that profile."""
    return types.SimpleNamespace(
        gpuInstanceSliceCount=gi.slices, computeInstanceSliceCount=gi.slices,
        memorySizeMB=gi.memory_mb, multiprocessorCount=gi.sms,
        sharedCopyEngineCount=gi.copy_engines, sharedDecoderCount=gi.decoders,
        sharedEncoderCount=0, sharedJpegCount=gi.jpegs, sharedOfaCount=gi.ofas)


def test_the_media_extension_profile_is_told_apart_by_its_engines() -> None:
    h100 = {gi.index: gi for gi in MODELS["NVIDIA H100 80GB HBM3"].mig}
    profiles = {index: info(gi) for index, gi in h100.items()}
    plain = h100[pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE]
    me = h100[pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1]
    assert (plain.slices, plain.memory_mb) == (me.slices, me.memory_mb)  # slices and memory cannot
    assert match_gi_profile(attributes(plain), profiles) == [pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE]
    assert match_gi_profile(attributes(me), profiles) == [pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1]


@pytest.mark.parametrize("part", MIG_PARTS)
def test_every_simulated_profile_is_told_apart(part: str) -> None:
    profiles = {gi.index: info(gi) for gi in MODELS[part].mig}
    for gi in MODELS[part].mig:
        assert match_gi_profile(attributes(gi), profiles) == [gi.index]


def test_an_ambiguous_match_returns_every_candidate_and_no_match_none() -> None:
    one = next(gi for gi in MODELS["NVIDIA B200"].mig if gi.name == "1g.23gb")
    twin = types.SimpleNamespace(**{**vars(info(one)), "id": 67, "name": b"MIG 1g.23gb-me"})
    profiles = {pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME: twin,
                pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE: info(one)}
    assert match_gi_profile(attributes(one), profiles) == [
        pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE, pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME]
    other = types.SimpleNamespace(**{**vars(attributes(one)), "memorySizeMB": one.memory_mb - 128})
    assert match_gi_profile(other, profiles) == []
    assert match_gi_profile(attributes(one), {}) == []


def test_matching_over_the_simulated_nvml_without_instance_queries() -> None:
    """Attributes of each MIG device against every profile the parent answers for: the
    one profile it was created from, with no GPU/compute instance call."""
    node = SimNodeSpec("m", (SimGpuSpec("NVIDIA H100 80GB HBM3",
                                        mig=("1g.10gb", "1g.10gb+me", "1c.2g.20gb", "3g.40gb")),))
    sim = SimulatedNVML(node)
    sim.nvmlInit()
    try:
        parent = sim.nvmlDeviceGetHandleByIndex(0)
        profiles = {}
        for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                profiles[index] = sim.nvmlDeviceGetGpuInstanceProfileInfo(parent, index)
            except pynvml.NVMLError_NotSupported:
                continue
        found = []
        for slot in range(sim.nvmlDeviceGetMaxMigDeviceCount(parent)):
            try:
                mig = sim.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
            except pynvml.NVMLError_NotFound:
                continue
            matches = match_gi_profile(sim.nvmlDeviceGetAttributes(mig), profiles)
            assert len(matches) == 1
            parsed = profile_from_nvml_name(profiles[matches[0]].name)
            assert parsed is not None
            found.append(f"{parsed[0]}g.{parsed[1]}gb{parsed[2]}")
        assert found == ["1g.10gb", "1g.10gb+me", "2g.20gb", "3g.40gb"]
        assert not any(call.startswith(("nvmlDeviceGetGpuInstanceById", "nvmlGpuInstance"))
                       for call in sim.calls)
    finally:
        sim.nvmlShutdown()


def test_the_simulators_ci_slice_table_is_written_independently_and_agrees() -> None:
    from trio_gpu_plugin._sim_models import NVML_CI_PROFILE_SLICES

    assert NVML_CI_PROFILE_SLICES is not CI_PROFILE_SLICES
    assert dict(NVML_CI_PROFILE_SLICES) == dict(CI_PROFILE_SLICES)
