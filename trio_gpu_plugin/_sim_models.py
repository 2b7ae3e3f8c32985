"""The GPU models the simulated NVML knows, with their MIG profile tables.

Plain data: for each product name, what NVML reports about it (memory, compute
capability, PCI device ID, NVLinks) and, for MIG-capable parts, each GPU instance profile
as ``nvmlDeviceGetGpuInstanceProfileInfo`` returns it (index, ID, NVML's own name, slices,
memory, engines).  The simulator answers from these tables; the plugin's own MIG naming
(:mod:`trio_gpu_plugin._discovery`) never reads them, so a test that compares the two
checks our naming against NVML's, not against itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

import pynvml

__all__ = [
    "CI_PROFILE_SLICES",
    "CI_SUPPORTED_SLICES",
    "COMPUTE_SLICES",
    "DEFAULT_CI_PROFILES",
    "KNOWN_MODELS",
    "MEMORY_SLICES",
    "MODELS",
    "NVML_CI_PROFILE_SLICES",
    "GiProfile",
    "GpuModel",
    "ci_profile_offered",
    "ci_slices_in",
    "ci_slices_offered",
    "mig_profile_names",
]

#: The split of A100, H100, H200, GH200 and B200: 7 compute slices, 8 memory slices.
#: Parts that split otherwise (A30: 4 and 4) say so in :class:`GpuModel`.
COMPUTE_SLICES: Final = 7
MEMORY_SLICES: Final = 8
#: Every compute instance profile index pynvml defines -> its slice count
#: (``NVML_COMPUTE_INSTANCE_PROFILE_*`` in ``nvml.h``; go-nvlib's ``NewMigProfile`` maps
#: 1_SLICE_REV1 to 1 and 7_SLICE_NVL to 7 slices).  Insertion order keeps the first
#: index of each slice count first, so a reverse lookup (slices -> index) over it finds
#: the plain profile before its revision.  Written out here rather than imported from
#: the plugin's ``_mig_profiles``: the simulator must not take its facts from the code it
#: tests (tests/test_mig_profiles.py holds the two to each other).
NVML_CI_PROFILE_SLICES: Final[Mapping[int, int]] = {
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE: 1,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE: 2,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE: 3,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE: 4,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE: 7,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_8_SLICE: 8,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_6_SLICE: 6,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE_REV1: 1,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE_NVL: 7,
}
#: The table the simulator answers ``nvmlGpuInstanceGetComputeInstanceProfileInfo``
#: from: the complete one.  Which indexes a part offers is its
#: :attr:`GpuModel.ci_profiles`, and within a GI those whose slice count
#: :func:`ci_slices_in` allows, so listing an index here offers it nowhere by itself.
CI_PROFILE_SLICES: Final = NVML_CI_PROFILE_SLICES
#: CI slice counts all the simulated parts offer; a 4-slice GI has no 3-slice CI.
CI_SUPPORTED_SLICES: Final = (1, 2, 3, 4, 7)
#: CI profile indexes every simulated part offers (1, 2, 3, 4 and 7 slices).  None is
#: modelled with 1_SLICE_REV1 or 7_SLICE_NVL: no reading here shows a part offering
#: them (assumed absent; a part that does would list them in its ``ci_profiles``).
DEFAULT_CI_PROFILES: Final = (0, 1, 2, 3, 4)

# --------------------------------------------------------------------------------------
# Known GPU models and their MIG profiles


@dataclasses.dataclass(frozen=True)
class GiProfile:
    """One GPU instance profile as NVML reports it."""

    index: int  # NVML_GPU_INSTANCE_PROFILE_* (what nvmlDeviceGetGpuInstanceProfileInfo takes)
    id: int  # the profile ID (what nvmlGpuInstanceGetInfo reports)
    name: str
    slices: int
    memory_slices: int
    memory_mb: int
    instances: int
    sms: int
    copy_engines: int
    decoders: int
    jpegs: int
    ofas: int


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """One product as NVML reports it.

    ``compute_slices``/``memory_slices`` are the part's MIG geometry (A30: 4 and 4);
    ``compute_slices`` is also the most MIG devices it holds
    (``nvmlDeviceGetMaxMigDeviceCount``).  A GI of ``m`` memory slices starts at a
    multiple of ``m`` and its GPU instance ID is ``memory_slices // m - 1 + start // m``
    (A100: 0 for all 8, 1-2 halves, 3-6 quarters, 7-14 eighths, as the simulator has
    it; A30: 0, 1-2, 3-6, as a real ``nvidia-smi mig -lgi`` shows: 1g GIs at slices 0
    and 1 got IDs 3 and 4, a 2g at slice 2 got ID 2).  ``ci_profiles`` are the CI profile indexes
    its GIs offer (each GI those whose slice count :func:`ci_slices_in` allows).
    """

    memory_mib: int
    compute_capability: tuple[int, int]
    pci_device_id: int
    nvlinks: int  # NVLinks the part has (0: none)
    nvswitches: int  # NVSwitches on its HGX baseboard, for NVSwitch link peers
    sms: int
    mig: tuple[GiProfile, ...] = ()
    compute_slices: int = COMPUTE_SLICES
    memory_slices: int = MEMORY_SLICES
    ci_profiles: tuple[int, ...] = DEFAULT_CI_PROFILES


_nv = pynvml  # for the profile index constants, NVML_GPU_INSTANCE_PROFILE_*

# Columns: profile index, profile ID, NVML's name (without "MIG "), compute slices,
# memory slices, memory (MB, NVML's memorySizeMB), instances, SMs, copy engines, NVDECs,
# NVJPGs, OFAs.  No part here has NVENCs in a GI (encoderCount 0).
#
# Where the numbers come from.  NVML's names, IDs, sizes and engine counts are printed by
# ``nvidia-smi mig -lgip`` (memory in GiB with two decimals, so MB = GiB * 1024 to the
# nearest 128 MB, the granularity of every size read so far).  NVIDIA's MIG user guide,
# "Supported MIG Profiles", publishes the names and memory/SM FRACTIONS only.  A value
# that is neither read nor derived from a reading is marked "not a reading" and is chosen
# inside the published fraction, a little under k/8 of the part's memory as every real
# part's is.  NVIDIA's go-nvml mock tables (pkg/nvml/mock/gpus/*.go) were compared and not
# used: their IDs repeat the index (real IDs are 19, 20, 15, 14, 9, 5, 0), their memory is
# GB * 1024 with the 7g equal to the total (go-nvlib would name their 3g.71gb 3g.89gb),
# and their engine counts disagree with the readings below.

# A100-SXM4-40GB, 40960 MiB: real ``nvidia-smi mig -lgip`` readings (as before).
A100_40GB_MIG: Final = (
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.5gb", 1, 1, 4864, 7, 14, 1, 0, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.5gb+me", 1, 1, 4864, 1, 14, 1, 1, 1, 1),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.10gb", 1, 2, 9856, 4, 14, 1, 1, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.10gb", 2, 2, 9856, 3, 28, 2, 1, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.20gb", 3, 4, 19968, 2, 42, 3, 2, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.20gb", 4, 4, 19968, 1, 56, 4, 2, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.40gb", 7, 8, 40192, 1, 98, 7, 5, 1, 1),
)
# A100-SXM4-80GB, 81920 MiB: real ``nvidia-smi mig -lgip`` readings (as before).
A100_80GB_MIG: Final = (
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.10gb", 1, 1, 9728, 7, 14, 1, 0, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.10gb+me", 1, 1, 9728, 1, 14, 1, 1, 1, 1),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.20gb", 1, 2, 19968, 4, 14, 1, 1, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.20gb", 2, 2, 19968, 3, 28, 2, 1, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.40gb", 3, 4, 40192, 2, 42, 3, 2, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.40gb", 4, 4, 40192, 1, 56, 4, 2, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.80gb", 7, 8, 80896, 1, 98, 7, 5, 1, 1),
)
# H100 80GB HBM3, 81559 MiB (read on a real H100 by this project,
# bench/results/real_nvml-h100.txt): real ``nvidia-smi mig -lgip`` readings.  The
# 1g.20gb has 26 SMs, not 16: every GH100 part's reading of that profile says 26 (H200,
# H100 NVL, GH200 144G below).
H100_80GB_MIG: Final = (
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.10gb", 1, 1, 9728, 7, 16, 1, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.10gb+me", 1, 1, 9728, 1, 16, 1, 1, 1, 1),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.20gb", 1, 2, 19968, 4, 26, 1, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.20gb", 2, 2, 19968, 3, 32, 2, 2, 2, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.40gb", 3, 4, 40192, 2, 60, 3, 3, 3, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.40gb", 4, 4, 40192, 1, 64, 4, 4, 4, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.80gb", 7, 8, 80896, 1, 132, 8, 7, 7, 1),
)
# A30 (24GB), 24576 MiB, 4 compute and 4 memory slices: every row is a real
# ``nvidia-smi mig -lgip`` reading (driver 535.183.01; 5.81, 11.69 and 23.44 GiB), and
# the MIG devices' memory nvidia-smi showed there (5952 and 11968 MiB) agrees.  The 1g
# profiles' one NVDEC is what NVML reports; the MIG user guide's table says 0.
A30_MIG: Final = (
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 14, "1g.6gb", 1, 1, 5952, 4, 14, 1, 1, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 21, "1g.6gb+me", 1, 1, 5952, 1, 14, 1, 1, 1, 1),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 5, "2g.12gb", 2, 2, 11968, 2, 28, 2, 2, 0, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1, 6, "2g.12gb+me", 2, 2, 11968, 1, 28, 2, 2, 1, 1),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 0, "4g.24gb", 4, 4, 24000, 1, 56, 4, 4, 1, 1),
)
# H100 NVL (94GB), 95830 MiB (nvidia-smi's figure in many public outputs; sure).
# Readings (``nvidia-smi mig -lgip`` in NVIDIA/gpu-operator#900 and mig-parted#101):
# 1g.12gb and +me 10.75 GiB, 1g.24gb and 2g.24gb 21.62 GiB, 3g.47gb 46.38 GiB, their IDs
# and the first four rows' engines.  The 4g.47gb takes the 3g's memory (as on every part
# read); the 7g.94gb's memory is within the published fraction, not a reading; the 3g,
# 4g and 7g SMs and engines are H100's (same GH100 die), not readings.
H100_NVL_MIG: Final = (
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.12gb", 1, 1, 11008, 7, 16, 1, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.12gb+me", 1, 1, 11008, 1, 16, 1, 1, 1, 1),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.24gb", 1, 2, 22144, 4, 26, 1, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.24gb", 2, 2, 22144, 3, 32, 2, 2, 2, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.47gb", 3, 4, 47488, 2, 60, 3, 3, 3, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.47gb", 4, 4, 47488, 1, 64, 4, 4, 4, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.94gb", 7, 8, 94976, 1, 132, 8, 7, 7, 1),
)
# H200 (141GB), 143771 MiB (nvidia-smi's figure for "NVIDIA H200" and "H200 NVL" in many
# public outputs; sure).  Every row is a real ``nvidia-smi mig -lgip`` reading
# (NVIDIA/mig-parted#120: 16.00, 32.25, 69.50 and 139.75 GiB); the names match the MIG
# user guide's H200 table.
H200_MIG: Final = (
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.18gb", 1, 1, 16384, 7, 16, 1, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.18gb+me", 1, 1, 16384, 1, 16, 1, 1, 1, 1),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.35gb", 1, 2, 33024, 4, 26, 1, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.35gb", 2, 2, 33024, 3, 32, 2, 2, 2, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.71gb", 3, 4, 71168, 2, 60, 3, 3, 3, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.71gb", 4, 4, 71168, 1, 64, 4, 4, 4, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.141gb", 7, 8, 143104, 1, 132, 8, 7, 7, 1),
)
# GH200 96GB HBM3 ("NVIDIA GH200 480GB"), 97871 MiB (nvidia-smi's figure in many public
# outputs; sure).  Names: NVIDIA's mig-parted/gpu-operator default config for device
# 0x2342 (1g.12gb, 2g.24gb, 3g.48gb, ...) and the guide's "H100 on GH200" (96GB) row.
# No lgip reading found: every memory size is within the published fraction, not a
# reading; IDs, SMs and engines are H100's (same GH100 die), not readings.
GH200_96GB_MIG: Final = (
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.12gb", 1, 1, 11264, 7, 16, 1, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.12gb+me", 1, 1, 11264, 1, 16, 1, 1, 1, 1),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.24gb", 1, 2, 22528, 4, 26, 1, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.24gb", 2, 2, 22528, 3, 32, 2, 2, 2, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.48gb", 3, 4, 48384, 2, 60, 3, 3, 3, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.48gb", 4, 4, 48384, 1, 64, 4, 4, 4, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.96gb", 7, 8, 97024, 1, 132, 8, 7, 7, 1),
)
# GH200 144G HBM3e, 146831 MiB (one public nvidia-smi --query-gpu figure; fairly sure:
# NVIDIA's 7g.144gb needs a total in (146432, 147456] MiB).  Names: NVIDIA's
# mig-parted/gpu-operator default config for device 0x2348 (1g.18gb, 1g.18gb+me,
# 1g.36gb, 2g.36gb, 3g.72gb, 4g.72gb, 7g.144gb).  Readings (``nvidia-smi mig -lgip``,
# NVIDIA/mig-parted#139): the first four rows (17.50 and 35.25 GiB), IDs and engines;
# the 3g, 4g and 7g memory is within the published fraction, not a reading, and their
# SMs and engines are H100's (same GH100 die).
GH200_144GB_MIG: Final = (
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.18gb", 1, 1, 17920, 7, 16, 1, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.18gb+me", 1, 1, 17920, 1, 16, 1, 1, 1, 1),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.36gb", 1, 2, 36096, 4, 26, 1, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.36gb", 2, 2, 36096, 3, 32, 2, 2, 2, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.72gb", 3, 4, 72448, 2, 60, 3, 3, 3, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.72gb", 4, 4, 72448, 1, 64, 4, 4, 4, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.144gb", 7, 8, 145920, 1, 132, 8, 7, 7, 1),
)
# B200 (180GB), 183359 MiB (nvidia-smi's figure for "NVIDIA B200" in many public outputs;
# sure).  Names: the MIG user guide's B200 table (1g.23gb, 1g.23gb+me, 1g.45gb, 2g.45gb,
# 3g.90gb, 4g.90gb, 7g.180gb); it publishes no -me or +me.all profile for B200 (they are
# published for RTX PRO 6000 Blackwell only), so none is modelled.  Readings
# (``nvidia-smi mig -lgip`` in NVIDIA/gpu-operator#1351, with 1g and 2g MIG devices of
# 20992 and 45312 MiB in gpu-operator#2155): the first four rows (20.50 and 44.25 GiB),
# their IDs, SMs and engines.  The 3g, 4g and 7g memory is within the published fraction,
# not a reading; their IDs follow every other part's (9, 5, 0); their copy engines are
# the guide's (6, 8, 16); their SMs, NVDECs and NVJPGs (one of each per slice, as the
# 1g and 2g readings have) and the 7g's one OFA are not readings.
B200_MIG: Final = (
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, "1g.23gb", 1, 1, 20992, 7, 18, 2, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, "1g.23gb+me", 1, 1, 20992, 1, 18, 2, 1, 1, 1),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, "1g.45gb", 1, 2, 45312, 4, 30, 2, 1, 1, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, "2g.45gb", 2, 2, 45312, 3, 36, 4, 2, 2, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, "3g.90gb", 3, 4, 90624, 2, 54, 6, 3, 3, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, "4g.90gb", 4, 4, 90624, 1, 72, 8, 4, 4, 0),
    GiProfile(_nv.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, "7g.180gb", 7, 8, 182272, 1, 148, 16, 7, 7, 1),
)

# PCI device IDs: NVIDIA's mig-parted default config (device filters) and pci.ids.
# NVLinks/NVSwitches: HGX baseboards (A100: 12 links, 6 switches; H100/H200: 18, 4;
# B200: 18 links, 2 NVLink switch chips).  PCIe cards (A30, H100 NVL) and GH200 are
# modelled without NVLink bridges or a C2C-attached peer.
MODELS: Final[dict[str, GpuModel]] = {
    "NVIDIA A100-SXM4-40GB": GpuModel(40960, (8, 0), 0x20B010DE, 12, 6, 108, A100_40GB_MIG),
    "NVIDIA A100-SXM4-80GB": GpuModel(81920, (8, 0), 0x20B210DE, 12, 6, 108, A100_80GB_MIG),
    "NVIDIA H100 80GB HBM3": GpuModel(81559, (9, 0), 0x233010DE, 18, 4, 132, H100_80GB_MIG),
    "NVIDIA A30": GpuModel(24576, (8, 0), 0x20B710DE, 0, 0, 56, A30_MIG,
                           compute_slices=4, memory_slices=4),
    "NVIDIA H100 NVL": GpuModel(95830, (9, 0), 0x232110DE, 0, 0, 132, H100_NVL_MIG),
    "NVIDIA H200": GpuModel(143771, (9, 0), 0x233510DE, 18, 4, 132, H200_MIG),
    "NVIDIA GH200 480GB": GpuModel(97871, (9, 0), 0x234210DE, 0, 0, 132, GH200_96GB_MIG),
    "NVIDIA GH200 144G HBM3e": GpuModel(146831, (9, 0), 0x234810DE, 0, 0, 132, GH200_144GB_MIG),
    "NVIDIA B200": GpuModel(183359, (10, 0), 0x290110DE, 18, 2, 148, B200_MIG),
    "Tesla V100-SXM2-16GB": GpuModel(16384, (7, 0), 0x1DB110DE, 6, 6, 80),
    "Tesla T4": GpuModel(15360, (7, 5), 0x1EB810DE, 0, 0, 40),
}

#: Models the simulator knows without ``memory_mib``/``compute_capability``: name ->
#: (memory in MiB, compute capability, MIG profile names or ``()``).
KNOWN_MODELS: Final[Mapping[str, tuple[int, tuple[int, int], tuple[str, ...]]]] = {
    name: (m.memory_mib, m.compute_capability, tuple(p.name for p in m.mig))
    for name, m in MODELS.items()
}


def mig_profile_names(model: GpuModel) -> list[str]:
    """Every MIG device spec string ``model`` accepts: ``<G>g.<GB>gb`` names and, for
    CIs smaller than their GI, ``<C>c.<G>g.<GB>gb``."""
    names = []
    for gi in sorted(model.mig, key=lambda p: (p.slices, p.memory_mb, p.index)):
        names.append(gi.name)
        names.extend(f"{c}c.{gi.name}" for c in ci_slices_offered(model, gi) if c < gi.slices)
    return names


def ci_slices_in(gi: GiProfile) -> list[int]:
    """CI slice counts a GI of this profile supports (``+me`` profiles are 1-slice)."""
    return [c for c in CI_SUPPORTED_SLICES if c <= gi.slices and not (c == 3 and gi.slices == 4)]


def ci_profile_offered(model: GpuModel, gi: GiProfile, index: int) -> bool:
    """Whether a GI of this profile on ``model`` offers CI profile ``index``: the part
    offers the index (:attr:`GpuModel.ci_profiles`) and the GI its slice count."""
    slices = NVML_CI_PROFILE_SLICES.get(index)
    return index in model.ci_profiles and slices is not None and slices in ci_slices_in(gi)


def ci_slices_offered(model: GpuModel, gi: GiProfile) -> list[int]:
    """CI slice counts a GI of this profile on ``model`` offers through some CI profile
    index of the part's."""
    return [c for c in ci_slices_in(gi)
            if any(NVML_CI_PROFILE_SLICES.get(i) == c for i in model.ci_profiles)]
