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

__all__ = [
    "CI_PROFILE_SLICES",
    "CI_SUPPORTED_SLICES",
    "COMPUTE_SLICES",
    "KNOWN_MODELS",
    "MEMORY_SLICES",
    "MODELS",
    "GiProfile",
    "GpuModel",
    "ci_slices_in",
    "mig_profile_names",
]

#: A100 and H100 split into 7 compute slices and 8 memory slices.
COMPUTE_SLICES: Final = 7
MEMORY_SLICES: Final = 8
#: Compute instance profile index -> slice count (``NVML_COMPUTE_INSTANCE_PROFILE_*``).
CI_PROFILE_SLICES: Final = {0: 1, 1: 2, 2: 3, 3: 4, 4: 7, 5: 8, 6: 6}
#: CI slice counts A100 and H100 offer; a 4-slice GI has no 3-slice CI.
CI_SUPPORTED_SLICES: Final = (1, 2, 3, 4, 7)

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
    memory_mib: int
    compute_capability: tuple[int, int]
    pci_device_id: int
    nvlinks: int  # NVLinks the part has (0: none)
    nvswitches: int  # NVSwitches on its HGX baseboard, for NVSwitch link peers
    sms: int
    mig: tuple[GiProfile, ...] = ()


# Columns: profile index, profile ID, name, compute slices, memory slices, memory (MB),
# instances, SMs, copy engines, NVDECs, NVJPGs, OFAs.  Indexes, IDs and memory sizes are
# what NVML reports on these parts.
A100_40GB_MIG: Final = (
    GiProfile(0, 19, "1g.5gb", 1, 1, 4864, 7, 14, 1, 0, 0, 0),
    GiProfile(7, 20, "1g.5gb+me", 1, 1, 4864, 1, 14, 1, 1, 1, 1),
    GiProfile(9, 15, "1g.10gb", 1, 2, 9856, 4, 14, 1, 1, 0, 0),
    GiProfile(1, 14, "2g.10gb", 2, 2, 9856, 3, 28, 2, 1, 0, 0),
    GiProfile(2, 9, "3g.20gb", 3, 4, 19968, 2, 42, 3, 2, 0, 0),
    GiProfile(3, 5, "4g.20gb", 4, 4, 19968, 1, 56, 4, 2, 0, 0),
    GiProfile(4, 0, "7g.40gb", 7, 8, 40192, 1, 98, 7, 5, 1, 1),
)
A100_80GB_MIG: Final = (
    GiProfile(0, 19, "1g.10gb", 1, 1, 9728, 7, 14, 1, 0, 0, 0),
    GiProfile(7, 20, "1g.10gb+me", 1, 1, 9728, 1, 14, 1, 1, 1, 1),
    GiProfile(9, 15, "1g.20gb", 1, 2, 19968, 4, 14, 1, 1, 0, 0),
    GiProfile(1, 14, "2g.20gb", 2, 2, 19968, 3, 28, 2, 1, 0, 0),
    GiProfile(2, 9, "3g.40gb", 3, 4, 40192, 2, 42, 3, 2, 0, 0),
    GiProfile(3, 5, "4g.40gb", 4, 4, 40192, 1, 56, 4, 2, 0, 0),
    GiProfile(4, 0, "7g.80gb", 7, 8, 80896, 1, 98, 7, 5, 1, 1),
)
H100_80GB_MIG: Final = (
    GiProfile(0, 19, "1g.10gb", 1, 1, 9728, 7, 16, 1, 1, 1, 0),
    GiProfile(7, 20, "1g.10gb+me", 1, 1, 9728, 1, 16, 1, 1, 1, 1),
    GiProfile(9, 15, "1g.20gb", 1, 2, 19968, 4, 16, 1, 1, 1, 0),
    GiProfile(1, 14, "2g.20gb", 2, 2, 19968, 3, 32, 2, 2, 2, 0),
    GiProfile(2, 9, "3g.40gb", 3, 4, 40192, 2, 60, 3, 3, 3, 0),
    GiProfile(3, 5, "4g.40gb", 4, 4, 40192, 1, 64, 4, 4, 4, 0),
    GiProfile(4, 0, "7g.80gb", 7, 8, 80896, 1, 132, 8, 7, 7, 1),
)

MODELS: Final[dict[str, GpuModel]] = {
    "NVIDIA A100-SXM4-40GB": GpuModel(40960, (8, 0), 0x20B010DE, 12, 6, 108, A100_40GB_MIG),
    "NVIDIA A100-SXM4-80GB": GpuModel(81920, (8, 0), 0x20B210DE, 12, 6, 108, A100_80GB_MIG),
    "NVIDIA H100 80GB HBM3": GpuModel(81559, (9, 0), 0x233010DE, 18, 4, 132, H100_80GB_MIG),
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
        names.extend(f"{c}c.{gi.name}" for c in ci_slices_in(gi) if c < gi.slices)
    return names


def ci_slices_in(gi: GiProfile) -> list[int]:
    """CI slice counts a GI of this profile supports (``+me`` profiles are 1-slice)."""
    return [c for c in CI_SUPPORTED_SLICES if c <= gi.slices and not (c == 3 and gi.slices == 4)]
