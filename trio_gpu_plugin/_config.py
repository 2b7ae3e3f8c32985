"""NVIDIA-compatible configuration: the flags, their environment twins and the config file.

Sans-IO: plain frozen data and functions over it.  The shape follows NVIDIA's
``api/config/v1`` (``version: v1``; ``flags``, ``resources``, ``sharing``, ``imex``), with
Python attribute names; the YAML/JSON keys are NVIDIA's (``migStrategy``...).

Precedence, as NVIDIA's: a flag given on the command line, else its environment twin,
else the config file's value, else the built-in default.

:data:`FLAGS` lists every flag once (names, environment twins, config-file key, where it
lands in :class:`Config`); :func:`add_flags` builds the argparse side from it,
:func:`load_config_file` reads a file (the only I/O here) and :func:`resolve_config`
merges everything into a :class:`Config` plus warnings (never logged here).
:func:`load_config` is the public way to build one from all three; ``Config()`` is the
built-in defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal

from ._plan_model import MAX_LIST_AND_WATCH_BYTES, MAX_REPLICAS

__all__ = [
    "FLAGS",
    "FLAG_GROUPS",
    "Config",
    "ConfigDocument",
    "ConfigError",
    "FlagKind",
    "FlagSpec",
    "Flags",
    "Imex",
    "PluginFlags",
    "ReplicatedDevices",
    "ReplicatedResource",
    "ResourcePattern",
    "Resources",
    "Sharing",
    "SharingStrategy",
    "add_flags",
    "check_platform",
    "config_to_document",
    "effective_config_json",
    "flag_value",
    "load_config",
    "validate_config",
    "load_config_file",
    "new_resource_name",
    "parse_bool",
    "parse_positive_seconds",
    "parse_seconds",
    "resolve_config",
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
    """The whole configuration (``version: v1``), NVIDIA's config file as frozen data:
    ``flags`` (:class:`Flags`, :class:`PluginFlags`: every field names its flag,
    environment twin and config key), ``resources``, ``sharing``, ``imex``.

    Build one with :func:`load_config` (a file, flags and environment, NVIDIA's
    precedence: flag > environment > file > default; :class:`ConfigError` names the key
    path of what is wrong), or directly: ``Config()`` is NVIDIA's defaults and
    ``dataclasses.replace`` changes a part (``Config(sharing=Sharing(time_slicing=
    SharingStrategy((ReplicatedResource("nvidia.com/gpu", 2),))))``)."""

    flags: Flags = dataclasses.field(default_factory=Flags)
    resources: Resources = dataclasses.field(default_factory=Resources)
    sharing: Sharing = dataclasses.field(default_factory=Sharing)
    imex: Imex = dataclasses.field(default_factory=Imex)
    version: str = "v1"


# ======================================================================================
# The flag table
#
# One row per command-line flag: its aliases, environment twins, where it lands in
# :class:`Config` and in the config file.  ``add_flags`` builds argparse from it and
# ``resolve_config`` merges command line, environment, file and defaults with it, so the
# three views cannot drift apart.

FlagKind = Literal[
    "str", "bool", "choice", "list", "int-list", "seconds", "positive-seconds", "optional-str",
]

#: The ``--help`` groups, in the order they are shown.
FLAG_GROUPS: Final = (
    "Kubelet and configuration",
    "NVML and health",
    "Allocate",
    "Sharing and MIG",
    "CDI",
    "Simulation",
    "Logging",
)

_KUBELET, _NVML, _ALLOCATE, _SHARING, _CDI, _SIMULATION, _LOGGING = FLAG_GROUPS

# The prefix NVIDIA's NewResourceName puts in front of a bare resource name.
_RESOURCE_PREFIX: Final = "nvidia.com"
_MAX_RESOURCE_NAME_LENGTH: Final = 63
_SHARED_SUFFIX: Final = ".shared"
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlagSpec:
    """One command-line flag, its environment twins and its config-file key.

    ``attr`` is the dotted path of the value in :class:`Config` (``None`` for flags that
    configure this process only, such as ``--simulate``); ``config_key`` the dotted
    YAML/JSON path (``None``: command line and environment only).  ``default`` is for
    display; the real defaults are the dataclasses' own.  ``nvidia_error`` is NVIDIA's
    error text for a value outside ``choices``, with ``{value}`` where the value goes.
    """

    name: str
    aliases: tuple[str, ...] = ()
    envs: tuple[str, ...]
    attr: str | None
    config_key: str | None
    kind: FlagKind
    choices: tuple[str, ...] = ()
    default: str
    group: str
    help: str
    metavar: str | None = None
    nvidia_error: str | None = None

    @property
    def dest(self) -> str:
        """The argparse destination: the name without ``--``, ``-`` turned into ``_``."""
        return _dest(self.name)

    @property
    def display_metavar(self) -> str:
        """The metavar ``--help`` shows."""
        if self.metavar is not None:
            return self.metavar
        if self.kind == "choice":
            return "{" + ",".join(self.choices) + "}"
        return {
            "bool": "BOOL", "list": "LIST", "int-list": "IDS", "seconds": "SECONDS",
            "positive-seconds": "SECONDS",
        }.get(self.kind, "VALUE")


def _dest(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


FLAGS: Final[tuple[FlagSpec, ...]] = (
    # -- Kubelet and configuration
    FlagSpec(
        name="--kubelet-socket", envs=("KUBELET_SOCKET",), attr="flags.kubelet_socket",
        config_key=None, kind="str", default="/var/lib/kubelet/device-plugins/kubelet.sock",
        group=_KUBELET, metavar="PATH",
        help="the kubelet's registration socket; our sockets go in its directory"),
    FlagSpec(
        name="--config-file", envs=("CONFIG_FILE",), attr="flags.config_file", config_key=None,
        kind="str", default="none", group=_KUBELET, metavar="PATH",
        help="a YAML or JSON config file (NVIDIA's version v1); a flag or environment "
             "variable that is set overrides the file's value"),
    # -- NVML and health
    FlagSpec(
        name="--fail-on-init-error", envs=("FAIL_ON_INIT_ERROR",),
        attr="flags.fail_on_init_error", config_key="flags.failOnInitError", kind="bool",
        default="true", group=_NVML,
        help="exit 1 if NVML cannot start; false keeps retrying with back-off and registers "
             "once it works"),
    FlagSpec(
        name="--driver-root", aliases=("--nvidia-driver-root",), envs=("NVIDIA_DRIVER_ROOT",),
        attr="flags.nvidia_driver_root", config_key="flags.nvidiaDriverRoot", kind="str",
        default="/", group=_NVML, metavar="PATH",
        help="the root of the NVIDIA driver on the host (the root of CDI specs)"),
    FlagSpec(
        name="--dev-root", aliases=("--nvidia-dev-root",), envs=("NVIDIA_DEV_ROOT",),
        attr="flags.nvidia_dev_root", config_key="flags.nvidiaDevRoot", kind="optional-str",
        default="the driver root", group=_NVML, metavar="PATH",
        help="the host prefix of device nodes handed to containers"),
    FlagSpec(
        name="--driver-root-ctr-path", aliases=("--container-driver-root",),
        envs=("DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT"),
        attr="flags.plugin.container_driver_root", config_key="flags.plugin.containerDriverRoot",
        kind="str", default="/driver-root", group=_NVML, metavar="PATH",
        help="where the host's driver root is mounted in this container "
             "(libnvidia-ml.so.1 is looked for there)"),
    FlagSpec(
        name="--device-discovery-strategy", envs=("DEVICE_DISCOVERY_STRATEGY",),
        attr="flags.device_discovery_strategy", config_key="flags.deviceDiscoveryStrategy",
        kind="choice", choices=DISCOVERY_STRATEGIES, default="auto", group=_NVML,
        nvidia_error="invalid --device-discovery-strategy option {value}",
        help="how devices are discovered"),
    FlagSpec(
        name="--health-recovery-window", envs=("HEALTH_RECOVERY_WINDOW",),
        attr="flags.health_recovery_window", config_key="flags.healthRecoveryWindow",
        kind="seconds", default="60", group=_NVML,
        help="an Unhealthy GPU comes back once NVML answers for it, no critical event came "
             "for this long and no page retirement or row remap is pending; 0 never "
             "recovers, as NVIDIA's plugin (seconds, or a duration such as 2m)"),
    FlagSpec(
        name="--health-probe-interval", envs=("HEALTH_PROBE_INTERVAL",),
        attr="flags.health_probe_interval", config_key="flags.healthProbeInterval",
        kind="positive-seconds", default="5", group=_NVML,
        help="how often every GPU is probed through NVML (lost GPUs, recovery) "
             "(seconds, or a duration such as 500ms)"),
    # -- Allocate
    FlagSpec(
        name="--pass-device-specs", envs=("PASS_DEVICE_SPECS",),
        attr="flags.plugin.pass_device_specs", config_key="flags.plugin.passDeviceSpecs",
        kind="bool", default="false", group=_ALLOCATE,
        help="also return the device nodes from Allocate (for the CPU manager; needs a "
             "privileged pod)"),
    FlagSpec(
        name="--device-list-strategy", envs=("DEVICE_LIST_STRATEGY",),
        attr="flags.plugin.device_list_strategy", config_key="flags.plugin.deviceListStrategy",
        kind="list", choices=DEVICE_LIST_STRATEGIES, default="envvar", group=_ALLOCATE,
        metavar="STRATEGY[,...]",
        nvidia_error="invalid --device-list-strategy option: invalid strategy: {value}",
        help="how Allocate hands devices to the container runtime: any of "
             + ", ".join(DEVICE_LIST_STRATEGIES) + " (comma-separated or repeated)"),
    FlagSpec(
        name="--device-id-strategy", envs=("DEVICE_ID_STRATEGY",),
        attr="flags.plugin.device_id_strategy", config_key="flags.plugin.deviceIDStrategy",
        kind="choice", choices=DEVICE_ID_STRATEGIES, default="uuid", group=_ALLOCATE,
        nvidia_error="invalid --device-id-strategy option: {value}",
        help="name devices to the runtime by UUID or by index"),
    FlagSpec(
        name="--gdrcopy-enabled", envs=("GDRCOPY_ENABLED",), attr="flags.gdrcopy_enabled",
        config_key="flags.gdrcopyEnabled", kind="bool", default="false", group=_ALLOCATE,
        help="ask the container runtime for GDRCopy (NVIDIA_GDRCOPY=enabled)"),
    FlagSpec(
        name="--gds-enabled", envs=("GDS_ENABLED",), attr="flags.gds_enabled",
        config_key="flags.gdsEnabled", kind="bool", default="false", group=_ALLOCATE,
        help="ask the container runtime for GPUDirect Storage (NVIDIA_GDS=enabled)"),
    FlagSpec(
        name="--mofed-enabled", envs=("MOFED_ENABLED",), attr="flags.mofed_enabled",
        config_key="flags.mofedEnabled", kind="bool", default="false", group=_ALLOCATE,
        help="ask the container runtime for MOFED (NVIDIA_MOFED=enabled)"),
    FlagSpec(
        name="--imex-channel-ids", envs=("IMEX_CHANNEL_IDS",), attr="imex.channel_ids",
        config_key="imex.channelIDs", kind="int-list", default="none", group=_ALLOCATE,
        help="IMEX channels handed to containers: none or 0 (comma-separated or repeated)"),
    FlagSpec(
        name="--imex-required", envs=("IMEX_REQUIRED",), attr="imex.required",
        config_key="imex.required", kind="bool", default="false", group=_ALLOCATE,
        help="the IMEX channels must exist at start-up (else a missing one is skipped)"),
    # -- Sharing and MIG
    FlagSpec(
        name="--mig-strategy", envs=("MIG_STRATEGY",), attr="flags.mig_strategy",
        config_key="flags.migStrategy", kind="choice", choices=MIG_STRATEGIES, default="none",
        group=_SHARING, nvidia_error="unknown MIG strategy: {value}",
        help="how MIG devices are advertised"),
    FlagSpec(
        name="--mps-root", envs=("MPS_ROOT",), attr="flags.mps_root", config_key="flags.mpsRoot",
        kind="optional-str", default="unset", group=_SHARING, metavar="PATH",
        help="the host directory of the MPS control daemons (required for MPS sharing)"),
    FlagSpec(
        name="--shared-devices-allocation-policy", envs=("SHARED_DEVICES_ALLOCATION_POLICY",),
        attr="flags.plugin.shared_devices_allocation_policy",
        config_key="flags.plugin.sharedDevicesAllocationPolicy", kind="choice",
        choices=ALLOCATION_POLICIES, default="distributed", group=_SHARING,
        nvidia_error="invalid --shared-devices-allocation-policy option: {value}",
        help="how replicas of shared GPUs are picked"),
    # -- CDI
    FlagSpec(
        name="--cdi-annotation-prefix", envs=("CDI_ANNOTATION_PREFIX",),
        attr="flags.plugin.cdi_annotation_prefix", config_key="flags.plugin.cdiAnnotationPrefix",
        kind="str", default="cdi.k8s.io/", group=_CDI, metavar="PREFIX",
        help="the prefix of the cdi-annotations strategy's annotations"),
    FlagSpec(
        name="--nvidia-cdi-hook-path", aliases=("--nvidia-ctk-path",),
        envs=("NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH"),
        attr="flags.plugin.nvidia_cdi_hook_path", config_key="flags.plugin.nvidiaCTKPath",
        kind="str", default="/usr/bin/nvidia-ctk", group=_CDI, metavar="PATH",
        help="the CDI hook binary written into generated CDI specs"),
    FlagSpec(
        name="--cdi-kind", envs=("CDI_KIND",), attr="flags.plugin.cdi_kind",
        config_key="flags.plugin.cdiKind", kind="str", default="nvidia.com/gpu", group=_CDI,
        metavar="VENDOR/CLASS", help="the CDI kind of our CDI device names"),
    FlagSpec(
        name="--cdi-feature-flags", envs=("CDI_FEATURE_FLAGS",), attr="flags.cdi_feature_flags",
        config_key=None, kind="list", default="none", group=_CDI,
        help="feature flags of the CDI spec generator (comma-separated or repeated)"),
    FlagSpec(
        name="--cdi-disable-hooks", envs=("CDI_DISABLE_HOOKS",), attr="flags.cdi_disable_hooks",
        config_key=None, kind="list", default="none", group=_CDI,
        help="CDI hooks left out of generated specs; all removes every hook "
             "(comma-separated or repeated)"),
    # -- Simulation (this process only)
    FlagSpec(
        name="--simulate", envs=("SIMULATE",), attr=None, config_key=None, kind="optional-str",
        default="off", group=_SIMULATION, metavar="PRESET|FILE",
        help="serve a simulated node through a simulated NVML instead of the real one: a "
             "preset or a YAML/JSON node file"),
    FlagSpec(
        name="--simulate-control", envs=("SIMULATE_CONTROL",), attr=None, config_key=None,
        kind="optional-str", default="off", group=_SIMULATION, metavar="PATH",
        help="with --simulate: serve a fault-injection socket here (see 'inject')"),
    # -- Logging
    FlagSpec(
        name="--log-level", envs=("LOG_LEVEL",), attr=None, config_key=None, kind="choice",
        choices=_LOG_LEVELS, default="info, and error for the demo", group=_LOGGING,
        help="the least severe log records shown"),
    FlagSpec(
        name="--log-format", envs=("LOG_FORMAT",), attr=None, config_key=None, kind="choice",
        choices=("text", "json"), default="text", group=_LOGGING,
        help="text for people, json (one object per line) for log pipelines"),
    FlagSpec(
        name="--metrics-address", envs=("METRICS_ADDRESS",), attr=None, config_key=None,
        kind="optional-str", default="off", group=_LOGGING, metavar="HOST:PORT",
        help="serve /healthz, /readyz and /metrics (Prometheus) here; needs the 'metrics' "
             "extra (h11, prometheus_client)"),
)

_SPECS_BY_KEY: Final = {spec.config_key: spec for spec in FLAGS if spec.config_key}
# Config-file settings without a flag: key -> (attr, kind).
_FILE_ONLY: Final[dict[str, tuple[str, FlagKind]]] = {
    "flags.useNodeFeatureAPI": ("flags.use_node_feature_api", "bool"),
}
# Sections whose keys are the rows above.
_FLAG_SECTIONS: Final = ("flags", "flags.plugin", "imex")


def _document_fields(cls: type, prefix: str) -> None:
    """Append an ``Attributes:`` section to ``cls``'s docstring, one line per field from
    :data:`FLAGS` (its help, flag, environment twins, config-file key and default), so
    that ``help(Flags)`` documents every field with NVIDIA's names and the table stays
    the one place they are written."""
    lines = ["", "Attributes:"]
    for field in dataclasses.fields(cls):
        attr = f"{prefix}.{field.name}"
        spec = next((s for s in FLAGS if s.attr == attr), None)
        if spec is not None:
            where = ", ".join([f"``{spec.name}``", *(f"``${e}``" for e in spec.envs),
                               *([f"config ``{spec.config_key}``"] if spec.config_key else
                                 ["command line and environment only"])])
            lines.append(f"    {field.name}: {spec.help} ({where}; default {spec.default})")
            continue
        key = next((k for k, (a, _) in _FILE_ONLY.items() if a == attr), None)
        if key is not None:
            lines.append(f"    {field.name}: config ``{key}`` only (no flag, as in NVIDIA's)")
        elif field.name == "plugin":
            lines.append(f"    {field.name}: ``{prefix}.plugin`` (:class:`PluginFlags`)")
        else:
            raise AssertionError(f"{attr} is neither a flag nor a config-file key")
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + "\n".join(lines)


_document_fields(Flags, "flags")
_document_fields(PluginFlags, "flags.plugin")
_document_fields(Imex, "imex")
# GPU feature discovery's section: the same file serves GFD and the plugin (the Helm chart
# shares it), so it is skipped without a warning, as NVIDIA's plugin does.
_IGNORED_KEYS: Final = frozenset({"flags.gfd"})
_CDI_STRATEGIES: Final = frozenset(s for s in DEVICE_LIST_STRATEGIES if s.startswith("cdi-"))


# --------------------------------------------------------------------------------------
# Converters from text (command line, environment)


def parse_bool(value: str) -> bool:
    """A boolean the way NVIDIA's flags (Go's ``strconv.ParseBool``) read one."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (true or false)")


_DURATION_UNITS: Final = {
    "ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART: Final = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_DURATION: Final = re.compile(rf"[+-]?(?:{_DURATION_PART})+")


def _go_duration(value: str) -> float | None:
    """Go's ``time.ParseDuration`` in seconds, or ``None`` if ``value`` is not one."""
    if value in ("0", "+0", "-0"):
        return 0.0
    if not _DURATION.fullmatch(value):
        return None
    total = sum(float(number) * _DURATION_UNITS[unit]
                for number, unit in re.findall(_DURATION_PART, value))
    return -total if value.startswith("-") else total


def parse_seconds(value: str) -> float:
    """A finite number of seconds >= 0: a plain number (``90``, ``1.5``) or a Go
    duration (``90s``, ``2m``, ``500ms``, ``1h30m``)."""
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        duration = _go_duration(text)
        if duration is None:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a number of seconds or a duration such as 90s, 2m or "
                "500ms") from None
        number = duration
    if not (number >= 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"{value!r} must be a finite number of seconds >= 0")
    return number


def parse_positive_seconds(value: str) -> float:
    """As :func:`parse_seconds`, but more than 0."""
    number = parse_seconds(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be more than 0 seconds")
    return number


def _parse_list(value: str) -> tuple[str, ...]:
    # urfave's string slices split on commas; blanks around items are not meant.
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _parse_int_list(value: str) -> tuple[int, ...]:
    result = []
    for item in _parse_list(value):
        try:
            result.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a comma-separated list of integers") from None
    return tuple(result)


def _convert(spec: FlagSpec, value: str) -> Any:
    """``value`` read as ``spec``'s kind; raises ``ArgumentTypeError`` if it is not one.
    Choices are checked separately (:func:`_check`), on the value that wins."""
    if spec.kind == "bool":
        return parse_bool(value)
    if spec.kind == "list":
        return _parse_list(value)
    if spec.kind == "int-list":
        return _parse_int_list(value)
    if spec.kind == "seconds":
        return parse_seconds(value)
    if spec.kind == "positive-seconds":
        return parse_positive_seconds(value)
    return value


def _go_slice(values: Sequence[object]) -> str:
    """A slice the way Go's ``%v`` prints one: ``[0 1]``."""
    return "[" + " ".join(str(v) for v in values) + "]"


def _check(spec: FlagSpec, value: Any) -> Any:
    """``value`` (already of ``spec``'s kind) checked against what ``spec`` allows;
    raises ``ArgumentTypeError`` naming the value, what is allowed and NVIDIA's text."""

    def refuse(item: str) -> argparse.ArgumentTypeError:
        text = f"{item!r} is not one of {', '.join(spec.choices)}"
        if spec.nvidia_error is not None:
            text += f" ({spec.nvidia_error.format(value=item)})"
        return argparse.ArgumentTypeError(text)

    if spec.kind == "choice" and value not in spec.choices:
        raise refuse(value)
    if spec.kind == "list" and spec.choices:
        for item in value:
            if item not in spec.choices:
                raise refuse(item)
        if not value:
            raise argparse.ArgumentTypeError(
                "invalid --device-list-strategy option: no device list strategy specified; "
                f"at least one of {_go_slice(spec.choices)} is required")
        # NVIDIA keeps them in a set: naming one twice means it once.
        return tuple(dict.fromkeys(value))
    if spec.attr == "imex.channel_ids" and tuple(value) not in ((), (0,)):
        raise argparse.ArgumentTypeError(
            "invalid IMEX channel IDs: invalid IMEX config: channelIDs must be [] or [0]; "
            f"found {_go_slice(value)}")
    return value


def _argparse_type(spec: FlagSpec) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        return _check(spec, _convert(spec, value))

    convert.__name__ = spec.kind
    return convert


# --------------------------------------------------------------------------------------
# argparse


class _Extend(argparse.Action):
    """Repeated list flags add up (``--device-list-strategy=envvar
    --device-list-strategy=cdi-cri``), as urfave's slices do."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest, None) or ()
        setattr(namespace, self.dest, tuple(before) + tuple(values or ()))


def _help(spec: FlagSpec) -> str:
    envs = " or ".join(spec.envs)
    text = f"{spec.help} (env {envs}; default {spec.default})"
    # argparse %-formats help strings.
    return text.replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, *, default: Any = None) -> None:
    """Add every flag of :data:`FLAGS` to ``parser``, in :data:`FLAG_GROUPS` groups.

    Every flag's destination is :attr:`FlagSpec.dest` and its default ``default``:
    ``None`` (not given), or ``argparse.SUPPRESS`` on a subcommand's parser, so that a
    flag given after the subcommand sets its value and one not given there leaves what
    was given before the subcommand.
    environment, config file and defaults are applied later by :func:`resolve_config` and
    :func:`flag_value`.  Values are converted (and choices checked) by argparse, whose
    error names the flag.  A bool flag alone means true (``--pass-device-specs``) and takes
    a value after ``=`` (``--pass-device-specs=false``); list flags split on commas and
    add up when repeated.  A bool flag directly before a subcommand needs its ``=value``
    (argparse would otherwise read the subcommand as the flag's value and refuse it).
    """
    groups = {title: parser.add_argument_group(title) for title in FLAG_GROUPS
              if any(spec.group == title for spec in FLAGS)}
    for spec in FLAGS:
        group = groups[spec.group]
        names = (spec.name, *spec.aliases)
        common: dict[str, Any] = {
            "dest": spec.dest, "default": default, "metavar": spec.display_metavar,
            "help": _help(spec), "type": _argparse_type(spec),
        }
        if spec.kind == "bool":
            group.add_argument(*names, nargs="?", const=True, **common)
        elif spec.kind in ("list", "int-list"):
            group.add_argument(*names, action=_Extend, **common)
        else:
            group.add_argument(*names, **common)


# --------------------------------------------------------------------------------------
# Command line and environment


def _from_cli(spec: FlagSpec, cli: Mapping[str, Any]) -> tuple[bool, Any]:
    """Whether ``cli`` gives ``spec`` a value, and that value converted."""
    keys = (spec.name, spec.dest, *spec.aliases, *(_dest(a) for a in spec.aliases))
    for key in keys:
        value = cli.get(key)
        if value is None:
            continue
        try:
            return True, _cli_value(spec, value)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{spec.name}: {exc}") from None
    return False, None


def _cli_value(spec: FlagSpec, value: Any) -> Any:
    """A command-line value: text as the parser would read it, or already converted."""
    if isinstance(value, str):
        return _convert(spec, value)
    if spec.kind == "bool" and isinstance(value, bool):
        return value
    if spec.kind == "list" and isinstance(value, Sequence) and all(
            isinstance(v, str) for v in value):
        return tuple(value)
    if spec.kind == "int-list" and isinstance(value, Sequence) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    if spec.kind in ("seconds", "positive-seconds") and isinstance(value, (int, float)) \
            and not isinstance(value, bool):
        return _convert(spec, repr(float(value)))
    raise argparse.ArgumentTypeError(f"{value!r} is not a valid {spec.kind} value")


def _from_env(spec: FlagSpec, env: Mapping[str, str],
              warnings: list[str]) -> tuple[bool, Any, str]:
    """Whether an environment twin of ``spec`` is set, its converted value and its name.

    The first twin present wins, as urfave reads them.  An empty value counts as unset,
    except for plain strings where urfave keeps it (an empty ``KUBELET_SOCKET`` is a
    value).
    """
    present = [name for name in spec.envs if name in env
               and (env[name] != "" or spec.kind == "str")]
    if not present:
        return False, None, ""
    name = present[0]
    for other in present[1:]:
        if env[other] != env[name]:
            warnings.append(f"environment variable {other} ignored: {name} is set and wins")
    try:
        return True, _convert(spec, env[name]), f"environment variable {name}"
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"environment variable {name}: {exc}") from None


def _spec(name: str) -> FlagSpec:
    for spec in FLAGS:
        if name in (spec.name, spec.dest, *spec.aliases):
            return spec
    raise KeyError(name)


def flag_value(name: str, cli: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    """One flag's value from the command line, else its environment twin; ``None`` if
    neither sets it (the config file is not consulted).

    For what is needed before the config file is read (``--config-file``) and for the
    flags that are not part of :class:`Config` (``--simulate``, ``--simulate-control``,
    ``--log-level``).  ``name`` is a flag name, alias or dest; ``cli`` as for
    :func:`resolve_config`.  Raises :class:`ConfigError` for a bad value.
    """
    spec = _spec(name)
    given, value = _from_cli(spec, cli)
    where = spec.name
    if not given:
        given, value, where = _from_env(spec, env, [])
    if not given:
        return None
    value = _checked(spec, value, where)
    if spec.kind == "optional-str" and value == "":
        return None
    return value


def _checked(spec: FlagSpec, value: Any, where: str) -> Any:
    try:
        return _check(spec, value)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------
# The config file's document


def _json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# The flag-table keys with their sections, for a key written in the wrong section
# (``migStrategy`` at the top level belongs under ``flags``).
_ALL_KEYS: Final = tuple(sorted({*_SPECS_BY_KEY, *_FILE_ONLY}))


def _suggestion(key: str, path: str, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for an unknown ``key`` at ``path``: a key valid there that
    differs only in case, else a flag-table key of that name in another section
    (``migStrategy`` at the top level belongs under ``flags``), else the closest key valid
    there, else nothing.  Case is ignored: camelCase typos are mostly case."""
    prefix = f"{path}." if path else ""
    folded = {k.lower(): k for k in known}
    if key.lower() in folded:
        return f"; did you mean '{prefix}{folded[key.lower()]}'?"
    elsewhere = [full for full in _ALL_KEYS if full.rpartition(".")[2].lower() == key.lower()]
    if elsewhere:
        return (f"; did you mean '{elsewhere[0]}'? (that key belongs in "
                f"'{elsewhere[0].rpartition('.')[0]}')")
    near = difflib.get_close_matches(key.lower(), list(folded), n=1, cutoff=0.75)
    if near:
        return f"; did you mean '{prefix}{folded[near[0]]}'?"
    return ""


class _Reader:
    """Walks one parsed config document, collecting warnings; errors name the key."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.warnings: list[str] = []
        #: attr -> (value, where) for every flag-table key the document sets.
        self.values: dict[str, tuple[Any, str]] = {}

    def error(self, path: str, text: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {text}" if path else f"{self.source}: {text}")

    def mapping(self, node: Any, path: str, known: Sequence[str]) -> dict[str, Any]:
        """``node`` as a mapping (``None``: empty), warning about keys not in ``known``."""
        if node is None:
            return {}
        if not isinstance(node, Mapping):
            raise self.error(path, f"{_json(node)} is not a mapping")
        for key in node:
            if key not in known:
                full = f"{path}.{key}" if path else str(key)
                self.warnings.append(f"{self.source}: unknown key '{full}' (ignored)"
                                     f"{_suggestion(str(key), path, known)}")
        return {str(k): v for k, v in node.items() if k in known}

    def sequence(self, node: Any, path: str) -> list[Any]:
        if not isinstance(node, list):
            raise self.error(path, f"{_json(node)} is not a list")
        return node

    def boolean(self, node: Any, path: str) -> bool:
        if not isinstance(node, bool):
            raise self.error(path, f"{_json(node)} is not a boolean (true or false)")
        return node

    def string(self, node: Any, path: str) -> str:
        if not isinstance(node, str):
            raise self.error(path, f"{_json(node)} is not a string")
        return node

    def integer(self, node: Any, path: str) -> int:
        if isinstance(node, bool) or not isinstance(node, int):
            raise self.error(path, f"{_json(node)} is not an integer")
        return node

    def resource_name(self, node: Any, path: str) -> str:
        text = self.string(node, path)
        try:
            return new_resource_name(text)
        except ConfigError as exc:
            raise self.error(path, str(exc)) from None

    # -- the flag-table sections

    def flag_value(self, kind: FlagKind, node: Any, path: str) -> Any:
        """A config-file value of ``kind``, type-checked (choices come later)."""
        if kind == "bool":
            return self.boolean(node, path)
        if kind in ("str", "optional-str", "choice"):
            return self.string(node, path)
        if kind == "list":
            # NVIDIA: a string or a list of strings (one string is not split on commas).
            if isinstance(node, str):
                return (node,)
            if isinstance(node, list) and all(isinstance(v, str) for v in node):
                return tuple(node)
            last = path.rpartition(".")[2]
            raise self.error(path, f"invalid {last}: {_json(node)} (a string or a list of "
                                   "strings)")
        if kind == "int-list":
            items = self.sequence(node, path)
            return tuple(self.integer(v, f"{path}[{i}]") for i, v in enumerate(items))
        # seconds: a number of seconds, or the same text the command line takes.
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            node = repr(float(node))
        if not isinstance(node, str):
            raise self.error(path, f"{_json(node)} is not a number of seconds or a duration "
                                   "such as 90s, 2m or 500ms")
        try:
            return parse_positive_seconds(node) if kind == "positive-seconds" \
                else parse_seconds(node)
        except argparse.ArgumentTypeError as exc:
            raise self.error(path, str(exc)) from None

    def flag_section(self, node: Any, path: str) -> None:
        """``flags``, ``flags.plugin`` or ``imex``: keys of the flag table."""
        known = [key.rpartition(".")[2] for key in (*_SPECS_BY_KEY, *_FILE_ONLY, *_IGNORED_KEYS,
                                                     *_FLAG_SECTIONS)
                 if key.rpartition(".")[0] == path]
        for key, value in self.mapping(node, path, known).items():
            full = f"{path}.{key}"
            if full in _IGNORED_KEYS:
                continue
            if full in _FLAG_SECTIONS:
                self.flag_section(value, full)
                continue
            if value is None:
                # null reads as unset, as Go's pointers do.
                continue
            where = f"{self.source}: {full}"
            if full in _FILE_ONLY:
                attr, kind = _FILE_ONLY[full]
                self.values[attr] = (self.flag_value(kind, value, full), where)
                continue
            spec = _SPECS_BY_KEY[full]
            assert spec.attr is not None
            self.values[spec.attr] = (self.flag_value(spec.kind, value, full), where)

    # -- resources

    def resources(self, node: Any) -> Resources:
        section = self.mapping(node, "resources", ("gpus", "mig"))
        found: dict[str, tuple[ResourcePattern, ...]] = {}
        for key in ("gpus", "mig"):
            items = section.get(key)
            if items is None:
                continue
            path = f"resources.{key}"
            found[key] = tuple(self.resource_pattern(item, f"{path}[{i}]")
                               for i, item in enumerate(self.sequence(items, path)))
        return Resources(**found)

    def resource_pattern(self, node: Any, path: str) -> ResourcePattern:
        if not isinstance(node, Mapping):
            raise self.error(path, f"{_json(node)} is not a mapping")
        if node.get("pattern") is None:
            raise self.error(path, "resources must have a 'pattern' field set")
        if node.get("name") is None:
            raise self.error(path, "resources must have a 'name' field set")
        entry = self.mapping(node, path, ("pattern", "name"))
        return ResourcePattern(pattern=self.string(entry["pattern"], f"{path}.pattern"),
                               name=self.resource_name(entry["name"], f"{path}.name"))

    # -- sharing

    def sharing(self, node: Any) -> Sharing:
        section = self.mapping(node, "sharing", ("timeSlicing", "mps"))
        time_slicing = mps = None
        if section.get("timeSlicing") is not None:
            time_slicing = self.strategy(section["timeSlicing"], "sharing.timeSlicing")
        if section.get("mps") is not None:
            mps = self.strategy(section["mps"], "sharing.mps")
        if time_slicing is not None and mps is not None:
            # NVIDIA's plugin silently uses MPS and drops the time-slicing entries; a
            # configuration that says both is a mistake we would rather show than guess.
            raise self.error("sharing", "Time-slicing and MPS are mutually exclusive: "
                                        "configure sharing.timeSlicing or sharing.mps, not "
                                        "both")
        return Sharing(time_slicing=time_slicing, mps=mps)

    def strategy(self, node: Any, path: str) -> SharingStrategy:
        section = self.mapping(node, path,
                               ("renameByDefault", "failRequestsGreaterThanOne", "resources"))
        rename_by_default = False
        if section.get("renameByDefault") is not None:
            rename_by_default = self.boolean(section["renameByDefault"],
                                             f"{path}.renameByDefault")
        fail: bool | None = None
        if section.get("failRequestsGreaterThanOne") is not None:
            fail = self.boolean(section["failRequestsGreaterThanOne"],
                                f"{path}.failRequestsGreaterThanOne")
        items = section.get("resources")
        if items is None:
            raise self.error(path, "no resources specified")
        items = self.sequence(items, f"{path}.resources")
        if not items:
            raise self.error(f"{path}.resources", "no resources specified")
        resources = tuple(self.replicated(item, f"{path}.resources[{i}]", rename_by_default)
                          for i, item in enumerate(items))
        return SharingStrategy(resources=resources, rename_by_default=rename_by_default,
                               fail_requests_greater_than_one=fail)

    def replicated(self, node: Any, path: str, rename_by_default: bool) -> ReplicatedResource:
        if not isinstance(node, Mapping):
            raise self.error(path, f"{_json(node)} is not a mapping")
        if node.get("name") is None:
            raise self.error(path, "no resource name specified")
        entry = self.mapping(node, path, ("name", "rename", "devices", "replicas"))
        name = self.resource_name(entry["name"], f"{path}.name")
        if entry.get("replicas") is None:
            raise self.error(path, "no replicas specified")
        replicas = self.integer(entry["replicas"], f"{path}.replicas")
        if replicas < 2:
            raise self.error(f"{path}.replicas",
                             f"number of replicas must be >= 2; found {replicas}")
        if replicas > MAX_REPLICAS:
            # Refused here, before planning could try to build that many devices.
            raise self.error(f"{path}.replicas", _too_many_replicas(replicas))
        # Unlike NVIDIA (#1786), an explicit rename is kept; renameByDefault fills the rest
        # here so that consumers only read ``rename``.
        rename: str | None = None
        if entry.get("rename") is not None:
            rename = self.resource_name(entry["rename"], f"{path}.rename")
        elif rename_by_default:
            rename = name + _SHARED_SUFFIX
        devices = ReplicatedDevices()
        if entry.get("devices") is not None:
            devices = self.devices(entry["devices"], f"{path}.devices")
        return ReplicatedResource(name=name, replicas=replicas, rename=rename, devices=devices)

    def devices(self, node: Any, path: str) -> ReplicatedDevices:
        if isinstance(node, str):
            if node != "all":
                raise self.error(path, f"devices set as '{node}' but the only valid string "
                                       "input is 'all'")
            return ReplicatedDevices()
        if isinstance(node, int) and not isinstance(node, bool):
            if node <= 0:
                raise self.error(path, f"devices set as '{node}' but a count of devices must "
                                       "be > 0")
            return ReplicatedDevices(all=False, count=node)
        if isinstance(node, list):
            if not node:
                # NVIDIA would replicate no device at all; that is never what was meant.
                raise self.error(path, "an empty list selects no devices (use all, a count "
                                       "or a non-empty list)")
            ids = tuple(self.device_ref(item, f"{path}[{i}]") for i, item in enumerate(node))
            return ReplicatedDevices(all=False, ids=ids)
        raise self.error(path, f"unrecognized type for devices spec: {_json(node)} (all, a "
                               "count > 0 or a list of devices)")

    def device_ref(self, node: Any, path: str) -> str:
        if isinstance(node, int) and not isinstance(node, bool) and node >= 0:
            return str(node)
        if isinstance(node, str) and _is_device_ref(node):
            return node
        raise self.error(path, f"unsupported type for device in devices list: {_json(node)} "
                               "(a GPU index, a MIG index 'i:j', a GPU UUID or a MIG UUID)")


def _too_many_replicas(replicas: int) -> str:
    return (f"{replicas} replicas can never be served: at most {MAX_REPLICAS} fit in the "
            f"{MAX_LIST_AND_WATCH_BYTES // (1024 * 1024)} MiB ListAndWatch response the "
            "kubelet accepts, even for a single GPU (fewer on a node with more GPUs or "
            "longer device IDs)")


_UINT: Final = re.compile(r"\d+")
_HEX_UUID: Final = re.compile(
    r"(?:urn:uuid:)?(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{12}|\{[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{12}\}|[0-9a-fA-F]{32})")


def _is_uuid(text: str) -> bool:
    # The forms Go's uuid.Parse takes; Python's UUID() would also take hyphens anywhere.
    return _HEX_UUID.fullmatch(text) is not None


def _is_device_ref(ref: str) -> bool:
    """NVIDIA's ``ReplicaDeviceRef``: a GPU index, ``i:j``, a GPU or a MIG UUID."""
    if _UINT.fullmatch(ref):
        return True
    parts = ref.split(":")
    if len(parts) == 2 and all(_UINT.fullmatch(p) for p in parts):
        return True
    if ref.startswith("GPU-"):
        return _is_uuid(ref[4:])
    if ref.startswith("MIG-"):
        suffix = ref[4:]
        if _is_uuid(suffix):
            return True
        legacy = suffix.split("/", 2)
        return (len(legacy) == 3 and legacy[0].startswith("GPU-") and _is_uuid(legacy[0][4:])
                and all(_UINT.fullmatch(p) for p in legacy[1:]))
    return False


_DNS1123_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1123_MESSAGE: Final = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")


def new_resource_name(name: str) -> str:
    """NVIDIA's ``NewResourceName``: ``nvidia.com/`` put in front if missing, at most 63
    characters in all, and the part after the ``/`` a DNS-1123 subdomain.  Raises
    :class:`ConfigError` with NVIDIA's texts."""
    if not name.startswith(_RESOURCE_PREFIX + "/"):
        name = f"{_RESOURCE_PREFIX}/{name}"
    if len(name) > _MAX_RESOURCE_NAME_LENGTH:
        raise ConfigError(f"fully-qualified resource name must be {_MAX_RESOURCE_NAME_LENGTH} "
                          f"characters or less: {name}")
    short = name.split("/", 1)[1]
    problems = []
    if len(short) > 253:
        problems.append("must be no more than 253 characters")
    if not _DNS1123_SUBDOMAIN.fullmatch(short):
        problems.append(_DNS1123_MESSAGE)
    if problems:
        raise ConfigError(f"incorrect format for resource name '{name}': [{' '.join(problems)}]")
    return name


# --------------------------------------------------------------------------------------
# Resolution


def resolve_config(cli: Mapping[str, Any], env: Mapping[str, str], document: Any | None, *,
                   source: str = "config file") -> tuple[Config, list[str]]:
    """The effective :class:`Config` and warnings, from the command line, the environment
    and a parsed config file (``document``; ``None``: no file).

    Each flag takes its value from the command line, else its first environment twin that
    is set, else the config file, else the dataclass default.  ``cli`` maps a flag's name
    (``"--mig-strategy"``), alias or dest (``"mig_strategy"``, see :attr:`FlagSpec.dest`)
    to its value; ``None`` or an absent key means not given, so ``vars(args)`` from a
    parser built by :func:`add_flags` can be passed as is (other keys are ignored).
    Values may be text (converted as the parser would) or already converted.

    ``source`` names the file in messages.  Unknown keys are warnings, never fatal;
    ``flags.gfd`` (GPU feature discovery's) is skipped silently.  Anything else that cannot
    be used raises :class:`ConfigError` naming where it came from, the value and what is
    allowed, with NVIDIA's error text where NVIDIA has one.
    """
    reader = _Reader(source)
    if isinstance(document, ConfigDocument):
        reader.warnings.extend(document.notes)
    resources, sharing = Resources(), Sharing()
    if document is not None:
        resources, sharing = _read_document(reader, document)
    warnings = reader.warnings
    chosen: dict[str, Any] = {}
    for spec in FLAGS:
        if spec.attr is None:
            continue
        given, value = _from_cli(spec, cli)
        where = spec.name
        if not given:
            given, value, where = _from_env(spec, env, warnings)
        if not given and spec.attr in reader.values:
            given = True
            value, where = reader.values[spec.attr]
        if not given:
            continue
        # Only the value in force is checked against its choices, as NVIDIA validates
        # after merging: a file's bad value overridden by a flag does not stop start-up.
        value = _checked(spec, value, where)
        if spec.kind == "optional-str" and value == "":
            value = None
        chosen[spec.attr] = value
    for attr, _kind in _FILE_ONLY.values():
        if attr in reader.values:
            chosen[attr] = reader.values[attr][0]
    sections: dict[str, dict[str, Any]] = {section: {} for section in _FLAG_SECTIONS}
    for attr, value in chosen.items():
        section, _, field = attr.rpartition(".")
        sections[section][field] = value
    flags = Flags(plugin=PluginFlags(**sections["flags.plugin"]), **sections["flags"])
    config = Config(flags=flags, resources=resources, sharing=sharing,
                    imex=Imex(**sections["imex"]))
    _check_combination(config)
    return config, warnings


def _read_document(reader: _Reader, document: Any) -> tuple[Resources, Sharing]:
    if not isinstance(document, Mapping):
        raise reader.error("", f"the document must be a mapping, not {_json(document)}")
    version = document.get("version")
    if version not in (None, "", "v1"):
        raise reader.error("version", f"unknown version: {version} (only v1 is known)")
    top = reader.mapping(document, "", ("version", "flags", "resources", "sharing", "imex"))
    for section in ("flags", "imex"):
        reader.flag_section(top.get(section), section)
    return reader.resources(top.get("resources")), reader.sharing(top.get("sharing"))


def _check_combination(config: Config) -> None:
    """NVIDIA's ``validateFlags`` checks that span several settings."""
    if config.sharing.strategy == "mps":
        if config.flags.mig_strategy == "mixed":
            raise ConfigError("using --mig-strategy=mixed is not supported with MPS "
                              "(sharing.mps is configured)")
        if not config.flags.mps_root:
            raise ConfigError("using MPS requires --mps-root to be specified (flag "
                              "--mps-root, env MPS_ROOT or flags.mpsRoot)")
    if config.flags.device_discovery_strategy != "auto":
        check_platform(config, config.flags.device_discovery_strategy)


def check_platform(config: Config, platform: str) -> None:
    """Raise :class:`ConfigError` if ``config`` asks for CDI device-list strategies on a
    platform that is not NVML-based (``platform``: the resolved discovery strategy,
    ``nvml`` or ``tegra``), as NVIDIA's ``validateFlags``.

    :func:`resolve_config` checks an explicit ``tegra``; call this once ``auto`` is
    resolved.
    """
    cdi = [s for s in config.flags.plugin.device_list_strategy if s in _CDI_STRATEGIES]
    if platform == "tegra" and cdi:
        raise ConfigError("CDI --device-list-strategy options are only supported on "
                          f"NVML-based systems (discovery strategy {platform}; device list "
                          f"strategy {', '.join(cdi)})")


# --------------------------------------------------------------------------------------
# Loading and showing


class ConfigDocument(dict[str, Any]):
    """A config file's mapping as :func:`load_config_file` read it, with ``notes``: what
    an operator should hear about how it was read (an empty file, trailing commas).
    :func:`resolve_config` puts the notes first among its warnings."""

    def __init__(self, mapping: Mapping[str, Any], notes: Sequence[str] = ()) -> None:
        super().__init__(mapping)
        self.notes: tuple[str, ...] = tuple(notes)


def validate_config(config: Config) -> None:
    """Check a :class:`Config` built in Python as :func:`load_config` checks what it
    reads: every setting a flag gives must be one the flag would take
    (:class:`ConfigError` names the config key, or the flag, the value and what is
    allowed)."""
    for spec in FLAGS:
        if spec.attr is None:
            continue
        value: Any = config
        for part in spec.attr.split("."):
            value = getattr(value, part)
        where = spec.config_key or spec.name
        if spec.kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not a boolean")
        if spec.kind in ("seconds", "positive-seconds") and (
                isinstance(value, bool) or not isinstance(value, (int, float))
                or value < 0 or (spec.kind == "positive-seconds" and value == 0)):
            raise ConfigError(f"{where}: {value!r} is not a "
                              f"{'positive' if spec.kind == 'positive-seconds' else 'non-negative'}"
                              " number of seconds")
        if spec.kind in ("str", "choice") and not isinstance(value, str):
            raise ConfigError(f"{where}: {value!r} is not a string")
        try:
            _check(spec, value)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def load_config_file(path: str) -> Any:
    """The parsed YAML or JSON document of the config file at ``path``; a mapping comes
    as a :class:`ConfigDocument`.  An empty file (or one with only comments) gives an
    empty mapping, all defaults, with a note saying so.  JSON with trailing commas is
    read as YAML reads it, as NVIDIA's plugin does (sigs.k8s.io/yaml: go-yaml takes
    ``[1, 2,]``), with a note naming the lines.  Raises :class:`ConfigError` naming the
    file, and the line and column the parser stopped at."""
    # PyYAML is only needed (and imported) when there is a config file.
    import yaml

    where = f"config file {path}"
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text: {exc}") from None
    if not text.strip():
        # Blank lines with tabs would be a YAML error; an empty file is what was meant.
        return _document({}, [_empty_note(where)])
    json_error: json.JSONDecodeError | None = None
    if text.lstrip().startswith(("{", "[")):
        # JSON first: PyYAML (YAML 1.1) refuses some valid JSON, such as tab indentation.
        try:
            return _document(json.loads(text), ())
        except json.JSONDecodeError as exc:
            json_error = exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if json_error is not None:
            raise ConfigError(f"{where}: invalid JSON at line {json_error.lineno}, column "
                              f"{json_error.colno}: {json_error.msg}") from None
        raise ConfigError(f"{where}: invalid YAML{_yaml_position(exc)}") from None
    notes: list[str] = []
    if document is None:
        notes.append(_empty_note(where))
        document = {}
    if json_error is not None:
        lines = _trailing_comma_lines(text)
        if lines:
            listed = ", ".join(str(n) for n in lines)
            many = len(lines) > 1
            notes.append(f"{where}: trailing comma{'s' if many else ''} on line"
                         f"{'s' if many else ''} {listed}, which JSON does not allow; read "
                         "as YAML, which allows them (as NVIDIA's plugin reads the file); "
                         "remove them so that JSON tools can read it too")
    return _document(document, notes)


def load_config(file: str | os.PathLike[str] | None = None, *, document: Any | None = None,
                flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                ) -> tuple[Config, list[str]]:
    """Build a :class:`Config` as NVIDIA's plugin does, with its precedence: a flag,
    else its environment twin, else the config file, else the built-in default.

    Args:
        file: a config file (YAML or JSON, NVIDIA's ``version: v1`` format) to read.
        document: the same content already parsed (a mapping with NVIDIA's keys:
            ``{"sharing": {"timeSlicing": {...}}}``), instead of ``file``.
        flags: flag values by name, alias or dest (``{"--mig-strategy": "single"}``,
            ``{"kubelet_socket": "/run/k.sock"}``), text or already converted; ``None``
            values count as not given, so ``vars(args)`` of an :func:`add_flags` parser
            can be passed as is.
        env: the environment to read the flags' twins from (``MIG_STRATEGY``...); none
            by default: pass ``os.environ`` to read the process's own.

    Returns the configuration and the warnings an operator should see (unknown keys,
    notes on how the file was read), which are not logged here.  Raises
    :class:`ConfigError` naming what cannot be used.
    """
    if file is not None and document is not None:
        raise ValueError("give a config file or a parsed document, not both")
    source = "config file"
    if file is not None:
        path = os.fspath(file)
        document, source = load_config_file(path), f"config file {path}"
    return resolve_config(flags or {}, env or {}, document, source=source)


def _empty_note(where: str) -> str:
    return (f"{where} is empty (or holds only comments): it configures nothing; flags, "
            "environment variables and built-in defaults apply")


def _document(document: Any, notes: Sequence[str]) -> Any:
    # A document that is not a mapping is refused by resolve_config, notes or not.
    return ConfigDocument(document, notes) if isinstance(document, dict) else document


# A JSON string (skipped, so that commas inside one do not count) or a comma followed
# only by blanks and a closing bracket.
_JSON_STRING_OR_TRAILING_COMMA: Final = re.compile(r'"(?:[^"\\]|\\.)*"|,(?=\s*[\]}])')


def _trailing_comma_lines(text: str) -> list[int]:
    """The line numbers (from 1) of commas that end a JSON array or object."""
    return list(dict.fromkeys(text.count("\n", 0, match.start()) + 1
                              for match in _JSON_STRING_OR_TRAILING_COMMA.finditer(text)
                              if match.group() == ","))


def _yaml_position(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    detail = f"{problem} ({context})" if context else problem
    if mark is None:
        return f": {detail}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {detail}"


# The config-file keys in the order of NVIDIA's structs (ours after theirs), for output.
_DOCUMENT_ORDER: Final = (
    "flags.migStrategy", "flags.failOnInitError", "flags.mpsRoot", "flags.nvidiaDriverRoot",
    "flags.nvidiaDevRoot", "flags.gdrcopyEnabled", "flags.gdsEnabled", "flags.mofedEnabled",
    "flags.useNodeFeatureAPI", "flags.deviceDiscoveryStrategy", "flags.healthRecoveryWindow",
    "flags.healthProbeInterval", "flags.plugin.passDeviceSpecs",
    "flags.plugin.deviceListStrategy", "flags.plugin.deviceIDStrategy",
    "flags.plugin.cdiAnnotationPrefix", "flags.plugin.nvidiaCTKPath",
    "flags.plugin.containerDriverRoot", "flags.plugin.sharedDevicesAllocationPolicy",
    "flags.plugin.cdiKind", "imex.channelIDs", "imex.required",
)


def _get(config: Config, attr: str) -> Any:
    value: Any = config
    for part in attr.split("."):
        value = getattr(value, part)
    return value


def _put(document: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        document = document.setdefault(part, {})
    document[last] = value


def _devices_document(devices: ReplicatedDevices) -> Any:
    if devices.count is not None:
        return devices.count
    if devices.ids:
        return list(devices.ids)
    return "all"


def _strategy_document(strategy: SharingStrategy) -> dict[str, Any]:
    document: dict[str, Any] = {"renameByDefault": strategy.rename_by_default}
    if strategy.fail_requests_greater_than_one is not None:
        document["failRequestsGreaterThanOne"] = strategy.fail_requests_greater_than_one
    entries = []
    for resource in strategy.resources:
        entry: dict[str, Any] = {"name": resource.name}
        if resource.rename is not None:
            entry["rename"] = resource.rename
        entry["devices"] = _devices_document(resource.devices)
        entry["replicas"] = resource.replicas
        entries.append(entry)
    document["resources"] = entries
    return document


def config_to_document(config: Config) -> dict[str, Any]:
    """``config`` as a config-file document with NVIDIA's key names (``version``,
    ``flags`` with ``plugin``, ``resources``, ``sharing``, ``imex``); read back by
    :func:`resolve_config` it gives ``config`` again.  Command-line-only settings
    (``--kubelet-socket``...) are left out, as NVIDIA's output leaves them; unset optional
    values (``nvidiaDevRoot``, ``mpsRoot``, ``rename``...) are left out."""
    document: dict[str, Any] = {"version": config.version}
    attrs = {**{key: spec.attr for key, spec in _SPECS_BY_KEY.items()},
             **{key: attr for key, (attr, _kind) in _FILE_ONLY.items()}}
    for key in _DOCUMENT_ORDER:
        attr = attrs[key]
        assert attr is not None
        value = _get(config, attr)
        if value is not None:
            _put(document, key, list(value) if isinstance(value, tuple) else value)
    document["resources"] = {
        "gpus": [{"pattern": r.pattern, "name": r.name} for r in config.resources.gpus],
        "mig": [{"pattern": r.pattern, "name": r.name} for r in config.resources.mig],
    }
    sharing: dict[str, Any] = {}
    if config.sharing.time_slicing is not None:
        sharing["timeSlicing"] = _strategy_document(config.sharing.time_slicing)
    if config.sharing.mps is not None:
        sharing["mps"] = _strategy_document(config.sharing.mps)
    document["sharing"] = sharing
    # NVIDIA's order: version, flags, resources, sharing, imex.
    document["imex"] = document.pop("imex")
    return document


def effective_config_json(config: Config, *, indent: int | None = None) -> str:
    """The effective configuration as JSON with NVIDIA's key names, for the start-up log
    line NVIDIA also prints (``Running with config: {...}``); one line unless ``indent``."""
    return json.dumps(config_to_document(config), indent=indent)
