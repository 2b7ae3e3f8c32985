"""MIG profile names the way NVIDIA names them, from NVML's profile indexes and sizes.

Sans-IO: plain functions over plain data, no NVML calls, so discovery (real pynvml or
the simulated NVML) and the tests share one implementation.

The rules are those of NVIDIA's go-nvlib, ``pkg/nvlib/device/mig_profile.go``, which the
k8s-device-plugin, mig-parted and the GPU operator use to name MIG devices (and so the
``nvidia.com/mig-<profile>`` resources).  Each rule below cites the go-nvlib function it
follows; the code is our own:

* ``NewMigProfile``: the GPU instance (GI) and compute instance (CI) profile *indexes*
  (``NVML_GPU_INSTANCE_PROFILE_*``, ``NVML_COMPUTE_INSTANCE_PROFILE_*``) give the slice
  counts ``G`` and ``C`` and the name's attribute suffix (``+me``, ``+me.all``, ``+gfx``,
  ``-me``);
* ``getMigMemorySizeGB``: the ``GB`` in the name is the profile's share of the GPU's
  memory rounded *up* to eighths, times the GPU's memory in whole GiB (rounded up), then
  rounded to the nearest integer with halves away from zero (Go's ``math.Round``);
* ``MigProfileInfo.String``: ``<G>g.<GB>gb<suffix>`` when ``C == G``, otherwise
  ``<C>c.<G>g.<GB>gb<suffix>``;
* ``parseMigProfile`` / ``parseMigProfileAttributes``: what a profile string may look
  like, for reading NVML's own profile names back.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from typing import Final, Protocol

import pynvml

__all__ = [
    "CI_PROFILE_SLICES",
    "GI_PROFILE_ATTRIBUTE",
    "GI_PROFILE_SLICES",
    "GiProfileInfoLike",
    "MigDeviceAttributesLike",
    "format_profile",
    "match_gi_profile",
    "memory_gb",
    "profile_from_nvml_name",
    "profile_name",
]

MiB: Final = 1 << 20
GiB: Final = 1 << 30

#: GPU instance profile index (``NVML_GPU_INSTANCE_PROFILE_*``) -> GPU slice count
#: (go-nvlib ``NewMigProfile``, its first switch).  Every index pynvml defines is here.
GI_PROFILE_SLICES: Final[Mapping[int, int]] = types.MappingProxyType({
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE: 1,
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE: 2,
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE: 3,
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE: 4,
    pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE: 7,
    pynvml.NVML_GPU_INSTANCE_PROFILE_8_SLICE: 8,
    pynvml.NVML_GPU_INSTANCE_PROFILE_6_SLICE: 6,
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1: 1,
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1: 2,
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2: 1,
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX: 1,
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX: 2,
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX: 4,
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME: 1,
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME: 2,
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME: 1,
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME: 2,
    # Not in go-nvlib yet (its NewMigProfile rejects it as an invalid profile ID): the
    # slice count its name states, as for every other index.
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX: 3,
})

#: GPU instance profile index -> the attribute suffix go-nvlib puts on the name
#: (``NewMigProfile``'s ``attrs``/``negAttrs`` switches, joined as ``String`` does:
#: ``+`` before attributes, ``-`` before negated ones).
GI_PROFILE_ATTRIBUTE: Final[Mapping[int, str]] = types.MappingProxyType({
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE: "",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE: "",
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE: "",
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE: "",
    pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE: "",
    pynvml.NVML_GPU_INSTANCE_PROFILE_8_SLICE: "",
    pynvml.NVML_GPU_INSTANCE_PROFILE_6_SLICE: "",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1: "+me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1: "+me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2: "",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE_GFX: "+gfx",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_NO_ME: "-me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_NO_ME: "-me",
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_ALL_ME: "+me.all",
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE_ALL_ME: "+me.all",
    # Not in go-nvlib yet: the evident pattern (every other *_GFX index is "+gfx").
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX: "+gfx",
})

#: Compute instance profile index (``NVML_COMPUTE_INSTANCE_PROFILE_*``) -> slice count
#: (go-nvlib ``NewMigProfile``, its second switch).  Every index pynvml defines is here.
CI_PROFILE_SLICES: Final[Mapping[int, int]] = types.MappingProxyType({
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE: 1,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE: 2,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE: 3,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE: 4,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE: 7,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_8_SLICE: 8,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_6_SLICE: 6,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE_REV1: 1,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE_NVL: 7,
})


def memory_gb(memory_mb: int, total_bytes: int) -> int:
    """The ``GB`` of a MIG profile name: go-nvlib's ``getMigMemorySizeGB``.

    The profile's share of the GPU's memory, ``memory_mb`` MiB of ``total_bytes``, is
    rounded up to eighths; that times the GPU's memory in GiB, itself rounded up, is
    rounded to the nearest integer, halves away from zero (Go's ``math.Round``; Python's
    ``round`` would round halves to even, naming an H200's 3g profile ``3g.70gb``
    instead of NVIDIA's ``3g.71gb``).

    Worked in integers, so the result is exact.  go-nvlib works in float64, and agrees
    on every real part: ``memory_mb * 2**20`` and ``total_bytes`` are exact doubles
    (below 2**53), their quotient is correctly rounded, and times 8 (a power of two)
    it stays within half an ulp of the exact value, which is at least
    ``1 / total_bytes`` away from any integer it is not equal to, so ``Ceil`` lands on
    the same eighth; the eighth times a whole GiB count is then exact, and ``Round``
    of an exact value is exact.  That holds for any profile no bigger than its GPU
    while ``total_bytes * 8 < 2**53`` (GPUs under 1 PiB).

    Raises:
        ValueError: ``total_bytes`` is not positive or ``memory_mb`` is negative (Go
            would divide by zero; NVML gives MIG parents' memory to privileged callers
            only, so a caller may well have no total).
    """
    if total_bytes <= 0:
        raise ValueError(f"total memory must be positive, not {total_bytes} bytes")
    if memory_mb < 0:
        raise ValueError(f"MIG profile memory must not be negative, not {memory_mb} MB")
    eighths = -(-8 * memory_mb * MiB // total_bytes)  # ceil(share * 8)
    total_gib = -(-total_bytes // GiB)  # ceil(total / GiB), as go-nvlib's integer division
    # round(eighths * total_gib / 8), halves up (all values here are non-negative).
    return (eighths * total_gib + 4) // 8


def profile_name(gi_index: int, ci_index: int, memory_mb: int, total_bytes: int) -> str:
    """The MIG profile string go-nvlib gives a GPU instance profile and compute instance
    profile (``NewMigProfile`` then ``String``): ``1g.5gb``, ``1g.5gb+me``,
    ``1c.2g.10gb``, ``3g.71gb``.

    Args:
        gi_index: ``NVML_GPU_INSTANCE_PROFILE_*`` (the index, not the profile ID).
        ci_index: ``NVML_COMPUTE_INSTANCE_PROFILE_*`` (the index, not the profile ID).
        memory_mb: the GI profile's ``memorySizeMB``.
        total_bytes: the GPU's total memory (``nvmlDeviceGetMemoryInfo(parent).total``).

    Raises:
        ValueError: an index not in :data:`GI_PROFILE_SLICES` /
            :data:`CI_PROFILE_SLICES` (named in the message), or a memory size
            :func:`memory_gb` refuses.
    """
    g = GI_PROFILE_SLICES.get(gi_index)
    if g is None:
        raise ValueError(f"unknown GPU instance profile index {gi_index!r} "
                         f"(known: {sorted(GI_PROFILE_SLICES)})")
    c = CI_PROFILE_SLICES.get(ci_index)
    if c is None:
        raise ValueError(f"unknown compute instance profile index {ci_index!r} "
                         f"(known: {sorted(CI_PROFILE_SLICES)})")
    return format_profile(c, g, memory_gb(memory_mb, total_bytes), GI_PROFILE_ATTRIBUTE[gi_index])


def format_profile(c: int, g: int, gb: int, suffix: str = "") -> str:
    """go-nvlib's ``MigProfileInfo.String``: ``<G>g.<GB>gb<suffix>`` when the compute
    instance spans the GPU instance (``c == g``), else ``<C>c.<G>g.<GB>gb<suffix>``."""
    return f"{g}g.{gb}gb{suffix}" if c == g else f"{c}c.{g}g.{gb}gb{suffix}"


# One attribute as go-nvlib's parseMigProfileAttributes accepts it: ASCII letters, digits
# and dots, not starting with a digit, neither starting nor ending with a dot.
_ATTRIBUTE = r"[A-Za-z](?:[A-Za-z0-9.]*[A-Za-z0-9])?"
_GI_NAME = re.compile(rf"(?:MIG )?([0-9]+)g\.([0-9]+)gb((?:[+-]{_ATTRIBUTE}(?:,{_ATTRIBUTE})*)?)")


def profile_from_nvml_name(name: str | bytes) -> tuple[int, int, str] | None:
    """``(G, GB, suffix)`` from NVML's own GPU instance profile name, the ``name`` of
    ``nvmlGpuInstanceProfileInfo_v2_t``: ``b"MIG 3g.71gb"`` -> ``(3, 71, "")``,
    ``"MIG 1g.23gb+me.all"`` -> ``(1, 23, "+me.all")``, ``"MIG 1g.23gb-me"`` ->
    ``(1, 23, "-me")``.

    For naming a MIG device when the parent GPU's total memory is unknown (in MIG mode
    NVML gives it to privileged callers only): NVML names its profiles as go-nvlib
    does.  The ``MIG `` prefix is optional; trailing NULs and spaces (C string padding)
    are ignored.  The form is go-nvlib's ``parseMigProfile`` for a GI profile (no
    ``<C>c.`` part): an attribute list after one ``+`` or ``-``, comma-separated,
    without repeats.

    Returns:
        ``None`` for anything else, including undecodable bytes and compute instance
        profile names (``1c.2g.10gb``).
    """
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            return None
    match = _GI_NAME.fullmatch(name.rstrip("\0 "))
    if match is None:
        return None
    g, gb, suffix = match.groups()
    attributes = suffix[1:].split(",") if suffix else []
    if len(set(attributes)) != len(attributes):
        return None  # go-nvlib: "non unique attribute in list"
    return int(g), int(gb), suffix


class MigDeviceAttributesLike(Protocol):
    """What :func:`match_gi_profile` reads of ``nvmlDeviceGetAttributes(mig_handle)``
    (``c_nvmlDeviceAttributes``; any object with these attributes will do)."""

    @property
    def gpuInstanceSliceCount(self) -> int: ...
    @property
    def memorySizeMB(self) -> int: ...
    @property
    def sharedCopyEngineCount(self) -> int: ...
    @property
    def sharedDecoderCount(self) -> int: ...
    @property
    def sharedEncoderCount(self) -> int: ...
    @property
    def sharedJpegCount(self) -> int: ...
    @property
    def sharedOfaCount(self) -> int: ...


class GiProfileInfoLike(Protocol):
    """What :func:`match_gi_profile` reads of
    ``nvmlDeviceGetGpuInstanceProfileInfo(parent, index)``
    (``nvmlGpuInstanceProfileInfo_v2_t``; any object with these attributes will do)."""

    @property
    def sliceCount(self) -> int: ...
    @property
    def memorySizeMB(self) -> int: ...
    @property
    def copyEngineCount(self) -> int: ...
    @property
    def decoderCount(self) -> int: ...
    @property
    def encoderCount(self) -> int: ...
    @property
    def jpegCount(self) -> int: ...
    @property
    def ofaCount(self) -> int: ...


def match_gi_profile(attributes: MigDeviceAttributesLike,
                     profiles: Mapping[int, GiProfileInfoLike]) -> list[int]:
    """The GPU instance profile indexes whose profile info fits a MIG device's
    attributes, in ascending order.

    A MIG device's GPU instance profile is properly read with
    ``nvmlDeviceGetGpuInstanceById`` and ``nvmlGpuInstanceGetInfo``, which need
    privilege; its attributes do not.  Slices and memory alone cannot tell ``1g.10gb``
    from ``1g.10gb+me`` (same slice, same memory), but the engines can: the ``+me``
    profile has the OFA and JPEG engines the plain one lacks.  So a profile matches
    when its slice count, memory and copy engine, decoder, encoder, JPEG and OFA counts
    all equal the device's (``shared*`` counts are the GI's engines, shared by its
    compute instances).  More than one index is returned when the attributes cannot
    tell them apart; none when nothing fits.

    Args:
        attributes: the MIG device's ``nvmlDeviceGetAttributes``.
        profiles: GI profile index -> ``nvmlDeviceGetGpuInstanceProfileInfo(parent,
            index)``, for the indexes the parent supports.
    """
    want = (int(attributes.gpuInstanceSliceCount), int(attributes.memorySizeMB),
            int(attributes.sharedCopyEngineCount), int(attributes.sharedDecoderCount),
            int(attributes.sharedEncoderCount), int(attributes.sharedJpegCount),
            int(attributes.sharedOfaCount))
    return sorted(
        index for index, info in profiles.items()
        if (int(info.sliceCount), int(info.memorySizeMB), int(info.copyEngineCount),
            int(info.decoderCount), int(info.encoderCount), int(info.jpegCount),
            int(info.ofaCount)) == want)
