"""A simulated NVML: pynvml's calls, return shapes and errors over a described node.

:class:`SimulatedNVML` implements the :class:`~trio_gpu_plugin._nvml.NVML` protocol over a
:class:`SimNodeSpec` (plain frozen data: GPUs, NVLinks, PCIe switches, NUMA nodes, MIG
devices), so discovery and health checking run unchanged on a laptop.  It follows real NVML
where our code could otherwise get it wrong: pynvml's own ``NVMLError_*`` classes,
reference-counted ``nvmlInit``, MIG profile tables and GPU instance IDs as the driver
assigns them, ``NOT_FOUND`` for empty MIG slots, page retirement on pre-Ampere GPUs and row
remapping on Ampere and later (each reporting ``NOT_SUPPORTED`` for the other).

Faults are injected from any thread (:meth:`SimulatedNVML.xid`, :meth:`~SimulatedNVML.lose`,
:meth:`~SimulatedNVML.nvml_down`, :meth:`~SimulatedNVML.hang` ...) while NVML calls block in
worker threads: one ``threading.Condition`` guards all state, and an injected event wakes a
waiting ``nvmlEventSetWait_v2`` at once.  A hung GPU (:meth:`~SimulatedNVML.hang`) blocks
every call that names it until :meth:`~SimulatedNVML.unhang`, as a wedged GPU does to the
real library.

Node descriptions come from :data:`PRESETS` or from YAML/JSON files
(:func:`load_node_file`); :meth:`SimulatedNVML.write_driver_root` lays out the files a
driver root holds (``/dev/nvidia*``, sysfs NUMA nodes, MIG capability minors).

Where each modelled behaviour comes from
-----------------------------------------
A simulator written beside the code agrees with the code by construction, so each
behaviour here names its source.  "NVML API" is NVIDIA's NVML API reference (the call's
documented returns and notes); "pynvml" is nvidia-ml-py 13.615.71's source; "H100 run" is
``bench/real_nvml.py`` on an H100 80GB, driver 580.159.04 (``bench/results/real_nvml-h100.txt``);
"assumed" means no source was found and the harder case for our code was chosen.

=========================================================  ==========================================
Behaviour                                                  Source
=========================================================  ==========================================
``nvmlInit``/``nvmlShutdown`` reference-counted; calls     NVML API (nvmlInit_v2, nvmlShutdown)
before init raise UNINITIALIZED
No library: LIBRARY_NOT_FOUND from ``nvmlInit``            pynvml (NVMLError_LibraryNotFound)
Errors are pynvml's own ``NVMLError_*`` classes            pynvml (``NVMLError(code)`` picks them)
``busId`` as undecoded bytes in structures                 pynvml (char arrays left as bytes)
Memory, minor, bus ID, name, CUDA capability of a GPU      H100 run (equal to ``nvidia-smi -q -x``)
NUMA from sysfs; -1 means unknown                          NVIDIA's plugin (GetNumaNode); H100 run
                                                           (a VM: -1)
Supported events 0xff9f on Hopper (0x8000 included)        H100 run (our default mask is narrower;
                                                           0x8000 only with the recovery field)
Page retirement before Ampere, row remapping on Ampere+,   NVML API; H100 run (retirement
each NOT_SUPPORTED for the other                           NOT_SUPPORTED, remapping readable)
``nvmlDeviceGetRemappedRows``: (corr, unc, pending,        NVML API (the tuple); pynvml; a failed
failure); a reset clears only the pending flag, a failed   remap lasting until the GPU is serviced:
remap lasts (cleared only by ``set_pending``)              NVIDIA's row-remapping docs (RMA)
ECC counts (``nvmlDeviceGetTotalEccErrors``): volatile     NVML API (nvmlEccCounterType_t:
ones reset with the GPU, aggregate ones persist            volatile "since last driver load/reset")
Event data names the GPU handle, never a MIG handle;       NVML API (nvmlEventData_t); pynvml
GI/CI 0xFFFFFFFF for whole-GPU events
Wait timeout raises TIMEOUT; a wait on a set with a lost   NVML API (nvmlEventSetWait_v2 returns
GPU raises GPU_IS_LOST at once, after queued events (the   GPU_IS_LOST); repeating it on every wait
XID 79 first), on every wait while it stays lost           is assumed: how often a driver repeats
                                                           it is not documented
A lost GPU: XID 79, then GPU_IS_LOST from every call       NVML API (GPU_IS_LOST); nvidia-smi's
naming it, its handle by index or UUID included            "Unable to determine the device handle
                                                           ... GPU is lost" on real nodes
Per-call failures (:meth:`SimulatedNVML.fail`)             NVML API lists GPU_IS_LOST/UNKNOWN/
                                                           NO_PERMISSION for each query; which fail
                                                           on a dying GPU varies: injected, not
                                                           modelled
``nvmlDeviceGetCount`` failing alone (UNKNOWN) while      NVML API (nvmlDeviceGetCount returns
the GPUs answer (:meth:`SimulatedNVML.fail_node`)          UNKNOWN); when a driver does it: not
                                                           documented, injected
A hung GPU blocks every call naming it; a call released    assumed from wedged-GPU reports; the
after the last ``nvmlShutdown`` raises UNINITIALIZED       teardown count
                                                           (:attr:`~SimulatedNVML.shutdown_under_live_call`)
                                                           is ours: real NVML frees what the call
                                                           uses (a use-after-free)
MIG: NOT_FOUND for an empty slot, INVALID_ARGUMENT past    NVML API (nvmlDeviceGetMigDeviceHandleByIndex,
the last; the slot count and                               nvmlDeviceGetMaxMigDeviceCount);
``nvmlDeviceGetMaxMigDeviceCount`` are the part's          ``_sim_models`` (A30: 4)
compute slices (7; A30: 4)
MIG geometry per part (compute/memory slices, A30 4/4);    NVIDIA MIG user guide (``-lgi`` output,
GI IDs as the driver's swizzle IDs,                        A100); a real A30 ``-lgi`` (1g at 0, 1
``memory_slices // m - 1 + start // m``                    -> IDs 3, 4; 2g at 2 -> ID 2)
MIG device name ``<GPU name> MIG <profile>``               NVML API (nvmlDeviceGetName on MIG)
MIG without privilege (the default): a MIG-enabled         NVML API (nvmlDeviceGetMemoryInfo: "only
parent's memory info, ``nvmlDeviceGetGpuInstanceById``/    if the caller has appropriate
``GetGpuInstances``, ``nvmlGpuInstanceGetComputeInstance   privileges"; the four lookups: "Requires
ById``/``GetComputeInstances`` answer NO_PERMISSION; MIG   privileged user")
handles, their UUID/name/memory/GI/CI IDs/attributes
and the profile tables answer
GI profile tables per part                                 ``_sim_models`` (each table's source)
Profile info ``name`` is NVML's (``MIG 3g.71gb``)          NVIDIA's published tables, which are
                                                           ``nvidia-smi mig -lgip`` output
CI profiles: only the part's indexes                       pynvml (the index constants); go-nvlib
(``GpuModel.ci_profiles``: 1_SLICE_REV1, 7_SLICE_NVL on    mig_profile.go (slices per index);
none) whose slices the GI allows (no 3-slice CI in a 4g)   which parts offer the revisions: assumed
NVLink: NOT_SUPPORTED without NVLink; INVALID_ARGUMENT     NVML API (INVALID_ARGUMENT "if ... link
for link numbers past the part's own (A100: 12), not       is invalid"); NVIDIA k8s-test-infra
just past NVML_NVLINK_MAX_LINKS                            mocknvml engine/topology.go (#255 note:
                                                           real NVML answers INVALID_ARGUMENT for
                                                           link >= the part's link count)
NVLink holes: link numbers answering NOT_SUPPORTED         assumed; whether NVIDIA's own loops
before the active ones (``nvlink_unsupported``)            (go-gpuallocator, k8s-device-plugin)
                                                           go on past a link's error: not
                                                           confirmed (not in the mirrors here;
                                                           go-nvlib has no link loop)
``nvmlDeviceGetFieldValues``: the call succeeds and a      NVML API (nvmlFieldValue_t.nvmlReturn);
field the driver cannot give says NOT_SUPPORTED in its     pynvml (field 230, action values, the
own ``nvmlReturn``; field 230 = the recovery action        (fieldId, scopeId) tuples); an unknown
(``uiVal``, unsigned int); other IDs NOT_SUPPORTED too     field ID's answer: not confirmed
A recovery-action change raises event 0x8000 with the      pynvml names the event type; the event
action as data (before the XID it comes with); a reset     data, the order and the reset: assumed
sets a supported field back to NONE                        (readers should re-read the field)
mig-minors file layout and ``/dev/nvidia-caps`` minors     the kernel module's
                                                           /proc/driver/nvidia-caps/mig-minors
=========================================================  ==========================================

Not modelled (a real node may do it; tests here cannot show our code copes): GPU indexes
renumbered when a GPU is unbound or drained (NVML's enumeration order is not guaranteed);
NVLink error counters and link state changes; XID-specific driver behaviour beyond the
recovery-action field (e.g. which calls fail after which XID, the XID catalog's own
recovery semantics); MIG reconfiguration while running, and more than one compute
instance per GPU instance; vGPU and confidential computing; persistence mode and driver
reload timing; clocks, power, temperature and utilisation; the real latencies of calls
and event waits (no timing here is a real one); ``nvmlDeviceGetMemoryInfo_v2`` and BAR1
memory (their privilege rule is the same as ``nvmlDeviceGetMemoryInfo``'s); field IDs
other than 230; a real ctypes array in ``nvmlDeviceGetGpuInstances`` (pass a list).
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import itertools
import json
import os
import pathlib
import re
import threading
import time
import uuid as uuidlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, NoReturn

import pynvml

from ._nvml import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_RECOVERY_ACTION,
    EVENT_XID,
    FIELD_RECOVERY_ACTION,
    NO_INSTANCE,
    text,
)
from ._sim_models import (
    COMPUTE_SLICES,
    DEFAULT_CI_PROFILES,
    KNOWN_MODELS,
    MODELS,
    NVML_CI_PROFILE_SLICES,
    GiProfile,
    GpuModel,
    ci_profile_offered,
    ci_slices_offered,
    mig_profile_names,
)

__all__ = [
    "KNOWN_MODELS",
    "PRESETS",
    "SimComputeInstanceInfo",
    "SimComputeInstanceProfileInfo",
    "SimDeviceAttributes",
    "SimEventData",
    "SimFieldValue",
    "SimGpuInstanceInfo",
    "SimGpuInstanceProfileInfo",
    "SimGpuSpec",
    "SimMemoryInfo",
    "SimNodeSpec",
    "SimPciInfo",
    "SimPlacement",
    "FAILABLE_CALLS",
    "NODE_CALLS",
    "SimulatedNVML",
    "load_node_file",
    "node_from",
]

_MIB: Final = 1024 * 1024
#: The same namespace as ``_simulated``, so a preset's GPU UUIDs stay what they were.
_UUID_NAMESPACE: Final = uuidlib.UUID("7f0c8a52-3f5e-4c1e-9a53-1b1f5f7e8a11")
_DEFAULT_EVENTS: Final = 0x8 | 0x2 | 0x1 | 0x4000
#: ``/dev/nvidia255`` is ``nvidiactl``: GPU minors are 0..254.
_MAX_MINOR: Final = 254
#: The kernel's ``mig-minors`` lists 15 GPU instances (swizzle IDs 0..14) per GPU, each
#: with 8 compute instances.
_GI_IDS: Final = 15
_CI_IDS: Final = 8


# --------------------------------------------------------------------------------------
# Structures NVML returns, with the C structures' field names


@dataclasses.dataclass(frozen=True)
class SimMemoryInfo:
    """``nvmlMemory_t``: framebuffer memory in bytes."""

    total: int
    free: int
    used: int


@dataclasses.dataclass(frozen=True)
class SimPciInfo:
    """``nvmlPciInfo_t``.  ``busId`` is bytes, as in pynvml releases that leave ``char``
    arrays undecoded (``text()`` accepts both), in NVML's form ``00000000:07:00.0``."""

    busIdLegacy: bytes
    domain: int
    bus: int
    device: int
    pciDeviceId: int
    pciSubSystemId: int
    busId: bytes


@dataclasses.dataclass(frozen=True)
class SimEventData:
    """``nvmlEventData_t``: ``device`` is the GPU handle, never a MIG handle; MIG events
    name their instance in ``gpuInstanceId``/``computeInstanceId`` (else 0xFFFFFFFF)."""

    device: Any
    eventType: int
    eventData: int
    gpuInstanceId: int
    computeInstanceId: int


@dataclasses.dataclass(frozen=True)
class SimValue:
    """``nvmlValue_t`` (a union): every member reads the same number here."""

    uiVal: int = 0

    @property
    def ulVal(self) -> int:
        return self.uiVal

    @property
    def ullVal(self) -> int:
        return self.uiVal

    @property
    def sllVal(self) -> int:
        return self.uiVal

    @property
    def siVal(self) -> int:
        return self.uiVal

    @property
    def usVal(self) -> int:
        return self.uiVal & 0xFFFF

    @property
    def dVal(self) -> float:
        return float(self.uiVal)


@dataclasses.dataclass(frozen=True)
class SimFieldValue:
    """``nvmlFieldValue_t``: one answer of ``nvmlDeviceGetFieldValues``; ``nvmlReturn``
    says whether this field could be read."""

    fieldId: int
    scopeId: int
    timestamp: int
    latencyUsec: int
    valueType: int
    nvmlReturn: int
    value: SimValue


@dataclasses.dataclass(frozen=True)
class SimDeviceAttributes:
    """``nvmlDeviceAttributes_t`` of a MIG device."""

    multiprocessorCount: int
    sharedCopyEngineCount: int
    sharedDecoderCount: int
    sharedEncoderCount: int
    sharedJpegCount: int
    sharedOfaCount: int
    gpuInstanceSliceCount: int
    computeInstanceSliceCount: int
    memorySizeMB: int


@dataclasses.dataclass(frozen=True)
class SimPlacement:
    """``nvmlGpuInstancePlacement_t`` / ``nvmlComputeInstancePlacement_t``."""

    start: int
    size: int


@dataclasses.dataclass(frozen=True)
class SimGpuInstanceProfileInfo:
    """``nvmlGpuInstanceProfileInfo_v2_t`` (pynvml's default version)."""

    version: int
    id: int
    isP2pSupported: int
    sliceCount: int
    instanceCount: int
    multiprocessorCount: int
    copyEngineCount: int
    decoderCount: int
    encoderCount: int
    jpegCount: int
    ofaCount: int
    memorySizeMB: int
    name: str


@dataclasses.dataclass(frozen=True)
class SimComputeInstanceProfileInfo:
    """``nvmlComputeInstanceProfileInfo_v2_t`` (pynvml's default version)."""

    version: int
    id: int
    sliceCount: int
    instanceCount: int
    multiprocessorCount: int
    sharedCopyEngineCount: int
    sharedDecoderCount: int
    sharedEncoderCount: int
    sharedJpegCount: int
    sharedOfaCount: int
    name: str


@dataclasses.dataclass(frozen=True)
class SimGpuInstanceInfo:
    """``nvmlGpuInstanceInfo_t``: ``device`` is the parent GPU's handle; ``placement`` is
    in memory slices, as ``nvidia-smi mig -lgi`` shows it."""

    device: Any
    id: int
    profileId: int
    placement: SimPlacement


@dataclasses.dataclass(frozen=True)
class SimComputeInstanceInfo:
    """``nvmlComputeInstanceInfo_t``."""

    device: Any
    gpuInstance: Any
    id: int
    profileId: int
    placement: SimPlacement


# --------------------------------------------------------------------------------------
# Node description


@dataclasses.dataclass(frozen=True)
class SimGpuSpec:
    """One simulated GPU (fields left ``None`` are derived).

    Attributes:
        name: product name as NVML reports it; a :data:`KNOWN_MODELS` name supplies
            memory, compute capability, NVLink count and MIG profiles.
        uuid: ``GPU-...``; derived deterministically from the node name and index.
        memory_mib: framebuffer size; required for unknown models.
        compute_capability: ``(major, minor)``; required for unknown models.
        pci_bus_id: NVML's form, ``00000000:07:00.0``; generated when ``None``.
        numa_node: ``None`` when unknown (sysfs holds -1).
        minor: ``/dev/nvidia<minor>``; defaults to the index.
        nvlinks: peer GPU index -> active NVLink count from this GPU (need not be
            symmetric: asymmetric data is representable on purpose).
        nvswitch_links: active links that end at an NVSwitch.
        pcie_switch: GPUs sharing a value sit behind one PCIe switch.
        mig: ``None``: MIG mode off; a tuple (maybe empty): MIG on, with these devices
            as profile names (``1g.5gb``, ``1g.5gb+me``, ``1c.2g.10gb``...).
        supported_events: ``nvmlDeviceGetSupportedEventTypes``'s bit mask (a GPU
            whose driver reports recovery actions also lists 0x8000).
        nvlink_unsupported: link numbers whose NVLink queries answer NOT_SUPPORTED;
            active links are numbered after them (real parts have such holes).
        recovery_action: the driver's ``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION`` to start
            with (0 = NONE); ``None``: a driver that does not report the field.
    """

    name: str = "NVIDIA A100-SXM4-40GB"
    uuid: str | None = None
    memory_mib: int | None = None
    compute_capability: tuple[int, int] | None = None
    pci_bus_id: str | None = None
    numa_node: int | None = None
    minor: int | None = None
    nvlinks: Mapping[int, int] = dataclasses.field(default_factory=dict)
    nvswitch_links: int = 0
    pcie_switch: int | None = None
    mig: tuple[str, ...] | None = None
    supported_events: int = _DEFAULT_EVENTS
    nvlink_unsupported: tuple[int, ...] = ()
    recovery_action: int | None = None

    def __post_init__(self) -> None:
        # Copies, so a caller's dict or list mutated later cannot change a frozen spec.
        object.__setattr__(self, "nvlinks", dict(self.nvlinks))
        object.__setattr__(self, "nvlink_unsupported", tuple(self.nvlink_unsupported))
        if self.mig is not None:
            object.__setattr__(self, "mig", tuple(self.mig))
        if self.compute_capability is not None:
            object.__setattr__(self, "compute_capability", tuple(self.compute_capability))

    def __hash__(self) -> int:
        # The generated hash would fail on the nvlinks dict; specs are values, so hash one.
        values = (getattr(self, field.name) for field in dataclasses.fields(self))
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v for v in values))


@dataclasses.dataclass(frozen=True)
class SimNodeSpec:
    """A simulated node: its GPUs in NVML index order.  Validated on construction:
    ``ValueError`` names the key path (``gpus[1].mig[0]``) and what is allowed.

    ``privileged`` is how the plugin's NVML calls are made (it is the caller's, not the
    node's, but a node file is what ``--simulate`` reads): ``False``, the default, as in
    a pod without SYS_ADMIN or the MIG monitor capability (``NVIDIA_MIG_MONITOR_DEVICES``
    unset); ``True`` as root or with that capability.  It only matters on MIG-enabled
    GPUs (see :meth:`SimulatedNVML.set_privileged`)."""

    name: str
    gpus: tuple[SimGpuSpec, ...]
    driver_version: str = "550.54.15"
    privileged: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", tuple(self.gpus))
        _resolve(self)  # validates; SimulatedNVML resolves again for its own state


class _SpecError(ValueError):
    """A bad node description: ``path`` is the key path, ``problem`` what is wrong."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


# --------------------------------------------------------------------------------------
# Resolution: a node description -> the simulator's GPUs


@dataclasses.dataclass(eq=False)
class _Mig:
    slot: int
    uuid: str
    profile: str
    gi: GiProfile
    ci_slices: int
    gi_id: int
    ci_id: int
    start: int  # placement, in memory slices
    # The CI profile index (NVML_COMPUTE_INSTANCE_PROFILE_*): the part's first offered
    # index with this many slices, so 1_SLICE before 1_SLICE_REV1 where both are offered.
    ci_index: int

    @property
    def ci_sms(self) -> int:
        if self.ci_slices == self.gi.slices:
            return self.gi.sms
        return self.ci_slices * (self.gi.sms // self.gi.slices)


@dataclasses.dataclass(eq=False)
class _Gpu:
    index: int
    name: str
    uuid: str
    memory_mib: int
    compute_capability: tuple[int, int]
    bus_id: str  # NVML form, upper-case hex
    minor: int
    numa_node: int | None
    pcie_switch: int | None
    links: tuple[int | None, ...]  # per active NVLink: peer GPU index, None for an NVSwitch
    unsupported_links: frozenset[int]  # link numbers that answer NOT_SUPPORTED
    nvlink_capable: bool
    nvswitches: int
    supported_events: int
    pci_device_id: int
    mig_profiles: tuple[GiProfile, ...]  # empty: not MIG-capable
    model: GpuModel | None  # None: a model the simulator does not know
    max_migs: int  # MIG devices the part holds at most (its compute slices)
    nvlink_count: int  # link numbers the part has: 0..nvlink_count-1 are valid
    spec_events: int  # the spec's supported_events, before the recovery-action bit
    mig_enabled: bool
    migs: tuple[_Mig, ...]
    # Mutable state, under SimulatedNVML's lock.
    lost: bool = False
    hung: bool = False  # calls naming it block until it is not
    retired_pages_pending: bool = False
    remap_pending: bool = False
    remapped_uncorrectable: int = 0
    remap_failed: bool = False  # permanent: a reset does not clear it
    # ECC counts: (uncorrected?, volatile?) -> errors.  Volatile ones reset with the GPU.
    ecc: dict[tuple[bool, bool], int] = dataclasses.field(default_factory=dict)
    recovery_action: int | None = None  # None: the driver does not report the field
    # NVML method name -> NVML_ERROR_* it fails with for this GPU (see fail()).
    failures: dict[str, int] = dataclasses.field(default_factory=dict)

    def link_number(self, nth: int) -> int:
        """The link number of the ``nth`` active link (counting past unsupported ones)."""
        numbers = [n for n in range(self.nvlink_count) if n not in self.unsupported_links]
        return numbers[nth]

    def active_link(self, link: int) -> int | None:
        """Which active link (0, 1, ...) link number ``link`` is, ``None`` if none."""
        if link in self.unsupported_links:
            return None
        nth = link - sum(1 for n in self.unsupported_links if n < link)
        return nth if nth < len(self.links) else None

    @property
    def row_remapping(self) -> bool:
        """Ampere and later remap rows; earlier GPUs retire pages instead."""
        return self.compute_capability >= (8, 0)


_BUS_ID = re.compile(r"([0-9A-Fa-f]{4}|[0-9A-Fa-f]{8}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})\.([0-7])")


def _parse_bus_id(value: str) -> tuple[int, int, int, int]:
    match = _BUS_ID.fullmatch(value)
    if match is None:
        raise ValueError(value)
    domain, bus, device, function = match.groups()
    return int(domain, 16), int(bus, 16), int(device, 16), int(function)


def _format_bus_id(domain: int, bus: int, device: int = 0, function: int = 0) -> str:
    return f"{domain:08X}:{bus:02X}:{device:02X}.{function}"


def _free_bus_ids(used: set[str]) -> Iterator[str]:
    """Bus IDs no GPU uses: first one bus every 8 (as on real boards), then any."""
    preferred = ((0, 0x07 + 8 * k) for k in range(31))
    rest = ((domain, bus) for domain in range(0x10000) for bus in range(1, 0x100))
    for domain, bus in itertools.chain(preferred, rest):
        candidate = _format_bus_id(domain, bus)
        if candidate not in used:
            used.add(candidate)
            yield candidate


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_mig(model: GpuModel, spec: str) -> tuple[GiProfile, int] | None:
    """(GI profile, CI slices) for a MIG device spec string, ``None`` if unknown."""
    match = re.fullmatch(r"(?:(\d+)c\.)?(.+)", spec)
    assert match is not None  # ".+" matches any non-empty string
    ci, gi_name = match.groups()
    gi = next((p for p in model.mig if p.name == gi_name), None)
    if gi is None:
        return None
    ci_slices = gi.slices if ci is None else int(ci)
    if ci_slices not in ci_slices_offered(model, gi) or (ci is not None and ci_slices == gi.slices):
        return None  # "7c.7g.40gb" is spelled "7g.40gb", as NVIDIA names it
    return gi, ci_slices


def _placements(model: GpuModel, gi: GiProfile) -> list[int]:
    """Memory-slice starts a GI of this profile may take: aligned to its memory size, with
    its compute slices inside the part's (on A100: no 2g at slice 6, no 1g at slice 7)."""
    return [s for s in range(0, model.memory_slices, gi.memory_slices)
            if s + gi.slices <= model.compute_slices]


def _gi_id(model: GpuModel, gi: GiProfile, start: int) -> int:
    """The driver's GPU instance ID: the swizzle ID of the memory slices it occupies (on
    A100: 0 all 8; 1-2 halves; 3-6 quarters; 7-14 eighths; A30 alike over 4)."""
    size = gi.memory_slices
    return model.memory_slices // size - 1 + start // size


def _place(model: GpuModel, profiles: list[GiProfile]) -> list[int] | None:
    """A start for each GI with no two sharing a compute or memory slice, or ``None``.

    The description is the final state, not a creation order (order matters on real
    GPUs: a 3g first at slice 0 strands a compute slice), so search all placements; seven
    devices with at most eight starts each is tiny."""
    starts: list[int] = []

    def search(i: int, compute: int, memory: int) -> bool:
        if i == len(profiles):
            return True
        gi = profiles[i]
        for start in _placements(model, gi):
            c = ((1 << gi.slices) - 1) << start
            m = ((1 << gi.memory_slices) - 1) << start
            if not (c & compute or m & memory):
                starts.append(start)
                if search(i + 1, compute | c, memory | m):
                    return True
                starts.pop()
        return False

    return starts if search(0, 0, 0) else None


def _resolve_mig(node: SimNodeSpec, i: int, spec: SimGpuSpec, model: GpuModel | None,
                 key: str) -> tuple[_Mig, ...]:
    if spec.mig is None:
        return ()
    if model is None or not model.mig:
        capable = ", ".join(n for n, m in MODELS.items() if m.mig)
        raise _SpecError(f"{key}.mig", f"{spec.name!r} has no MIG profile table; MIG is "
                                       f"simulated on: {capable} (use null for MIG off)")
    parsed: list[tuple[GiProfile, int]] = []
    for j, text_ in enumerate(spec.mig):
        found = _parse_mig(model, text_) if isinstance(text_, str) else None
        if found is None:
            raise _SpecError(f"{key}.mig[{j}]", f"unknown MIG profile {text_!r} for "
                                                f"{spec.name}; valid: {', '.join(mig_profile_names(model))}")
        parsed.append(found)
    for gi in model.mig:
        count = sum(1 for p, _ in parsed if p is gi)
        if count > gi.instances:
            raise _SpecError(f"{key}.mig", f"at most {gi.instances} × {gi.name} fit on "
                                           f"{spec.name}, not {count}")
    starts = _place(model, [gi for gi, _ in parsed])
    if starts is None:
        raise _SpecError(f"{key}.mig", f"{list(spec.mig)} do not fit on one {spec.name} "
                                       f"({model.compute_slices} compute slices, "
                                       f"{model.memory_slices} memory slices)")
    migs = []
    for slot, ((gi, ci_slices), start, text_) in enumerate(zip(parsed, starts, spec.mig)):
        mig_uuid = f"MIG-{uuidlib.uuid5(_UUID_NAMESPACE, f'{node.name}/{i}/mig{slot}')}"
        ci_index = next(i for i in model.ci_profiles if NVML_CI_PROFILE_SLICES.get(i) == ci_slices)
        # One CI per GI, so every CI ID is 0, as the driver's first CI in a GI gets.
        migs.append(_Mig(slot, mig_uuid, text_, gi, ci_slices, _gi_id(model, gi, start), 0, start,
                         ci_index))
    return tuple(migs)


def _resolve(node: SimNodeSpec) -> tuple[list[_Gpu], list[str]]:
    """The node's GPUs with every derived value filled in, and the NVSwitches' bus IDs.
    Raises :class:`_SpecError` for anything a real node could not look like."""
    if not isinstance(node.name, str) or not node.name:
        raise _SpecError("name", "must be a non-empty string")
    if not isinstance(node.driver_version, str) or not node.driver_version:
        raise _SpecError("driver_version", 'must be a non-empty string such as "550.54.15"')
    if not isinstance(node.privileged, bool):
        raise _SpecError("privileged", f"must be true or false, not {node.privileged!r}")
    gpus: list[_Gpu] = []
    uuids: dict[str, int] = {}
    minors: dict[int, int] = {}
    buses: dict[str, int] = {}
    for i, spec in enumerate(node.gpus):
        key = f"gpus[{i}]"
        if not isinstance(spec, SimGpuSpec):
            raise _SpecError(key, f"must be a SimGpuSpec, not {type(spec).__name__}")
        if not isinstance(spec.name, str) or not spec.name:
            raise _SpecError(f"{key}.model", "must be a non-empty string")
        model = MODELS.get(spec.name)
        unknown = f"required for {spec.name!r}, which is not a known model ({', '.join(MODELS)})"

        memory = spec.memory_mib
        if memory is None and model is not None:
            memory = model.memory_mib
        if memory is None:
            raise _SpecError(f"{key}.memory_mib", unknown)
        if not _is_int(memory) or memory <= 0:
            raise _SpecError(f"{key}.memory_mib", f"must be a positive integer, not {memory!r}")

        cc = spec.compute_capability
        if cc is None and model is not None:
            cc = model.compute_capability
        if cc is None:
            raise _SpecError(f"{key}.compute_capability", unknown)
        if len(cc) != 2 or not all(_is_int(v) and v >= 0 for v in cc):
            raise _SpecError(f"{key}.compute_capability", f"must be (major, minor), not {cc!r}")

        gpu_uuid = spec.uuid if spec.uuid is not None else (
            f"GPU-{uuidlib.uuid5(_UUID_NAMESPACE, f'{node.name}/{i}')}")
        if not isinstance(gpu_uuid, str) or not gpu_uuid.startswith("GPU-") or len(gpu_uuid) < 5:
            raise _SpecError(f"{key}.uuid", f'must be a string "GPU-...", not {gpu_uuid!r}')
        if gpu_uuid in uuids:
            raise _SpecError(f"{key}.uuid", f"{gpu_uuid} is also gpus[{uuids[gpu_uuid]}]'s")
        uuids[gpu_uuid] = i

        minor = spec.minor if spec.minor is not None else i
        if not _is_int(minor) or not 0 <= minor <= _MAX_MINOR:
            raise _SpecError(f"{key}.minor", f"must be an integer 0..{_MAX_MINOR} "
                                             f"(255 is nvidiactl), not {minor!r}")
        if minor in minors:
            raise _SpecError(f"{key}.minor", f"{minor} is also gpus[{minors[minor]}]'s")
        minors[minor] = i

        if spec.numa_node is not None and (not _is_int(spec.numa_node) or spec.numa_node < 0):
            raise _SpecError(f"{key}.numa_node", f"must be a non-negative integer or None "
                                                 f"(unknown), not {spec.numa_node!r}")
        if spec.pcie_switch is not None and not _is_int(spec.pcie_switch):
            raise _SpecError(f"{key}.pcie_switch", f"must be an integer or None, not {spec.pcie_switch!r}")
        if not _is_int(spec.supported_events) or not 0 <= spec.supported_events < 1 << 64:
            raise _SpecError(f"{key}.supported_events", "must be an event type bit mask (integer)")

        bus_id = ""
        if spec.pci_bus_id is not None:
            try:
                bus_id = _format_bus_id(*_parse_bus_id(spec.pci_bus_id))
            except (ValueError, TypeError):
                raise _SpecError(f"{key}.pci_bus_id", f'must look like "00000000:07:00.0", '
                                                      f"not {spec.pci_bus_id!r}") from None
            if bus_id in buses:
                raise _SpecError(f"{key}.pci_bus_id", f"{bus_id} is also gpus[{buses[bus_id]}]'s")
            buses[bus_id] = i

        links: list[int | None] = []
        for peer, count in spec.nvlinks.items():
            where = f"{key}.nvlinks[{peer!r}]"
            if not _is_int(peer) or not 0 <= peer < len(node.gpus) or peer == i:
                raise _SpecError(where, f"peer must be another GPU's index (0..{len(node.gpus) - 1}, "
                                        f"not {i} itself)")
            if not _is_int(count) or count < 1:
                raise _SpecError(where, f"link count must be a positive integer, not {count!r}")
        # Links are numbered peer by peer in index order, then the NVSwitch links.
        for peer, count in sorted(spec.nvlinks.items()):
            links.extend([peer] * count)
        if not _is_int(spec.nvswitch_links) or spec.nvswitch_links < 0:
            raise _SpecError(f"{key}.nvswitch_links", "must be a non-negative integer")
        links.extend([None] * spec.nvswitch_links)
        max_links = model.nvlinks if model is not None else pynvml.NVML_NVLINK_MAX_LINKS
        if len(links) > max_links:
            what = "nvlinks" if spec.nvlinks else "nvswitch_links"
            has = f"{spec.name} has no NVLink" if max_links == 0 else (
                f"{spec.name} has {max_links} NVLinks")
            raise _SpecError(f"{key}.{what}", f"{len(links)} active links, but {has}")

        # Link numbers run 0..max_links-1: the part's own count (an unknown model may use
        # every number NVML has, NVML_NVLINK_MAX_LINKS).
        unsupported = spec.nvlink_unsupported
        if max_links == 0 and unsupported:
            raise _SpecError(f"{key}.nvlink_unsupported", f"{spec.name} has no NVLink (its "
                                                          "link queries all say NOT_SUPPORTED)")
        if (not all(_is_int(n) and 0 <= n < max_links for n in unsupported)
                or len(set(unsupported)) != len(unsupported)):
            raise _SpecError(f"{key}.nvlink_unsupported", f"must be distinct link numbers "
                                                          f"0..{max_links - 1} ({spec.name}'s)")
        if len(links) + len(unsupported) > max_links:
            raise _SpecError(f"{key}.nvlink_unsupported", f"{len(links)} active links do not fit "
                                                          f"beside {len(unsupported)} unsupported "
                                                          f"link numbers in {spec.name}'s "
                                                          f"{max_links}")
        action = spec.recovery_action
        if action is not None and (not _is_int(action) or not 0 <= action < 2**32):
            raise _SpecError(f"{key}.recovery_action", "must be an NVML_GPU_RECOVERY_ACTION_* "
                                                       f"value (0 = NONE) or None, not {action!r}")
        events = spec.supported_events
        if action is not None:
            events |= EVENT_RECOVERY_ACTION  # drivers that report the field also signal it

        migs = _resolve_mig(node, i, spec, model, key)
        gpus.append(_Gpu(
            index=i, name=spec.name, uuid=gpu_uuid, memory_mib=memory,
            compute_capability=(cc[0], cc[1]), bus_id=bus_id, minor=minor,
            numa_node=spec.numa_node, pcie_switch=spec.pcie_switch, links=tuple(links),
            unsupported_links=frozenset(unsupported), recovery_action=action,
            nvlink_capable=bool(links) or (model is not None and model.nvlinks > 0),
            nvswitches=(model.nvswitches if model is not None and model.nvswitches else 6),
            supported_events=events,
            pci_device_id=model.pci_device_id if model is not None else 0x000010DE,
            mig_profiles=model.mig if model is not None else (), model=model,
            max_migs=model.compute_slices if model is not None else COMPUTE_SLICES,
            nvlink_count=max_links, spec_events=spec.supported_events,
            mig_enabled=spec.mig is not None, migs=migs))
        for mig in migs:
            uuids[mig.uuid] = i
    used = set(buses)
    free = _free_bus_ids(used)
    for gpu in gpus:
        if not gpu.bus_id:
            gpu.bus_id = next(free)
    switches = max((g.nvswitches for g in gpus if None in g.links), default=0)
    return gpus, [next(free) for _ in range(switches)]


# --------------------------------------------------------------------------------------
# Presets


def _bus(bus: int) -> str:
    return _format_bus_id(0, bus)


def _dgx1_nvlinks() -> list[dict[int, int]]:
    pairs = {(0, 1): 1, (0, 2): 1, (0, 3): 2, (0, 4): 2, (1, 2): 2, (1, 3): 1, (1, 5): 2,
             (2, 3): 2, (2, 6): 1, (3, 7): 1, (4, 5): 1, (4, 6): 1, (4, 7): 2, (5, 6): 2,
             (5, 7): 1, (6, 7): 2}
    links: list[dict[int, int]] = [{} for _ in range(8)]
    for (a, b), count in pairs.items():
        links[a][b] = count
        links[b][a] = count
    return links


def _presets() -> dict[str, SimNodeSpec]:
    a100, h100, v100, t4 = ("NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3",
                            "Tesla V100-SXM2-16GB", "Tesla T4")
    dgx1 = _dgx1_nvlinks()
    mig = (("3g.20gb", "2g.10gb", "1g.5gb", "1g.5gb"), ("7g.40gb",), ("1g.5gb",) * 7,
           ("4g.20gb", "2g.10gb", "1g.5gb+me"))
    nodes = [
        SimNodeSpec("dgx-a100", tuple(
            SimGpuSpec(a100, pci_bus_id=_bus(b), numa_node=i // 4, pcie_switch=i // 2,
                       nvswitch_links=12)
            for i, b in enumerate((0x07, 0x0F, 0x47, 0x4E, 0x87, 0x90, 0xB7, 0xBD)))),
        SimNodeSpec("dgx-1", tuple(
            SimGpuSpec(v100, pci_bus_id=_bus(b), numa_node=i // 4, pcie_switch=i // 2,
                       nvlinks=dgx1[i])
            for i, b in enumerate((0x06, 0x07, 0x0A, 0x0B, 0x85, 0x86, 0x89, 0x8A)))),
        SimNodeSpec("pcie-4", tuple(
            SimGpuSpec(t4, pci_bus_id=_bus(b), numa_node=i // 2)
            for i, b in enumerate((0x3B, 0x5E, 0xAF, 0xD8)))),
        SimNodeSpec("a100-mig", tuple(
            SimGpuSpec(a100, pci_bus_id=_bus(b), numa_node=i // 2, mig=mig[i])
            for i, b in enumerate((0x07, 0x0F, 0x87, 0x90)))),
        SimNodeSpec("dgx-h100", tuple(
            SimGpuSpec(h100, pci_bus_id=_bus(b), numa_node=i // 4, nvswitch_links=18)
            for i, b in enumerate((0x1B, 0x43, 0x52, 0x61, 0x9D, 0xC3, 0xD1, 0xDF)))),
        SimNodeSpec("single-t4", (SimGpuSpec(t4, pci_bus_id=_bus(0x3B), numa_node=0),)),
    ]
    return {node.name: node for node in nodes}


#: Named simulated nodes (``node_from("dgx-a100")``); GPU UUIDs derive from the name.
PRESETS: Final[dict[str, SimNodeSpec]] = _presets()


# --------------------------------------------------------------------------------------
# Node files

_NODE_KEYS: Final = ("name", "driver_version", "privileged", "gpus")
_GPU_KEYS: Final = ("model", "uuid", "memory_mib", "compute_capability", "pci_bus_id",
                    "numa_node", "minor", "nvlinks", "nvswitch_links", "pcie_switch", "mig",
                    "supported_events", "nvlink_unsupported", "recovery_action")


class _Reader:
    """Checks one node file's document; every error names the file and the key path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ValueError(f"{self.where}: {key}: {problem}" if key else f"{self.where}: {problem}")

    def mapping(self, value: object, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping with keys {', '.join(allowed)}; got {_kind(value)}")
        for name in value:
            if name not in allowed:
                near = difflib.get_close_matches(str(name), allowed, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                here = f"{key}.{name}" if key else str(name)
                self.fail(here, f"unknown key{hint}; allowed: {', '.join(allowed)}")
        return value

    def string(self, value: object, key: str, example: str) -> str:
        if not isinstance(value, str) or not value:
            hint = " (quote it: YAML read it as a number)" if isinstance(value, (int, float)) else ""
            self.fail(key, f"must be a string such as {example}{hint}; got {value!r}")
        return value

    def integer(self, value: object, key: str, minimum: int | None = 0) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and (
                minimum is None or value >= minimum):
            return value
        what = "an integer" if minimum is None else (
            "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}")
        self.fail(key, f"must be {what}; got {value!r}")

    def optional_integer(self, value: object, key: str, minimum: int | None = 0) -> int | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and (
                minimum is None or value >= minimum):
            return value
        what = "an integer" if minimum is None else f"an integer >= {minimum}"
        self.fail(key, f"must be {what} or null; got {value!r}")

    def gpu(self, value: object, key: str) -> SimGpuSpec:
        raw = self.mapping(value, key, _GPU_KEYS)
        fields: dict[str, Any] = {}
        if "model" in raw:
            fields["name"] = self.string(raw["model"], f"{key}.model", '"NVIDIA A100-SXM4-40GB"')
        if "uuid" in raw:
            fields["uuid"] = self.string(raw["uuid"], f"{key}.uuid", '"GPU-..."')
        if "memory_mib" in raw:
            fields["memory_mib"] = self.integer(raw["memory_mib"], f"{key}.memory_mib", 1)
        if "compute_capability" in raw:
            fields["compute_capability"] = self.compute_capability(
                raw["compute_capability"], f"{key}.compute_capability")
        if "pci_bus_id" in raw:
            value = raw["pci_bus_id"]
            if isinstance(value, (int, float)):
                # YAML 1.1 reads unquoted 00000000:07:00.0 as a base-60 number.
                self.fail(f"{key}.pci_bus_id", 'must be a quoted string such as '
                                               '"00000000:07:00.0" (unquoted, YAML reads it as a number)')
            fields["pci_bus_id"] = self.string(value, f"{key}.pci_bus_id", '"00000000:07:00.0"')
        if "numa_node" in raw:
            numa = self.optional_integer(raw["numa_node"], f"{key}.numa_node", -1)
            fields["numa_node"] = None if numa == -1 else numa  # sysfs spells unknown -1
        for name in ("minor", "nvswitch_links", "supported_events"):
            if name in raw:
                fields[name] = self.integer(raw[name], f"{key}.{name}")
        if "pcie_switch" in raw:
            fields["pcie_switch"] = self.optional_integer(raw["pcie_switch"], f"{key}.pcie_switch",
                                                          None)
        if "nvlinks" in raw:
            fields["nvlinks"] = self.nvlinks(raw["nvlinks"], f"{key}.nvlinks")
        if "mig" in raw:
            fields["mig"] = self.mig(raw["mig"], f"{key}.mig")
        if "nvlink_unsupported" in raw:
            links = raw["nvlink_unsupported"]
            if not isinstance(links, list):
                self.fail(f"{key}.nvlink_unsupported", f"must be a list of link numbers; got {_kind(links)}")
            fields["nvlink_unsupported"] = tuple(
                self.integer(n, f"{key}.nvlink_unsupported[{j}]") for j, n in enumerate(links))
        if "recovery_action" in raw:
            fields["recovery_action"] = self.optional_integer(
                raw["recovery_action"], f"{key}.recovery_action")
        return SimGpuSpec(**fields)

    def compute_capability(self, value: object, key: str) -> tuple[int, int]:
        if isinstance(value, float):
            value = repr(value)  # YAML reads unquoted 7.5 as a float
        if isinstance(value, str):
            match = re.fullmatch(r"(\d+)\.(\d+)", value.strip())
            if match:
                return int(match[1]), int(match[2])
        elif isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v >= 0 for v in value):
            return value[0], value[1]
        self.fail(key, f'must be "major.minor" (e.g. "8.0") or [major, minor]; got {value!r}')

    def nvlinks(self, value: object, key: str) -> dict[int, int]:
        if not isinstance(value, dict):
            self.fail(key, f"must be a mapping peer GPU index -> link count, e.g. {{1: 12}}; "
                           f"got {_kind(value)}")
        links: dict[int, int] = {}
        for peer, count in value.items():
            if isinstance(peer, str) and peer.isdigit():
                peer = int(peer)  # JSON object keys are strings
            if not isinstance(peer, int) or isinstance(peer, bool):
                self.fail(f"{key}[{peer!r}]", "peer must be a GPU index")
            links[peer] = self.integer(count, f"{key}[{peer}]", 1)
        return links

    def mig(self, value: object, key: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            self.fail(key, f"must be a list of MIG profiles (e.g. [3g.20gb, 1g.5gb]), [] for "
                           f"MIG on with no devices, or null for MIG off; got {_kind(value)}")
        return tuple(self.string(v, f"{key}[{j}]", '"1g.5gb"') for j, v in enumerate(value))


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), repr(value))


def _parse_document(path: pathlib.Path, source: str) -> object:
    """The file's document: JSON for ``.json`` files, else YAML (which reads JSON too),
    with JSON's clearer message for JSON-looking text YAML rejects."""
    if path.suffix.lower() == ".json":
        try:
            return json.loads(source)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} "
                             f"column {exc.colno}") from None
    import yaml  # only for node files: the plugin's own footprint stays without it

    try:
        return yaml.safe_load(source)
    except yaml.YAMLError as yaml_error:
        if source.lstrip().startswith(("{", "[")):
            try:
                # YAML 1.1 rejects some JSON (tabs, for one): JSON decides, and explains.
                return json.loads(source)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} "
                                 f"column {exc.colno}") from None
        raise ValueError(f"{path}: not valid YAML: {yaml_error}") from None


def load_node_file(path: str | os.PathLike[str]) -> SimNodeSpec:
    """A node described by a YAML or JSON file (README: "Simulated node files")::

        name: my-node                 # optional: the file's stem
        driver_version: "550.54.15"   # optional
        privileged: false             # optional: NVML calls as a pod without SYS_ADMIN
        gpus:
          - model: NVIDIA A100-SXM4-40GB
            numa_node: 0
            nvlinks: {1: 12}
            mig: [3g.20gb, 2g.10gb]

    Raises ``ValueError`` naming the file, the key path (``gpus[1].numa_node``) and what
    is allowed; unknown keys are errors, so a typo cannot pass silently.
    """
    file = pathlib.Path(path)
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: cannot read node file: {exc}") from exc
    reader = _Reader(str(file))
    document = _parse_document(file, source)
    if document is None:
        reader.fail("", "empty; expected a mapping with key 'gpus'")
    raw = reader.mapping(document, "", _NODE_KEYS)
    if "gpus" not in raw:
        reader.fail("gpus", "missing: a list of GPUs (may be empty)")
    if not isinstance(raw["gpus"], list):
        reader.fail("gpus", f"must be a list of GPUs; got {_kind(raw['gpus'])}")
    name = reader.string(raw.get("name", file.stem), "name", '"my-node"')
    driver = reader.string(raw.get("driver_version", "550.54.15"), "driver_version", '"550.54.15"')
    privileged = raw.get("privileged", False)
    if not isinstance(privileged, bool):
        reader.fail("privileged", f"must be true or false; got {privileged!r}")
    gpus = tuple(reader.gpu(g, f"gpus[{i}]") for i, g in enumerate(raw["gpus"]))
    try:
        return SimNodeSpec(name, gpus, driver, privileged)
    except _SpecError as exc:
        reader.fail(exc.path, exc.problem)


def node_from(spec_or_preset_or_path: str) -> SimNodeSpec:
    """A preset by name (:data:`PRESETS`), or a node file by path; ``ValueError`` listing
    the presets otherwise."""
    if spec_or_preset_or_path in PRESETS:
        return PRESETS[spec_or_preset_or_path]
    if os.path.isfile(spec_or_preset_or_path):
        return load_node_file(spec_or_preset_or_path)
    raise ValueError(f"{spec_or_preset_or_path!r} is neither a preset "
                     f"({', '.join(PRESETS)}) nor an existing node file")


# --------------------------------------------------------------------------------------
# Handles


class _Handle:
    __slots__ = ("owner",)

    def __init__(self, owner: SimulatedNVML) -> None:
        self.owner = owner


class _GpuHandle(_Handle):
    __slots__ = ("index",)

    def __init__(self, owner: SimulatedNVML, index: int) -> None:
        super().__init__(owner)
        self.index = index

    def __repr__(self) -> str:
        return f"<simulated nvmlDevice_t GPU {self.index}>"


class _MigHandle(_Handle):
    __slots__ = ("index", "slot")

    def __init__(self, owner: SimulatedNVML, index: int, slot: int) -> None:
        super().__init__(owner)
        self.index = index
        self.slot = slot

    def __repr__(self) -> str:
        return f"<simulated nvmlDevice_t MIG {self.index}:{self.slot}>"


class _GpuInstance(_Handle):
    __slots__ = ("index", "slot")

    def __init__(self, owner: SimulatedNVML, index: int, slot: int) -> None:
        super().__init__(owner)
        self.index = index
        self.slot = slot

    def __repr__(self) -> str:
        return f"<simulated nvmlGpuInstance_t {self.index}:{self.slot}>"


class _ComputeInstance(_GpuInstance):
    __slots__ = ()

    def __repr__(self) -> str:
        return f"<simulated nvmlComputeInstance_t {self.index}:{self.slot}>"


class _EventSet(_Handle):
    __slots__ = ("freed", "queue", "registered", "waiters")

    def __init__(self, owner: SimulatedNVML) -> None:
        super().__init__(owner)
        self.freed = False
        self.queue: collections.deque[SimEventData] = collections.deque()
        self.registered: dict[int, int] = {}  # GPU index -> event type mask
        self.waiters = 0

    def __repr__(self) -> str:
        return f"<simulated nvmlEventSet_t{' (freed)' if self.freed else ''}>"


def _write_out(items_ref: Any, count_ref: Any, found: list[Any]) -> None:
    """Fill a C-style call's out parameters: ``found`` into ``items_ref`` and its length
    into ``count_ref`` (a ctypes integer, or ``byref()`` of one); ``InvalidArgument``
    for a missing or too small buffer, as NVML answers a bad pointer or count, before
    anything is written."""
    count = getattr(count_ref, "_obj", count_ref)  # byref() keeps the object in _obj
    if items_ref is None or not hasattr(count, "value"):
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    try:
        if len(items_ref) < len(found):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for i, item in enumerate(found):
            items_ref[i] = item
    except TypeError:
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT) from None
    count.value = len(found)


def _failures(calls: Iterable[str] | str, code: object, valid: tuple[str, ...],
              what: str) -> list[str]:
    """The call names of a ``fail``/``fail_node`` request, checked with its ``code``:
    ``ValueError`` listing the ``valid`` names, or saying what a code must be."""
    names = [calls] if isinstance(calls, str) else list(calls)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"not {what}: {unknown or 'none given'}; valid: {', '.join(valid)}")
    if not isinstance(code, int) or isinstance(code, bool) or code <= 0:
        raise ValueError(f"code must be an NVML_ERROR_* value (a positive integer, e.g. "
                         f"{pynvml.NVML_ERROR_GPU_IS_LOST} for GPU_IS_LOST), not {code!r}")
    return names


def _error(code: int) -> Exception:
    """pynvml's own exception for an NVML return code (``NVMLError_NotFound``...)."""
    error: Exception = pynvml.NVMLError(code)
    return error


# --------------------------------------------------------------------------------------
# The simulator


class SimulatedNVML:
    """The :class:`~trio_gpu_plugin._nvml.NVML` protocol over a simulated node.

    Args:
        node: the node (see :data:`PRESETS`, :func:`load_node_file`).
        init_error: an ``NVML_ERROR_*`` code ``nvmlInit`` raises (e.g.
            ``pynvml.NVML_ERROR_LIBRARY_NOT_FOUND``), as on a node without a driver.
        privileged: whether the caller is privileged (:meth:`set_privileged`); ``None``
            (the default) takes the node's :attr:`SimNodeSpec.privileged`, which is
            ``False`` unless a node file says otherwise.

    Thread-safe: NVML calls come from worker threads while tests inject faults from the
    trio thread.  For assertions: :attr:`init_count`, :attr:`open_event_sets`,
    :attr:`freed_while_waiting`, :attr:`waiting`, and :attr:`calls` (method name ->
    number of calls).
    """

    def __init__(self, node: SimNodeSpec, *, init_error: int | None = None,
                 privileged: bool | None = None) -> None:
        self.node = node
        self._privileged = node.privileged if privileged is None else bool(privileged)
        self._shutdown_under_live_call = 0
        self._node_failures: dict[str, int] = {}  # fail_node: call name -> NVML_ERROR_*
        self._in_calls = 0  # threads inside a call that released the lock (hung, waiting)
        self._current = ""  # the NVML method being served (lock held)
        self._gpus, self._nvswitch_buses = _resolve(node)
        self._cond = threading.Condition(threading.Lock())
        self._init_count = 0
        self._init_error = init_error
        self._down = False
        self._open_sets = 0
        self._freed_while_waiting = 0
        self._waiting = 0
        self._blocked = 0
        #: NVML method name -> calls so far (failed ones included).
        self.calls: collections.Counter[str] = collections.Counter()
        self._sets: list[_EventSet] = []  # live (not freed) event sets
        self._handles = [_GpuHandle(self, g.index) for g in self._gpus]
        self._mig_handles = [[_MigHandle(self, g.index, m.slot) for m in g.migs] for g in self._gpus]

    # -- test-facing state -------------------------------------------------------------

    @property
    def init_count(self) -> int:
        """``nvmlInit`` calls not yet matched by ``nvmlShutdown``."""
        with self._cond:
            return self._init_count

    @property
    def open_event_sets(self) -> int:
        """Event sets created and not freed."""
        with self._cond:
            return self._open_sets

    @property
    def freed_while_waiting(self) -> int:
        """``nvmlEventSetFree`` calls on a set a thread was waiting on (a use-after-free
        in real NVML: our code must never do it)."""
        with self._cond:
            return self._freed_while_waiting

    @property
    def waiting(self) -> int:
        """Threads blocked in ``nvmlEventSetWait_v2`` now."""
        with self._cond:
            return self._waiting

    @property
    def shutdown_under_live_call(self) -> int:
        """``nvmlShutdown`` calls that dropped the last reference while a thread was
        still inside a call (blocked on a hung GPU, or waiting for events): in real NVML
        that frees what the call is using.  Our code must never do it."""
        with self._cond:
            return self._shutdown_under_live_call

    @property
    def privileged(self) -> bool:
        """Whether calls come from a privileged caller (see :meth:`set_privileged`)."""
        with self._cond:
            return self._privileged

    def set_privileged(self, privileged: bool) -> None:
        """Privileged (root with SYS_ADMIN, or the MIG monitor capability that
        ``NVIDIA_MIG_MONITOR_DEVICES=all`` gives) or not (the default, as a pod without
        them).  Unprivileged, on a MIG-enabled GPU: ``nvmlDeviceGetMemoryInfo`` on the
        parent handle, ``nvmlDeviceGetGpuInstanceById``, ``nvmlDeviceGetGpuInstances``,
        ``nvmlGpuInstanceGetComputeInstanceById`` and
        ``nvmlGpuInstanceGetComputeInstances`` answer NO_PERMISSION (NVML API
        reference); MIG device handles by index, their UUID, name, memory, GI/CI IDs and
        attributes, and the profile tables answer anyone.  GPUs with MIG off answer
        anyone."""
        with self._cond:
            self._privileged = privileged

    @property
    def blocked(self) -> int:
        """Threads blocked now in a call on a hung GPU (see :meth:`hang`)."""
        with self._cond:
            return self._blocked

    # -- internals (lock held) ---------------------------------------------------------

    def _block_while_hung(self, gpu: _Gpu) -> None:
        """Wait (releasing the lock) while ``gpu`` is hung: the call that named it does
        not return, as with a GPU wedged in the driver.  The driver going away
        (:meth:`nvml_down`) does not free it: real hung calls do not notice either."""
        if not gpu.hung:
            return
        self._blocked += 1
        self._in_calls += 1
        try:
            while gpu.hung:
                self._cond.wait()
        finally:
            self._blocked -= 1
            self._in_calls -= 1
        if self._init_count == 0:
            # Torn down while this call was inside: it comes back to nothing.
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _check_failure(self, gpu: _Gpu, name: str) -> None:
        """Fail a call injected to fail for this GPU (see :meth:`fail`)."""
        code = gpu.failures.get(name)
        if code is not None:
            raise _error(code)

    def _refuse_unprivileged(self) -> None:
        if not self._privileged:
            raise _error(pynvml.NVML_ERROR_NO_PERMISSION)

    def _enter(self, name: str) -> None:
        """Count a call and fail it as NVML would when the library is unusable."""
        self.calls[name] += 1
        self._current = name
        if self._init_count == 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        if self._down:
            raise _error(pynvml.NVML_ERROR_UNKNOWN)
        code = self._node_failures.get(name)
        if code is not None:
            raise _error(code)

    def _device(self, handle: object) -> tuple[_Gpu, _Mig | None]:
        if isinstance(handle, (_GpuHandle, _MigHandle)) and handle.owner is self:
            name = self._current
            gpu = self._gpus[handle.index]
            self._block_while_hung(gpu)
            if gpu.lost:
                raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
            self._check_failure(gpu, name)
            return gpu, gpu.migs[handle.slot] if isinstance(handle, _MigHandle) else None
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def _gpu(self, handle: object) -> _Gpu:
        """A physical GPU's handle; a MIG handle is NOT_SUPPORTED (a valid device that
        cannot do this)."""
        gpu, mig = self._device(handle)
        if mig is not None:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def _mig(self, handle: object) -> tuple[_Gpu, _Mig]:
        gpu, mig = self._device(handle)
        if mig is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu, mig

    def _instance(self, instance: object, kind: type[_GpuInstance]) -> tuple[_Gpu, _Mig]:
        if isinstance(instance, kind) and type(instance) is kind and instance.owner is self:
            gpu = self._gpus[instance.index]
            self._block_while_hung(gpu)
            if gpu.lost:
                raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
            self._check_failure(gpu, self._current)
            return gpu, gpu.migs[instance.slot]
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def _event_set(self, event_set: object) -> _EventSet:
        if not isinstance(event_set, _EventSet) or event_set.owner is not self:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if event_set.freed:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        return event_set

    def _pci(self, bus_id: str, device_id: int) -> SimPciInfo:
        domain, bus, device, _ = _parse_bus_id(bus_id)
        raw = bus_id.encode()
        return SimPciInfo(busIdLegacy=raw[4:], domain=domain, bus=bus, device=device,
                          pciDeviceId=device_id, pciSubSystemId=0x145F10DE, busId=raw)

    # -- library -----------------------------------------------------------------------

    def nvmlInit(self) -> None:
        """Initialise (reference-counted, like ``nvmlInit_v2``)."""
        with self._cond:
            self.calls["nvmlInit"] += 1
            if self._init_error is not None:
                raise _error(self._init_error)
            if self._down:
                raise _error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
            self._init_count += 1

    def nvmlShutdown(self) -> None:
        """Drop one reference; the last one invalidates every handle and event set.
        While the driver is down (:meth:`nvml_down`) the reference still drops, then the
        call reports ``NVMLError_Unknown``, so teardown stays countable."""
        with self._cond:
            self.calls["nvmlShutdown"] += 1
            if self._init_count == 0:
                raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
            self._init_count -= 1
            if self._init_count == 0 and (self._in_calls or self._waiting):
                self._shutdown_under_live_call += 1
            self._cond.notify_all()  # waiters on a now-uninitialised library must wake
            if self._down:
                raise _error(pynvml.NVML_ERROR_UNKNOWN)

    def nvmlSystemGetDriverVersion(self) -> str:
        """The driver version, e.g. ``550.54.15``."""
        with self._cond:
            self._enter("nvmlSystemGetDriverVersion")
            return self.node.driver_version

    # -- devices -----------------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        """The number of GPUs (lost ones included, as NVML still counts them)."""
        with self._cond:
            self._enter("nvmlDeviceGetCount")
            return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        """A GPU's handle by NVML index."""
        with self._cond:
            self._enter("nvmlDeviceGetHandleByIndex")
            if not _is_int(index) or not 0 <= index < len(self._gpus):
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            self._block_while_hung(self._gpus[index])
            if self._gpus[index].lost:
                raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
            self._check_failure(self._gpus[index], "nvmlDeviceGetHandleByIndex")
            return self._handles[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:
        """A GPU's or MIG device's handle by UUID."""
        with self._cond:
            self._enter("nvmlDeviceGetHandleByUUID")
            wanted = text(uuid) if isinstance(uuid, (str, bytes)) else None
            for gpu in self._gpus:
                found: Any = None
                if gpu.uuid == wanted:
                    found = self._handles[gpu.index]
                for mig in gpu.migs:
                    if mig.uuid == wanted:
                        found = self._mig_handles[gpu.index][mig.slot]
                if found is not None:
                    self._block_while_hung(gpu)
                    if gpu.lost:
                        raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
                    self._check_failure(gpu, "nvmlDeviceGetHandleByUUID")
                    return found
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        """``GPU-...`` or ``MIG-...``."""
        with self._cond:
            self._enter("nvmlDeviceGetUUID")
            gpu, mig = self._device(handle)
            return mig.uuid if mig is not None else gpu.uuid

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        """A GPU's NVML index."""
        with self._cond:
            self._enter("nvmlDeviceGetIndex")
            return self._gpu(handle).index

    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        """A GPU's device minor (``/dev/nvidia<minor>``)."""
        with self._cond:
            self._enter("nvmlDeviceGetMinorNumber")
            return self._gpu(handle).minor

    def nvmlDeviceGetName(self, handle: Any) -> str:
        """The product name; a MIG device's adds ``MIG <profile>``, as NVML's does."""
        with self._cond:
            self._enter("nvmlDeviceGetName")
            gpu, mig = self._device(handle)
            return f"{gpu.name} MIG {mig.profile}" if mig is not None else gpu.name

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        """Memory in bytes: the whole framebuffer, or a MIG device's slice."""
        with self._cond:
            self._enter("nvmlDeviceGetMemoryInfo")
            gpu, mig = self._device(handle)
            if mig is None and gpu.mig_enabled:
                # NVML API reference: in MIG mode a GPU handle's aggregate is given only
                # to a caller with appropriate privileges; MIG handles give their own.
                self._refuse_unprivileged()
            total = (mig.gi.memory_mb if mig is not None else gpu.memory_mib) * _MIB
            return SimMemoryInfo(total=total, free=total, used=0)

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        """PCI information; ``busId`` is bytes (``b"00000000:07:00.0"``)."""
        with self._cond:
            self._enter("nvmlDeviceGetPciInfo")
            gpu = self._gpu(handle)
            return self._pci(gpu.bus_id, gpu.pci_device_id)

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        """``(major, minor)``; a MIG device reports its parent's."""
        with self._cond:
            self._enter("nvmlDeviceGetCudaComputeCapability")
            return self._device(handle)[0].compute_capability

    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int:
        """1 for an active link, 0 for an inactive one; ``InvalidArgument`` for a link
        number past the part's link count (A100: 12, H100: 18; an unknown model:
        NVML_NVLINK_MAX_LINKS); ``NotSupported`` on GPUs without NVLink and for the
        spec's ``nvlink_unsupported`` link numbers (which may come before active ones)."""
        with self._cond:
            self._enter("nvmlDeviceGetNvLinkState")
            gpu = self._gpu(handle)
            if not gpu.nvlink_capable:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            if not _is_int(link) or not 0 <= link < gpu.nvlink_count:
                # Past the part's own links, not NVML_NVLINK_MAX_LINKS (see the table).
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if link in gpu.unsupported_links:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return 1 if gpu.active_link(link) is not None else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: Any, link: int) -> Any:
        """The PCI information of what an active link ends at: the peer GPU, or an
        NVSwitch (whose bus ID matches no GPU).  Inactive links are ``NotSupported``."""
        with self._cond:
            self._enter("nvmlDeviceGetNvLinkRemotePciInfo")
            gpu = self._gpu(handle)
            if not gpu.nvlink_capable:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            if not _is_int(link) or not 0 <= link < gpu.nvlink_count:
                # Past the part's own links, not NVML_NVLINK_MAX_LINKS (see the table).
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            nth_link = gpu.active_link(link)
            if nth_link is None:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            peer = gpu.links[nth_link]
            if peer is not None:
                other = self._gpus[peer]
                return self._pci(other.bus_id, other.pci_device_id)
            # Spread switch links over the baseboard's NVSwitches, as HGX boards wire them.
            nth = nth_link - gpu.links.index(None)
            return self._pci(self._nvswitch_buses[nth % gpu.nvswitches], 0x1AF110DE)

    def nvmlDeviceGetTopologyCommonAncestor(self, handle1: Any, handle2: Any) -> int:
        """NVML's PCIe level: 0 same GPU, 10 one PCIe switch, 40 same NUMA node, 50
        across NUMA nodes (or unknown)."""
        with self._cond:
            self._enter("nvmlDeviceGetTopologyCommonAncestor")
            a, b = self._gpu(handle1), self._gpu(handle2)
            if a is b:
                return int(pynvml.NVML_TOPOLOGY_INTERNAL)
            if a.pcie_switch is not None and a.pcie_switch == b.pcie_switch:
                return int(pynvml.NVML_TOPOLOGY_SINGLE)
            if a.numa_node is not None and a.numa_node == b.numa_node:
                return int(pynvml.NVML_TOPOLOGY_NODE)
            return int(pynvml.NVML_TOPOLOGY_SYSTEM)

    # -- MIG ---------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        """``[current, pending]``; ``NotSupported`` on GPUs without MIG."""
        with self._cond:
            self._enter("nvmlDeviceGetMigMode")
            gpu = self._gpu(handle)
            if not gpu.mig_profiles:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            mode = int(gpu.mig_enabled)
            return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        """The part's compute slices with MIG on (7; A30: 4), the most MIG devices it
        holds; 0 when MIG is off or unsupported (NVML's documented answer)."""
        with self._cond:
            self._enter("nvmlDeviceGetMaxMigDeviceCount")
            gpu = self._gpu(handle)
            return gpu.max_migs if gpu.mig_enabled else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any:
        """The MIG device in a slot: ``NotFound`` for an empty slot below the maximum,
        ``InvalidArgument`` beyond it (or with MIG off)."""
        with self._cond:
            self._enter("nvmlDeviceGetMigDeviceHandleByIndex")
            gpu = self._gpu(handle)
            if not gpu.mig_profiles:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            limit = gpu.max_migs if gpu.mig_enabled else 0
            if not _is_int(index) or not 0 <= index < limit:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if index >= len(gpu.migs):
                raise _error(pynvml.NVML_ERROR_NOT_FOUND)
            return self._mig_handles[gpu.index][index]

    def nvmlDeviceIsMigDeviceHandle(self, handle: Any) -> int:
        """1 for a MIG device's handle, 0 for a GPU's."""
        with self._cond:
            self._enter("nvmlDeviceIsMigDeviceHandle")
            return int(self._device(handle)[1] is not None)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any) -> Any:
        """A MIG device's parent GPU."""
        with self._cond:
            self._enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
            return self._handles[self._mig(handle)[0].index]

    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int:
        """A MIG device's GPU instance ID; ``InvalidArgument`` for a GPU handle."""
        with self._cond:
            self._enter("nvmlDeviceGetGpuInstanceId")
            return self._mig(handle)[1].gi_id

    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int:
        """A MIG device's compute instance ID; ``InvalidArgument`` for a GPU handle."""
        with self._cond:
            self._enter("nvmlDeviceGetComputeInstanceId")
            return self._mig(handle)[1].ci_id

    def nvmlDeviceGetAttributes(self, handle: Any) -> Any:
        """A MIG device's attributes (slices, memory, SMs); ``NotSupported`` for GPUs."""
        with self._cond:
            self._enter("nvmlDeviceGetAttributes")
            mig = self._device(handle)[1]
            if mig is None:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            gi = mig.gi
            return SimDeviceAttributes(
                multiprocessorCount=mig.ci_sms, sharedCopyEngineCount=gi.copy_engines,
                sharedDecoderCount=gi.decoders, sharedEncoderCount=0,
                sharedJpegCount=gi.jpegs, sharedOfaCount=gi.ofas,
                gpuInstanceSliceCount=gi.slices, computeInstanceSliceCount=mig.ci_slices,
                memorySizeMB=gi.memory_mb)

    def nvmlDeviceGetGpuInstanceById(self, handle: Any, gpu_instance_id: int) -> Any:
        """A GPU instance of a MIG-enabled GPU by ID; ``NotFound`` if none has it."""
        with self._cond:
            self._enter("nvmlDeviceGetGpuInstanceById")
            gpu = self._gpu(handle)
            if not gpu.mig_enabled:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            self._refuse_unprivileged()  # NVML API reference: "Requires privileged user"
            for mig in gpu.migs:
                if mig.gi_id == gpu_instance_id:
                    return _GpuInstance(self, gpu.index, mig.slot)
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetGpuInstances(self, device: Any, profileId: int, gpuInstancesRef: Any,
                                  countRef: Any) -> int:
        """The GPU instances of one GI profile (by profile ID, as
        ``nvmlDeviceGetGpuInstanceProfileInfo`` reports it), written as pynvml's C-style
        call writes them: the instances into ``gpuInstancesRef[0..]`` (here a list or any
        sequence that takes item assignment: a ctypes array of ``c_nvmlGpuInstance_t``
        cannot hold a simulated handle) and their count into ``countRef`` (a ``c_uint``
        or ``byref()`` of one).  Privileged, as ``nvmlDeviceGetGpuInstanceById`` is."""
        with self._cond:
            self._enter("nvmlDeviceGetGpuInstances")
            gpu = self._gpu(device)
            if not gpu.mig_enabled:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            self._refuse_unprivileged()  # NVML API reference: "Requires privileged user"
            profile = next((p for p in gpu.mig_profiles if p.id == profileId), None)
            if profile is None:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            found = [_GpuInstance(self, gpu.index, m.slot) for m in gpu.migs if m.gi is profile]
            _write_out(gpuInstancesRef, countRef, found)
            return int(pynvml.NVML_SUCCESS)

    def nvmlGpuInstanceGetInfo(self, gpu_instance: Any) -> Any:
        """A GPU instance's ID, profile ID and placement."""
        with self._cond:
            self._enter("nvmlGpuInstanceGetInfo")
            gpu, mig = self._instance(gpu_instance, _GpuInstance)
            return SimGpuInstanceInfo(device=self._handles[gpu.index], id=mig.gi_id,
                                      profileId=mig.gi.id,
                                      placement=SimPlacement(mig.start, mig.gi.memory_slices))

    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: Any, profile: int) -> Any:
        """A GPU instance profile by index (``NVML_GPU_INSTANCE_PROFILE_*``):
        ``NotSupported`` for indexes the model lacks, ``InvalidArgument`` out of range."""
        with self._cond:
            self._enter("nvmlDeviceGetGpuInstanceProfileInfo")
            gpu = self._gpu(handle)
            if not _is_int(profile) or not 0 <= profile < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            found = next((p for p in gpu.mig_profiles if p.index == profile), None)
            if found is None or not gpu.mig_enabled:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return SimGpuInstanceProfileInfo(
                version=pynvml.nvmlGpuInstanceProfileInfo_v2, id=found.id, isP2pSupported=0,
                sliceCount=found.slices, instanceCount=found.instances,
                multiprocessorCount=found.sms, copyEngineCount=found.copy_engines,
                decoderCount=found.decoders, encoderCount=0, jpegCount=found.jpegs,
                ofaCount=found.ofas, memorySizeMB=found.memory_mb, name=f"MIG {found.name}")

    def nvmlGpuInstanceGetComputeInstanceById(self, gpu_instance: Any, compute_instance_id: int) -> Any:
        """A compute instance of a GPU instance by ID; ``NotFound`` if none has it."""
        with self._cond:
            self._enter("nvmlGpuInstanceGetComputeInstanceById")
            gpu, mig = self._instance(gpu_instance, _GpuInstance)
            self._refuse_unprivileged()  # NVML API reference: "Requires privileged user"
            if compute_instance_id != mig.ci_id:
                raise _error(pynvml.NVML_ERROR_NOT_FOUND)
            return _ComputeInstance(self, gpu.index, mig.slot)

    def nvmlGpuInstanceGetComputeInstances(self, gpuInstance: Any, profileId: int,
                                           computeInstancesRef: Any, countRef: Any) -> int:
        """The compute instances of one CI profile (by ID, which for a CI profile is its
        index) in a GPU instance, written out as :meth:`nvmlDeviceGetGpuInstances`
        writes them.  Privileged (NVML API reference: "Requires privileged user")."""
        with self._cond:
            self._enter("nvmlGpuInstanceGetComputeInstances")
            gpu, mig = self._instance(gpuInstance, _GpuInstance)
            self._refuse_unprivileged()
            assert gpu.model is not None  # MIG devices exist only on known models
            if not _is_int(profileId) or not ci_profile_offered(gpu.model, mig.gi, profileId):
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            found = [_ComputeInstance(self, gpu.index, mig.slot)] if mig.ci_index == profileId else []
            _write_out(computeInstancesRef, countRef, found)
            return int(pynvml.NVML_SUCCESS)

    def nvmlComputeInstanceGetInfo(self, compute_instance: Any) -> Any:
        """A compute instance's ID, profile ID (its CI profile index) and placement."""
        with self._cond:
            self._enter("nvmlComputeInstanceGetInfo")
            gpu, mig = self._instance(compute_instance, _ComputeInstance)
            return SimComputeInstanceInfo(
                device=self._handles[gpu.index], gpuInstance=_GpuInstance(self, gpu.index, mig.slot),
                id=mig.ci_id, profileId=mig.ci_index, placement=SimPlacement(0, mig.ci_slices))

    def nvmlGpuInstanceGetComputeInstanceProfileInfo(
            self, gpu_instance: Any, profile: int, eng_profile: int) -> Any:
        """A compute instance profile by index (``NVML_COMPUTE_INSTANCE_PROFILE_*``) in a
        GPU instance: ``NotSupported`` for an index the part does not offer
        (:attr:`GpuModel.ci_profiles`: 1_SLICE_REV1 and 7_SLICE_NVL on every simulated
        part) or one bigger than the GI (or 3 slices in a 4-slice GI)."""
        with self._cond:
            self._enter("nvmlGpuInstanceGetComputeInstanceProfileInfo")
            gpu, mig = self._instance(gpu_instance, _GpuInstance)
            if (not _is_int(profile) or not 0 <= profile < pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT
                    or eng_profile != pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED):
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            gi = mig.gi
            assert gpu.model is not None  # MIG devices exist only on known models
            if not ci_profile_offered(gpu.model, gi, profile):
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            slices = NVML_CI_PROFILE_SLICES[profile]
            sms = gi.sms if slices == gi.slices else slices * (gi.sms // gi.slices)
            name = gi.name if slices == gi.slices else f"{slices}c.{gi.name}"
            return SimComputeInstanceProfileInfo(
                version=pynvml.nvmlComputeInstanceProfileInfo_v2, id=profile,
                sliceCount=slices, instanceCount=gi.slices // slices, multiprocessorCount=sms,
                sharedCopyEngineCount=gi.copy_engines, sharedDecoderCount=gi.decoders,
                sharedEncoderCount=0, sharedJpegCount=gi.jpegs, sharedOfaCount=gi.ofas,
                name=f"MIG {name}")

    # -- events ------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> Any:
        """A new, empty event set."""
        with self._cond:
            self._enter("nvmlEventSetCreate")
            self._open_sets += 1
            events = _EventSet(self)
            self._sets.append(events)
            return events

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        """The GPU's supported event type mask."""
        with self._cond:
            self._enter("nvmlDeviceGetSupportedEventTypes")
            return self._gpu(handle).supported_events

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None:
        """Deliver a GPU's events of these types to the set; types it does not support,
        or a MIG handle, are ``NotSupported`` (register the parent, as NVML requires)."""
        with self._cond:
            self._enter("nvmlDeviceRegisterEvents")
            gpu = self._gpu(handle)
            events = self._event_set(event_set)
            if not _is_int(event_types) or event_types & ~gpu.supported_events:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            events.registered[gpu.index] = events.registered.get(gpu.index, 0) | event_types

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any:
        """The next event (FIFO), waiting up to ``timeout_ms``; ``NVMLError_Timeout`` if
        none arrives.  Wakes at once for an injected event, a freed set
        (``Uninitialized``) or NVML going away (``Unknown``)."""
        with self._cond:
            self._enter("nvmlEventSetWait_v2")
            events = self._event_set(event_set)
            # pynvml passes c_uint(timeoutms): a negative timeout wraps, as it does there.
            deadline = time.monotonic() + (timeout_ms & 0xFFFFFFFF) / 1000
            self._waiting += 1
            events.waiters += 1
            try:
                while True:
                    if self._init_count == 0 or events.freed:
                        raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
                    if self._down:
                        raise _error(pynvml.NVML_ERROR_UNKNOWN)
                    if events.queue:
                        return events.queue.popleft()
                    if any(self._gpus[i].lost for i in events.registered):
                        # NVML API reference: the wait returns GPU_IS_LOST when a GPU on the
                        # set has fallen off the bus, without saying which.  How often a
                        # real driver repeats it is not documented: every wait here.
                        raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _error(pynvml.NVML_ERROR_TIMEOUT)
                    self._cond.wait(remaining)
            finally:
                self._waiting -= 1
                events.waiters -= 1

    def nvmlEventSetFree(self, event_set: Any) -> None:
        """Free an event set.  Freeing one a thread waits on is counted in
        :attr:`freed_while_waiting` and wakes that thread with ``Uninitialized``."""
        with self._cond:
            self.calls["nvmlEventSetFree"] += 1
            if self._init_count == 0:
                raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
            events = self._event_set(event_set)
            if events.waiters:
                self._freed_while_waiting += 1
            events.freed = True
            events.queue.clear()
            self._sets.remove(events)
            self._open_sets -= 1
            self._cond.notify_all()
            # Freed even while the driver is down, so leak accounting stays exact.
            if self._down:
                raise _error(pynvml.NVML_ERROR_UNKNOWN)

    # -- memory health -----------------------------------------------------------------

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        """1 while a retired page awaits a reset; ``NotSupported`` on Ampere and later,
        which remap rows instead."""
        with self._cond:
            self._enter("nvmlDeviceGetRetiredPagesPendingStatus")
            gpu = self._gpu(handle)
            if gpu.row_remapping:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return int(gpu.retired_pages_pending)

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        """``(correctable, uncorrectable, pending, failure)``; ``NotSupported`` before
        Ampere, which retires pages instead."""
        with self._cond:
            self._enter("nvmlDeviceGetRemappedRows")
            gpu = self._gpu(handle)
            if not gpu.row_remapping:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return (0, gpu.remapped_uncorrectable, int(gpu.remap_pending), int(gpu.remap_failed))

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, errorType: int, counterType: int) -> int:
        """ECC error counts: ``errorType`` NVML_MEMORY_ERROR_TYPE_CORRECTED/UNCORRECTED,
        ``counterType`` NVML_VOLATILE_ECC (since the last driver load or reset) or
        NVML_AGGREGATE_ECC (lifetime)."""
        with self._cond:
            self._enter("nvmlDeviceGetTotalEccErrors")
            gpu = self._gpu(handle)
            if (errorType not in (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                                  pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
                    or counterType not in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC)):
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            uncorrected = errorType == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
            return gpu.ecc.get((uncorrected, counterType == pynvml.NVML_VOLATILE_ECC), 0)

    # -- field values ------------------------------------------------------------------

    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: Any) -> Any:
        """Field values, shaped like pynvml's ``c_nvmlFieldValue_t`` array.  Only
        ``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION`` (230) is modelled; every other field,
        and that one on a driver that does not report it, answers per field
        ``nvmlReturn`` = NOT_SUPPORTED while the call succeeds, as NVML reports fields
        it cannot give.  (What real NVML returns for an ID it does not know at all is
        not confirmed here.)"""
        with self._cond:
            self._enter("nvmlDeviceGetFieldValues")
            gpu = self._gpu(handle)
            values = []
            for field in fieldIds:
                field_id, scope = field if isinstance(field, tuple) else (field, 0)
                action = gpu.recovery_action if field_id == FIELD_RECOVERY_ACTION else None
                values.append(SimFieldValue(
                    fieldId=field_id, scopeId=scope, timestamp=int(time.time() * 1e6),
                    latencyUsec=0, valueType=pynvml.NVML_VALUE_TYPE_UNSIGNED_INT,
                    nvmlReturn=(pynvml.NVML_SUCCESS if action is not None
                                else pynvml.NVML_ERROR_NOT_SUPPORTED),
                    value=SimValue(uiVal=action or 0)))
            return values

    # -- fault injection ---------------------------------------------------------------

    def _lookup(self, gpu: int | str) -> tuple[_Gpu, _Mig | None]:
        """A GPU (and MIG device, for a MIG UUID) by index, digit string or UUID."""
        if _is_int(gpu) or (isinstance(gpu, str) and gpu.isdigit()):
            index = int(gpu)
            if 0 <= index < len(self._gpus):
                return self._gpus[index], None
        elif isinstance(gpu, str):
            for candidate in self._gpus:
                if candidate.uuid == gpu:
                    return candidate, None
                for mig in candidate.migs:
                    if mig.uuid == gpu:
                        return candidate, mig
        valid = ", ".join(str(g.index) for g in self._gpus) or "none"
        raise KeyError(f"no GPU {gpu!r} on simulated node {self.node.name!r}; GPU indexes: "
                       f"{valid} (or a GPU or MIG UUID)")

    def gpu_index(self, gpu: int | str) -> int:
        """The NVML index of a GPU given as index, digit string, GPU UUID or MIG UUID (its
        parent); ``KeyError`` listing the valid indexes otherwise."""
        return self._lookup(gpu)[0].index

    def _deliver(self, gpu: _Gpu, event_type: int, data: int, gi: int, ci: int) -> None:
        """Queue an event on every live set registered for it (lock held); the rest of
        NVML's events are dropped, as the driver never reports unregistered types."""
        event = SimEventData(device=self._handles[gpu.index], eventType=event_type,
                             eventData=data, gpuInstanceId=gi, computeInstanceId=ci)
        for events in self._sets:
            if events.registered.get(gpu.index, 0) & event_type:
                events.queue.append(event)
        self._cond.notify_all()

    def _inject(self, gpu: int | str, event_type: int, data: int, gi: int | None,
                ci: int | None) -> _Gpu:
        """Resolve ``gpu`` and deliver an event on it (lock held)."""
        target, mig = self._lookup(gpu)
        if gi is None:
            gi = mig.gi_id if mig is not None else NO_INSTANCE
        if ci is None:
            ci = mig.ci_id if mig is not None else NO_INSTANCE
        self._deliver(target, event_type, data, gi, ci)
        return target

    def event(self, gpu: int | str, event_type: int, data: int = 0, *,
              gi: int | None = None, ci: int | None = None) -> None:
        """Inject any NVML event (e.g. ``0x4000``, GPU unavailable) to the sets registered
        for it.  A MIG UUID puts the event on its parent, naming that MIG device's GI/CI
        unless given."""
        with self._cond:
            self._inject(gpu, event_type, data, gi, ci)

    def xid(self, gpu: int | str, xid: int, *, gi: int | None = None, ci: int | None = None,
            recovery_action: int | None = None) -> None:
        """An XID error event (type 0x8, ``eventData`` = the XID).  GI/CI default to
        0xFFFFFFFF (the whole GPU), or to the MIG device's when ``gpu`` is a MIG UUID.
        ``recovery_action`` sets the driver's verdict first, as the driver records it
        with the fault."""
        if recovery_action is not None:
            self.set_recovery_action(gpu, recovery_action)
        self.event(gpu, EVENT_XID, xid, gi=gi, ci=ci)

    def ecc_dbe(self, gpu: int | str) -> None:
        """A double-bit ECC error (event 0x2): pre-Ampere GPUs retire the page, later ones
        remap the row; either is pending until the GPU is reset (:meth:`recover`)."""
        with self._cond:
            target = self._inject(gpu, EVENT_DOUBLE_BIT_ECC, 0, None, None)
            if target.row_remapping:
                target.remapped_uncorrectable += 1
                target.remap_pending = True
            else:
                target.retired_pages_pending = True
            self._count_ecc(target, 1, uncorrected=True)

    def lose(self, gpu: int | str) -> None:
        """The GPU falls off the bus: XID 79, then ``NVMLError_GpuIsLost`` from every call
        naming it or its MIG devices (by handle, index or UUID)."""
        with self._cond:
            target, _ = self._lookup(gpu)
            if target.lost:
                return
            target.lost = True
            self._deliver(target, EVENT_XID, 79, NO_INSTANCE, NO_INSTANCE)

    def recover(self, gpu: int | str) -> None:
        """A GPU reset: back on the bus, no retirement or row remap pending."""
        with self._cond:
            target, _ = self._lookup(gpu)
            target.lost = False
            target.retired_pages_pending = False
            target.remap_pending = False
            # NVML: volatile ECC counts start over at a reset; aggregate ones persist.
            for key in [k for k in target.ecc if k[1]]:
                del target.ecc[key]
            if target.recovery_action is not None:
                self._set_action(target, pynvml.NVML_GPU_RECOVERY_ACTION_NONE)

    def hang(self, gpu: int | str | None = None) -> None:
        """The GPU (every GPU, if ``None``) hangs: each NVML call naming it (by handle,
        index or UUID, its MIG devices' included) blocks until :meth:`unhang`.  Calls on
        other GPUs, and event waits, go on."""
        with self._cond:
            for target in self._gpus if gpu is None else [self._lookup(gpu)[0]]:
                target.hung = True

    def unhang(self, gpu: int | str | None = None) -> None:
        """The GPU (every GPU, if ``None``) answers again: its blocked calls return."""
        with self._cond:
            for target in self._gpus if gpu is None else [self._lookup(gpu)[0]]:
                target.hung = False
            self._cond.notify_all()

    def _count_ecc(self, gpu: _Gpu, count: int, *, uncorrected: bool) -> None:
        for volatile in (True, False):
            key = (uncorrected, volatile)
            gpu.ecc[key] = gpu.ecc.get(key, 0) + count

    def add_ecc_errors(self, gpu: int | str, count: int, *, corrected: bool = False) -> None:
        """``count`` more ECC errors (uncorrectable unless ``corrected``) in the GPU's
        volatile and aggregate counters, with no event (as errors a GPU keeps logging)."""
        if not _is_int(count) or count < 0:
            raise ValueError(f"ECC error count must be a non-negative integer, not {count!r}")
        with self._cond:
            self._count_ecc(self._lookup(gpu)[0], count, uncorrected=not corrected)

    def _set_action(self, gpu: _Gpu, action: int | None) -> None:
        changed = action != gpu.recovery_action
        gpu.recovery_action = action
        if changed and action is not None:
            # Drivers that report recovery actions signal changes (event type 0x8000);
            # the event data carrying the action is an assumption: readers re-read.
            self._deliver(gpu, EVENT_RECOVERY_ACTION, action, NO_INSTANCE, NO_INSTANCE)

    def set_recovery_action(self, gpu: int | str, action: int | None) -> None:
        """The driver's recovery action for the GPU (``NVML_GPU_RECOVERY_ACTION_*``), or
        ``None``: a driver that does not report the field.  A change to a value raises
        event 0x8000 on the sets registered for it.  The GPU lists 0x8000 among its
        supported events exactly while the field is supported (or its spec's
        ``supported_events`` lists it); registrations made meanwhile stay."""
        if action is not None and (not _is_int(action) or not 0 <= action < 2**32):
            raise ValueError(f"recovery action must be an NVML_GPU_RECOVERY_ACTION_* value "
                             f"or None, not {action!r}")
        with self._cond:
            target = self._lookup(gpu)[0]
            target.supported_events = target.spec_events | (
                EVENT_RECOVERY_ACTION if action is not None else 0)
            self._set_action(target, action)

    def fail(self, gpu: int | str, calls: Iterable[str] | str, code: int) -> None:
        """Make these NVML methods fail with ``code`` (``NVML_ERROR_*``) whenever they
        name this GPU (or its MIG devices, or their GPU/compute instances), until
        :meth:`unfail`: a GPU that answers some queries and not others, as one falling
        off the bus during discovery does (its handle and UUID, then not its minor
        number).  Calls add up: a later ``fail`` adds names or changes their code.

        ``calls`` are method names (:data:`FAILABLE_CALLS`: the NVML calls the simulator
        has that name a device; ``nvmlInit``, ``nvmlDeviceGetCount`` and the event set
        calls name none, so they cannot fail for one GPU).  ``ValueError`` lists the
        valid names for any other, and for a ``code`` that is not an error code;
        ``KeyError`` for an unknown GPU.  Nothing changes on an error."""
        names = _failures(calls, code, FAILABLE_CALLS, "NVML calls that name a GPU in the "
                                                        "simulator")
        with self._cond:
            target = self._lookup(gpu)[0]
            target.failures.update(dict.fromkeys(names, code))

    def unfail(self, gpu: int | str) -> None:
        """Undo :meth:`fail` for the GPU: every call answers again."""
        with self._cond:
            self._lookup(gpu)[0].failures.clear()

    def fail_node(self, calls: Iterable[str] | str, code: int) -> None:
        """Make these calls that name no GPU (:data:`NODE_CALLS`) fail with ``code``
        until :meth:`unfail_node`, while every other call answers: NVML documents
        UNKNOWN ("any unexpected error") for ``nvmlDeviceGetCount`` beside
        UNINITIALIZED, and a driver in trouble may fail the count and still answer for
        the GPUs it has.  ``ValueError`` for another name or a code that is not an
        error code; nothing changes on an error."""
        names = _failures(calls, code, NODE_CALLS, "NVML calls that name no GPU")
        with self._cond:
            self._node_failures.update(dict.fromkeys(names, code))

    def unfail_node(self) -> None:
        """Undo :meth:`fail_node`."""
        with self._cond:
            self._node_failures.clear()

    def set_pending(self, gpu: int | str, *, retired_pages: bool | None = None,
                    row_remap: bool | None = None, row_remap_failed: bool | None = None) -> None:
        """Set or clear pending page retirement / row remapping.  ``ValueError`` for the
        mechanism the GPU lacks (NVML reports it ``NotSupported``, so it can never be
        pending there)."""
        with self._cond:
            target, _ = self._lookup(gpu)
            arch = (f"GPU {target.index} ({target.name}, compute capability "
                    f"{target.compute_capability[0]}.{target.compute_capability[1]})")
            if retired_pages is not None:
                if target.row_remapping:
                    raise ValueError(f"{arch} remaps rows instead of retiring pages: use row_remap")
                target.retired_pages_pending = retired_pages
            if row_remap is not None or row_remap_failed is not None:
                if not target.row_remapping:
                    raise ValueError(f"{arch} retires pages instead of remapping rows: use retired_pages")
                if row_remap is not None:
                    target.remap_pending = row_remap
                if row_remap_failed is not None:
                    # Permanent on real GPUs (a reset does not clear it); clearing it here
                    # stands for the GPU being serviced.
                    target.remap_failed = row_remap_failed

    def nvml_down(self) -> None:
        """The driver goes away: ``nvmlInit`` raises ``DriverNotLoaded``, everything else
        (waiting threads included, woken now) raises ``NVMLError_Unknown``."""
        with self._cond:
            self._down = True
            self._cond.notify_all()

    def nvml_up(self) -> None:
        """The driver is back."""
        with self._cond:
            self._down = False

    def set_init_error(self, code: int | None) -> None:
        """Make ``nvmlInit`` raise this ``NVML_ERROR_*`` code (``None``: succeed)."""
        with self._cond:
            self._init_error = code

    def describe(self) -> list[dict[str, Any]]:
        """Every GPU as plain data (index, uuid, name, minor, pci_bus_id, lost, mig_uuids,
        mig_profiles), e.g. for a control socket's ``list``."""
        with self._cond:
            return [{
                "index": g.index, "uuid": g.uuid, "name": g.name, "minor": g.minor,
                "pci_bus_id": g.bus_id, "lost": g.lost,
                "mig_uuids": [m.uuid for m in g.migs],
                "mig_profiles": [m.profile for m in g.migs],
            } for g in self._gpus]

    # -- driver root -------------------------------------------------------------------

    def write_driver_root(self, root: str | os.PathLike[str]) -> None:
        """Lay out what discovery reads besides NVML under ``root``: device nodes (empty
        files) ``dev/nvidia<minor>``, ``nvidiactl``, ``nvidia-uvm``, ``nvidia-uvm-tools``,
        ``nvidia-modeset``; ``sys/bus/pci/devices/<bus>/numa_node``; and for MIG,
        ``proc/driver/nvidia-caps/mig-minors`` and ``dev/nvidia-caps/nvidia-cap<n>``."""
        base = pathlib.Path(root)
        dev = base / "dev"
        dev.mkdir(parents=True, exist_ok=True)
        for name in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"):
            (dev / name).touch()
        for gpu in self._gpus:
            (dev / f"nvidia{gpu.minor}").touch()
            # NVIDIA derives the sysfs name from NVML's bus ID: drop one leading "0000"
            # of the 8-digit domain and lower-case it.
            sysfs = gpu.bus_id.removeprefix("0000")
            device_dir = base / "sys" / "bus" / "pci" / "devices" / sysfs.lower()
            device_dir.mkdir(parents=True, exist_ok=True)
            numa = -1 if gpu.numa_node is None else gpu.numa_node
            (device_dir / "numa_node").write_text(f"{numa}\n")
        mig_gpus = [g for g in self._gpus if g.mig_enabled]
        if not mig_gpus:
            return
        caps = base / "proc" / "driver" / "nvidia-caps"
        caps.mkdir(parents=True, exist_ok=True)
        # The kernel numbers every possible GPU minor, so a GPU's numbers depend only on
        # its minor: write minors 0..max so the file matches the kernel's for ours.
        lines = ["config 1", "monitor 2"]
        for minor in range(max(g.minor for g in self._gpus) + 1):
            for gi in range(_GI_IDS):
                lines.append(f"gpu{minor}/gi{gi}/access {_cap_minor(minor, gi)}")
                lines.extend(f"gpu{minor}/gi{gi}/ci{ci}/access {_cap_minor(minor, gi, ci)}"
                             for ci in range(_CI_IDS))
        (caps / "mig-minors").write_text("\n".join(lines) + "\n")
        cap_dir = dev / "nvidia-caps"
        cap_dir.mkdir(exist_ok=True)
        # config and monitor exist wherever MIG is in use (nvidia-modprobe creates them).
        (cap_dir / "nvidia-cap1").touch()
        (cap_dir / "nvidia-cap2").touch()
        for gpu in mig_gpus:
            for mig in gpu.migs:
                (cap_dir / f"nvidia-cap{_cap_minor(gpu.minor, mig.gi_id)}").touch()
                (cap_dir / f"nvidia-cap{_cap_minor(gpu.minor, mig.gi_id, mig.ci_id)}").touch()


#: The NVML methods :meth:`SimulatedNVML.fail_node` can make fail: those that name no GPU
#: and answer once NVML is up (``nvmlInit``'s failures are ``init_error``/``nvml_down``).
NODE_CALLS: Final[tuple[str, ...]] = ("nvmlDeviceGetCount", "nvmlSystemGetDriverVersion")

#: The NVML methods :meth:`SimulatedNVML.fail` can make fail for one GPU: every one the
#: simulator has except those that name no device.
FAILABLE_CALLS: Final[tuple[str, ...]] = tuple(sorted(
    name for name in vars(SimulatedNVML)
    if re.match(r"nvml[A-Z]", name) and name not in {
        "nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount",
        "nvmlEventSetCreate", "nvmlEventSetWait_v2", "nvmlEventSetFree"}))


def _cap_minor(gpu_minor: int, gi: int, ci: int | None = None) -> int:
    """The ``nvidia-caps`` minor of a GI's (or, with ``ci``, a CI's) access file: 3 after
    config and monitor, then per GPU 15 GIs of (GI access + 8 CI accesses)."""
    base = 3 + gpu_minor * _GI_IDS * (1 + _CI_IDS) + gi * (1 + _CI_IDS)
    return base if ci is None else base + 1 + ci

