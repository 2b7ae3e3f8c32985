"""NVIDIA-compatible configuration: the flags, their environment twins and the config file.

Sans-IO: plain frozen data and functions over it.  The shape follows NVIDIA's
``api/config/v1`` (``version: v1``; ``flags``, ``resources``, ``sharing``, ``imex``), with
Python attribute names; the YAML/JSON keys are NVIDIA's (``migStrategy``...).

Precedence, as NVIDIA's: a flag given on the command line, else its environment twin,
else the config file's value, else the built-in default.
"""

from __future__ import annotations

import dataclasses
from typing import Final

__all__ = [
    "Config",
    "ConfigError",
    "Flags",
    "Imex",
    "PluginFlags",
    "ReplicatedDevices",
    "ReplicatedResource",
    "ResourcePattern",
    "Resources",
    "Sharing",
    "SharingStrategy",
]

MIG_STRATEGIES: Final = ("none", "single", "mixed")
DEVICE_LIST_STRATEGIES: Final = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
DEVICE_ID_STRATEGIES: Final = ("uuid", "index")
ALLOCATION_POLICIES: Final = ("distributed", "packed")
DISCOVERY_STRATEGIES: Final = ("auto", "nvml", "tegra")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key, the value and what is
    allowed (or repeats NVIDIA's error text where NVIDIA has one)."""


@dataclasses.dataclass(frozen=True)
class PluginFlags:
    """``flags.plugin`` of the config file."""

    pass_device_specs: bool = False
    device_list_strategy: tuple[str, ...] = ("envvar",)
    device_id_strategy: str = "uuid"
    cdi_annotation_prefix: str = "cdi.k8s.io/"
    nvidia_cdi_hook_path: str = "/usr/bin/nvidia-ctk"
    container_driver_root: str = "/driver-root"
    shared_devices_allocation_policy: str = "distributed"
    #: Ours: the CDI kind our CDI device names use (``nvidia-ctk cdi generate``'s).
    cdi_kind: str = "nvidia.com/gpu"


@dataclasses.dataclass(frozen=True)
class Flags:
    """``flags`` of the config file, plus the command-line-only settings."""

    mig_strategy: str = "none"
    fail_on_init_error: bool = True
    nvidia_driver_root: str = "/"
    #: ``None``: the same as the driver root (NVIDIA copies it).
    nvidia_dev_root: str | None = None
    gdrcopy_enabled: bool = False
    gds_enabled: bool = False
    mofed_enabled: bool = False
    mps_root: str | None = None
    device_discovery_strategy: str = "auto"
    use_node_feature_api: bool = False
    plugin: PluginFlags = dataclasses.field(default_factory=PluginFlags)
    # Command line (and environment) only, as in NVIDIA's plugin:
    kubelet_socket: str = "/var/lib/kubelet/device-plugins/kubelet.sock"
    config_file: str = ""
    cdi_feature_flags: tuple[str, ...] = ()
    cdi_disable_hooks: tuple[str, ...] = ()
    # Ours (no NVIDIA twin):
    health_recovery_window: float = 60.0
    health_probe_interval: float = 5.0

    @property
    def dev_root(self) -> str:
        """The host prefix of device nodes (``nvidiaDevRoot``, defaulting to the driver root)."""
        return self.nvidia_dev_root if self.nvidia_dev_root is not None else self.nvidia_driver_root


@dataclasses.dataclass(frozen=True)
class ResourcePattern:
    """``resources.gpus[]`` / ``resources.mig[]``: devices whose name (GPUs) or profile
    (MIG) matches the glob ``pattern`` are advertised as ``name``."""

    pattern: str
    name: str


@dataclasses.dataclass(frozen=True)
class Resources:
    """``resources``: renaming by pattern (NVIDIA parses and then ignores it; we honour it)."""

    gpus: tuple[ResourcePattern, ...] = ()
    mig: tuple[ResourcePattern, ...] = ()


@dataclasses.dataclass(frozen=True)
class ReplicatedDevices:
    """``devices`` of a shared resource: ``all`` (default), a count (the first N), or a
    list of GPU indexes, ``"i:j"`` MIG indexes, GPU or MIG UUIDs."""

    all: bool = True
    count: int | None = None
    ids: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ReplicatedResource:
    """One entry of ``sharing.<strategy>.resources``."""

    name: str
    replicas: int
    rename: str | None = None
    devices: ReplicatedDevices = dataclasses.field(default_factory=ReplicatedDevices)


@dataclasses.dataclass(frozen=True)
class SharingStrategy:
    """``sharing.timeSlicing`` or ``sharing.mps``."""

    resources: tuple[ReplicatedResource, ...]
    rename_by_default: bool = False
    #: ``None``: unset in the file; time-slicing then means false, MPS true (NVIDIA's defaults).
    fail_requests_greater_than_one: bool | None = None


@dataclasses.dataclass(frozen=True)
class Sharing:
    """``sharing``: at most one of time-slicing and MPS."""

    time_slicing: SharingStrategy | None = None
    mps: SharingStrategy | None = None

    @property
    def strategy(self) -> str:
        """``"mps"``, ``"time-slicing"`` or ``"none"``, chosen as NVIDIA's ``sharing.go``."""
        if self.mps is not None and any(r.replicas > 1 for r in self.mps.resources):
            return "mps"
        if self.time_slicing is not None and any(r.replicas > 1 for r in self.time_slicing.resources):
            return "time-slicing"
        return "none"

    @property
    def active(self) -> SharingStrategy | None:
        """The strategy in force, if any."""
        return {"mps": self.mps, "time-slicing": self.time_slicing}.get(self.strategy)

    @property
    def fail_requests_greater_than_one(self) -> bool:
        """Whether a request for more than one replica fails (MPS default true)."""
        active = self.active
        if active is None:
            return False
        if active.fail_requests_greater_than_one is None:
            return self.strategy == "mps"
        return active.fail_requests_greater_than_one


@dataclasses.dataclass(frozen=True)
class Imex:
    """``imex``: IMEX channels handed to containers."""

    channel_ids: tuple[int, ...] = ()
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration (``version: v1``)."""

    flags: Flags = dataclasses.field(default_factory=Flags)
    resources: Resources = dataclasses.field(default_factory=Resources)
    sharing: Sharing = dataclasses.field(default_factory=Sharing)
    imex: Imex = dataclasses.field(default_factory=Imex)
    version: str = "v1"
