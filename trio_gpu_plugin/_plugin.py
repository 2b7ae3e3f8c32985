"""NVIDIA's device plugin as one object: :class:`GpuPlugin`.

Everything that makes this project a drop-in for NVIDIA's k8s-device-plugin is wired
together here: the configuration (:class:`~trio_gpu_plugin.Config`), NVML and health
(:class:`~trio_gpu_plugin.NvmlNode`), planning (MIG strategies, sharing, renaming:
:class:`~trio_gpu_plugin._configured.NodeSetup`), one
:class:`~trio_gpu_plugin._configured.PlannedSource` per planned resource, the
:class:`~trio_gpu_plugin.DevicePlugin` runtime that serves and registers them, reload
(validated and planned before anything is torn down), the config-file watch, and the
optional health and metrics server.  The ``trio-gpu-plugin`` command is a thin driver of
it (flags, signals); an embedder runs it in its own nursery::

    plugin = GpuPlugin(config, load_pynvml())
    await nursery.start(plugin.run)     # every planned resource registered
    await plugin.reload(new_config)     # raises ConfigError; the old one keeps serving

Log lines keep the logger ``trio_gpu_plugin.cli`` they had when this lived in the
command: operators grep for them.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, cast

import trio

from ._allocate import cdi_warning, find_missing_cdi_devices, required_cdi_devices
from ._config import (
    FLAGS,
    Config,
    ConfigError,
    effective_config_json,
    load_config,
    validate_config,
)
from ._configured import NodeSetup, PlannedSource
from ._health import HealthChecks
from ._inspect import envvar_conflict_warning
from ._node_model import NodeModel
from ._nvml import NVML
from ._nvml_source import NvmlNode
from ._observe import Observer
from ._plan_model import PlannedResource
from ._resources import PlanResult
from ._runtime import DevicePlugin, check_kubelet_socket_path
from ._transport import MAX_UNIX_PATH
from ._watch import Identity, PathWatcher, identity

if TYPE_CHECKING:
    from ._control import FaultTarget
    from ._metrics import Metrics

__all__ = [
    "CONFIG_SETTLE",
    "ConfigLoader",
    "GpuPlugin",
    "Reload",
    "StartupError",
    "check_cdi",
    "check_plugin_sockets",
    "check_supported",
    "control_bind_reason",
    "first_leaf",
    "log_config",
    "log_plan",
    "metrics_bind_reason",
    "watch_config_file",
]

# The command's logger: these lines are what operators of the command grep for.
log = logging.getLogger("trio_gpu_plugin.cli")

#: How long a config file change waits for its writer to finish before it is read;
#: editors and ``kubectl cp`` write in steps.
CONFIG_SETTLE: Final = 0.1
#: How long a resource that goes away at a reload keeps its socket after it was
#: advertised empty: the kubelet reads the empty list from the open ListAndWatch stream
#: at once, and needs a moment for it to arrive before the socket goes away.
GONE_GRACE: Final = 0.5

#: What rebuilds the configuration on a reload without a new one (SIGHUP, a config
#: file change): the configuration now and the warnings to log with it.
ConfigLoader = Callable[[], tuple[Config, Sequence[str]]]


# --------------------------------------------------------------------------------------
# Errors and checks (shared with the command line)


class StartupError(Exception):
    """A value given to a flag that the plugin cannot start with, found only when it is
    used (an address already in use, a directory that does not exist).

    Its text is ``<flag> <value>: <reason>``; the command line prints it as one line and
    exits 1.
    """

    def __init__(self, flag: str, value: str, reason: str) -> None:
        super().__init__(f"{flag} {value}: {reason}")
        self.flag = flag
        self.value = value
        self.reason = reason


def _strerror(exc: OSError, path: str | None = None) -> str:
    """An OSError's text without ``[Errno n]`` and without a leading ``path``: the caller
    names both the flag and the value already."""
    text = exc.strerror or str(exc)
    if path and text.startswith(path):
        text = text[len(path):].lstrip(": ")
    return text


def metrics_bind_reason(exc: OSError, host: str, port: int) -> str:
    """Why the health and metrics server could not listen on ``host:port``, in words an
    operator can act on."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {host!r}: {exc.strerror} (give an IP address, or a " \
               "name this node resolves)"
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use (another process listens there: choose " \
               "another port, or stop it)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine (give one of its addresses, or " \
               f":{port} for every interface)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied to listen on port {port} (ports below 1024 need " \
               "CAP_NET_BIND_SERVICE)"
    return _strerror(exc)


def control_bind_reason(exc: OSError, path: str) -> str:
    """Why the fault-injection socket could not be served at ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    if exc.errno == errno.ENAMETOOLONG:
        return f"{len(os.fsencode(path))} bytes, longer than the {MAX_UNIX_PATH} a Unix " \
               "socket path can hold; choose a shorter path"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not os.path.isdir(directory):
        if os.path.lexists(directory):
            return f"{directory} is not a directory"
        return f"directory {directory} does not exist"
    if isinstance(exc, FileExistsError) or exc.errno == errno.EADDRINUSE:
        return _strerror(exc, path)
    # /proc and /sys exist but take no socket files (ENOENT, EPERM); read-only or
    # unwritable directories (EROFS, EACCES).
    return f"cannot create a socket in {directory}: {_strerror(exc, path)} (choose a " \
           "writable directory, such as /tmp or /run)"


def check_supported(config: Config) -> None:
    """Refuse a setting no flag would take (a ``Config`` built in Python, see
    :func:`validate_config`) and what this plugin does not do although NVIDIA's does
    (``ConfigError``)."""
    validate_config(config)
    if config.flags.device_discovery_strategy == "tegra":
        raise ConfigError("--device-discovery-strategy tegra: Tegra (integrated GPU) "
                          "systems are not supported by trio-gpu-plugin; use NVIDIA's "
                          "plugin there, or auto/nvml on a discrete-GPU node")


def check_plugin_sockets(kubelet_socket: str, result: PlanResult) -> None:
    """Refuse a plan whose sockets (in the kubelet socket's directory) cannot be bound
    because their paths are too long for a Unix socket (``ConfigError``)."""
    directory = os.path.dirname(kubelet_socket)
    for resource in result.resources:
        path = os.path.join(directory, resource.socket_name)
        size = len(os.fsencode(path))
        if size > MAX_UNIX_PATH:
            raise ConfigError(
                f"--kubelet-socket {kubelet_socket}: the socket of {resource.name} would be "
                f"{path}, {size} bytes, longer than the {MAX_UNIX_PATH} a Unix socket path "
                "can hold; use a shorter directory")


# --------------------------------------------------------------------------------------
# What is logged about a configuration and a plan


def log_config(config: Config, warnings: Sequence[str]) -> None:
    """Log a configuration taking effect: its warnings, the effective configuration on
    one line (as NVIDIA's "Running with config", with its JSON key names), and the CDI
    flags that have no effect here."""
    for warning in warnings:
        log.warning("%s", warning)
    log.info("Running with config: %s", effective_config_json(config))
    hook = config.flags.plugin.nvidia_cdi_hook_path
    for flag, value in (("--cdi-feature-flags", config.flags.cdi_feature_flags),
                        ("--cdi-disable-hooks", config.flags.cdi_disable_hooks),
                        ("--nvidia-cdi-hook-path", () if hook == "/usr/bin/nvidia-ctk" else (hook,))):
        if value:
            log.warning("%s %s has no effect: this plugin does not write CDI specs (it uses "
                        "those nvidia-ctk cdi generate writes)", flag, ",".join(value))


def check_cdi(setup: NodeSetup, result: PlanResult) -> None:
    """Warn, naming the directories searched, when CDI names we hand out resolve to no
    spec on the node."""
    if not any(s.startswith("cdi-") for s in setup.config.flags.plugin.device_list_strategy):
        return
    needed: dict[str, list[str]] = {}
    for resource in result.resources:
        for kind, names in required_cdi_devices(resource, setup.context).items():
            needed.setdefault(kind, []).extend(n for n in names if n not in needed.get(kind, []))
    for kind, names in needed.items():
        searched: list[str] = []
        missing = list(names)
        for root in setup.cdi_roots:
            where, absent = find_missing_cdi_devices(root, kind, names)
            searched += where
            missing = [n for n in missing if n in absent]
        warning = cdi_warning(kind, missing, searched)
        if warning:
            log.warning("%s", warning)


def log_plan(setup: NodeSetup, result: PlanResult) -> None:
    """Log what an operator should know about a plan: its warnings, an ``envvar``
    strategy that cannot serve two of its resources to one container, CDI names
    without a spec."""
    for warning in result.warnings:
        log.warning("%s", warning)
    conflict = envvar_conflict_warning(setup.config, result)
    if conflict:
        log.warning("%s", conflict)
    check_cdi(setup, result)


def _os_error(caught: BaseException) -> OSError:
    """The ``OSError`` an ``except* OSError`` caught (the first, if several)."""
    leaf = first_leaf(caught)
    assert isinstance(leaf, OSError), leaf
    return leaf


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: trio wraps what a task
    raises in one per nursery.  Of what ``except* OSError`` caught, an ``OSError``."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


# --------------------------------------------------------------------------------------
# The config file watch


#: Symlinks followed from the config file's path at most, as the kernel's own bound on
#: one lookup (ELOOP past it).
_MAX_SYMLINK_HOPS: Final = 40


def _paths_of(path: str) -> dict[str, Identity]:
    """The identities that say the config file changed: the path itself (replaced, or a
    symlink re-pointed), each hop of its symlinks, and the file it resolves to (written
    in place).  The hops matter for a ConfigMap: ``config.yaml`` links to
    ``..data/config.yaml`` and the kubelet swaps the ``..data`` symlink, which neither
    ``config.yaml`` itself nor the old target (still there until the kubelet removes
    it) shows, but ``..data/config.yaml`` does at once."""
    paths = {path: identity(path)}
    hop = path
    for _ in range(_MAX_SYMLINK_HOPS):
        try:
            link = os.readlink(hop)
        except OSError:
            break  # not a symlink (EINVAL), or gone: nothing further to follow
        hop = os.path.join(os.path.dirname(hop), link)
        paths[hop] = identity(hop)
    target = os.path.realpath(path)
    paths[target] = identity(target)
    return paths


class Reload(Protocol):
    """What :func:`watch_config_file` calls: a plugin's reload that logs what it refuses."""

    def __call__(self, reason: str, *, always: bool = True) -> Awaitable[None]:
        """Reload for ``reason``; ``always=False`` skips a configuration that did not
        change."""
        ...


async def watch_config_file(path: str, reload: Reload, *,
                            poll_interval: float = 10.0, use_inotify: bool | None = None,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                            ) -> None:
    """Call ``reload(reason, always=False)`` whenever the config file changes: written
    in place (``cp new.yaml live.yaml``, ``>>``; seen when the writer closes it),
    replaced, or (a Kubernetes ConfigMap) its symlinked target swapped.

    Started (``task_status``) once the file's state is taken, so a change after that is
    never missed.  The state for the next wait is taken before ``reload`` reads the
    file, so a write during a reload is another change, not a lost one.
    ``poll_interval`` bounds how late a change inotify does not report is seen;
    ``use_inotify`` as for :class:`PathWatcher`.
    """
    with PathWatcher(poll_interval=poll_interval, use_inotify=use_inotify) as watcher:
        baseline = _paths_of(path)
        task_status.started()
        while True:
            await watcher.wait_for_change(baseline)
            await trio.sleep(CONFIG_SETTLE)
            baseline = _paths_of(path)
            await reload(f"config file {path} changed", always=False)


def _flags_only(config: Config) -> dict[str, Any]:
    """The settings of ``config`` that only flags give (no config-file key: the kubelet
    socket, the CDI flags), as flag values for :func:`load_config`."""
    flags: dict[str, Any] = {}
    for spec in FLAGS:
        if spec.attr is not None and spec.config_key is None:
            section, _, field = spec.attr.rpartition(".")
            assert section == "flags", spec.attr  # where every such setting lives
            flags[spec.name] = getattr(config.flags, field)
    return flags


def _file_loader(path: str, flags: dict[str, Any]) -> tuple[Config, Sequence[str]]:
    """The default loader of a watched config file: the file, under the flag-only
    settings the plugin was built with (a file cannot change them)."""
    return load_config(path, flags=flags)


# --------------------------------------------------------------------------------------
# The plugin


class GpuPlugin:
    """NVIDIA's device plugin, in your trio nursery: NVML discovery and health, MIG
    strategies, sharing (time-slicing, MPS), allocate strategies, reload, and
    optionally the health and metrics server, as the ``trio-gpu-plugin`` command runs
    them.

    ``await nursery.start(plugin.run)`` returns once every planned resource is
    registered with the kubelet; cancel to stop (the sockets are removed).
    ``await plugin.reload(config)`` switches to a new configuration.  State is readable
    at any time: :attr:`config`, :attr:`model`, :attr:`resources`, :meth:`unhealthy`.

    The node is read (IMEX channels, MIG capability minors) when the plugin is built,
    so a configuration the node cannot serve raises :class:`ConfigError` here.

    Args:
        config: the configuration (:func:`~trio_gpu_plugin.load_config`, or ``Config()``
            for NVIDIA's defaults).  Its ``flags`` also give the kubelet socket and the
            health settings (``health_recovery_window``, ``health_probe_interval``,
            ``fail_on_init_error``).
        nvml: :func:`~trio_gpu_plugin.load_pynvml` on a GPU node, or a
            :class:`~trio_gpu_plugin.SimulatedNVML`.
        root: where the node's files are read (``/``; a simulated node's driver root).
        observer: told about registrations, health and calls; by default a plain
            :class:`~trio_gpu_plugin.Observer` (or the metrics server's).
        metrics_address: ``host:port`` (``:port`` for every interface) to serve
            ``/healthz``, ``/readyz`` and ``/metrics`` on; needs the ``metrics`` extra.
        config_file: a config file to watch: every change reloads (skipped when the
            configuration reads the same), through ``loader``.
        loader: what rebuilds the configuration for :meth:`reload` without one and for
            ``config_file`` changes; default: ``config_file`` read with
            :func:`~trio_gpu_plugin.load_config` if given (the settings only flags give,
            such as the kubelet socket, kept from ``config``), else ``config`` again.
        control_socket: serve the fault-injection socket here (``nvml`` must be a
            ``SimulatedNVML``).
        checks: the health checks; default from ``DP_DISABLE_HEALTHCHECKS`` and
            ``DP_ENABLE_HEALTHCHECKS`` in the environment, as NVIDIA's.
        node: an :class:`~trio_gpu_plugin.NvmlNode` over ``nvml`` to use (with its own
            health settings and observer) instead of building one; it is run by
            :meth:`run`.

    Raises:
        ConfigError: the configuration cannot be used on this node, or
            ``metrics_address`` is malformed (or its extra is missing).
    """

    def __init__(
        self,
        config: Config,
        nvml: NVML,
        *,
        root: str | os.PathLike[str] = "/",
        observer: Observer | None = None,
        metrics_address: str | None = None,
        config_file: str | os.PathLike[str] | None = None,
        loader: ConfigLoader | None = None,
        control_socket: str | None = None,
        checks: HealthChecks | None = None,
        node: NvmlNode | None = None,
    ) -> None:
        check_supported(config)
        check_kubelet_socket_path(config.flags.kubelet_socket)
        if node is not None:
            if node.nvml is not nvml:
                raise ValueError("node is an NvmlNode over another NVML than nvml")
            # One observer for all: the node tells it about NVML and health.
            if observer is not None and observer is not node.observer:
                raise ValueError("with node, the observer is the node's own")
            observer = node.observer
        self._metrics: tuple[Metrics, str, int] | None = None
        if metrics_address:
            try:
                from ._metrics import Metrics, parse_address  # noqa: F811 (the runtime import)
            except ImportError as exc:
                raise ConfigError(f"--metrics-address needs the 'metrics' extra (pip install "
                                  f"'trio-gpu-plugin[metrics]'): {exc}") from None
            try:
                host, port = parse_address(metrics_address)
            except ValueError as exc:
                raise ConfigError(f"--metrics-address: {exc}") from None
            if observer is not None and not isinstance(observer, Metrics):
                raise ValueError("metrics_address serves a Metrics observer; pass one, or none")
            self._metrics = (observer if observer is not None else Metrics(), host, port)
            observer = self._metrics[0]
        if control_socket and not hasattr(nvml, "xid"):
            raise ValueError("control_socket injects faults into a SimulatedNVML; nvml is not one")
        #: NVML on this node: the model and every GPU's health (outlives reloads).
        self.node: NvmlNode = node if node is not None else NvmlNode(
            nvml, root=root, checks=checks,
            recovery_window=config.flags.health_recovery_window,
            probe_interval=config.flags.health_probe_interval,
            fail_on_init_error=config.flags.fail_on_init_error,
            observer=observer)
        self._nvml = nvml
        self._setup = NodeSetup.read(config, root)
        self._config_file = os.fspath(config_file) if config_file is not None else None
        if loader is None and self._config_file is not None:
            loader = functools.partial(_file_loader, self._config_file, _flags_only(config))
        self._loader = loader
        self._control_socket = control_socket
        self._result: PlanResult | None = None
        self._sources: dict[str, PlannedSource] = {}
        self._generation: trio.CancelScope | None = None
        # Generations (one DevicePlugin each) started, and the last one fully
        # registered: reload() waits for the one that follows it.
        self._generations = 0
        self._registered_generation = 0
        self._generation_changed = trio.Event()
        self._reloading = trio.Lock()
        self._running = False

    # --- state ------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The configuration being served."""
        return self._setup.config

    @property
    def model(self) -> NodeModel | None:
        """The node as NVML last discovered it (``None`` until NVML first answers)."""
        return self.node.model

    @property
    def observer(self) -> Observer:
        """What is told about registrations, health and calls (the metrics, if served)."""
        return self.node.observer

    @property
    def resources(self) -> tuple[PlannedResource, ...]:
        """The resources served now, with their devices as advertised (re-planned when
        NVML rediscovers the node); empty before :meth:`run` has planned."""
        return tuple(source.resource() for source in self._sources.values())

    def unhealthy(self) -> dict[str, str]:
        """Every unhealthy health unit (GPU or MIG UUID) with the reason; a device is
        healthy iff every unit it is built on is (:attr:`PlannedDevice.units`)."""
        return self.node.tracker.unhealthy_units()

    def healthy(self, device: str, resource: str | None = None) -> bool:
        """Whether the served device with ID ``device`` is healthy (in ``resource``, or
        the first resource that has it).  Raises :class:`KeyError` for an unknown ID."""
        for planned in self.resources:
            if resource is not None and planned.name != resource:
                continue
            found = planned.device(device)
            if found is not None:
                return self.node.healthy(found.units)
        raise KeyError(device)

    # --- running ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> NoReturn:
        """Serve until cancelled: the metrics server (if asked for), NVML, the
        fault-injection socket (if asked for), then the planned resources, re-served
        on every reload; the config file is watched meanwhile (if given).

        Reports started once every planned resource is registered with the kubelet (at
        once when none is planned: then it waits for a reload).  Planning runs in a
        worker thread: it is bounded (the 4 MiB ListAndWatch limit) but not free.

        Raises:
            ConfigError: the configuration does not fit the node (NVIDIA's texts).
            NvmlInitError: NVML cannot start and ``fail_on_init_error`` is set.
            StartupError: the metrics address or the control socket cannot be served.
        """
        if self._running:
            raise RuntimeError("this GpuPlugin is already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                if self._metrics is not None:
                    await self._serve_metrics(nursery, *self._metrics)
                await nursery.start(self.node.run)
                if self._control_socket:
                    await self._serve_control(nursery, self._control_socket)
                if self._result is None:  # else a reload during start-up planned already
                    setup = self._setup
                    result = await trio.to_thread.run_sync(setup.plan, await self.node.wait_model())
                    check_plugin_sockets(setup.config.flags.kubelet_socket, result)
                    log_plan(setup, result)
                    if self._result is None:
                        self._result = result
                if self._config_file is not None:
                    await nursery.start(watch_config_file, self._config_file, self._reload_logged)
                await nursery.start(self._serve_generations)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._running = False
        raise AssertionError("unreachable")  # pragma: no cover

    async def _serve_metrics(self, nursery: trio.Nursery, metrics: Metrics,
                             host: str, port: int) -> None:
        from ._metrics import serve_metrics

        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = await nursery.start(serve_metrics, metrics, host, port)
        except* OSError as failed:  # socket.gaierror is one too
            raise StartupError("--metrics-address", address, metrics_bind_reason(
                _os_error(failed), host, port)) from None
        log.info("health and metrics: http://%s:%s/healthz, /readyz, /metrics", host, bound)

    async def _serve_control(self, nursery: trio.Nursery, path: str) -> None:
        from ._control import serve_control

        try:
            await nursery.start(serve_control, cast("FaultTarget", self._nvml), path)
        except* OSError as failed:
            raise StartupError("--simulate-control", path,
                               control_bind_reason(_os_error(failed), path)) from None
        log.info("fault injection: %s (trio-gpu-plugin inject --control %s ...)", path, path)

    async def _serve_generations(
            self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """One :class:`DevicePlugin` per generation; a reload cancels the generation and
        the next serves the new plan.  Started once the first is registered."""
        started = False
        while True:
            setup, result = self._setup, self._result
            assert result is not None
            resources = setup.resources(self.node, result)
            self._sources = {r.name: r.source for r in resources
                             if isinstance(r.source, PlannedSource)}
            if not resources:
                log.warning("no devices to advertise with this configuration; waiting "
                            "for a reload (SIGHUP or a config file change)")
            self._generations += 1
            generation = self._generations
            with trio.CancelScope() as scope:
                self._generation = scope
                async with trio.open_nursery() as serving:
                    if resources:
                        plugin = DevicePlugin(resources,
                                              kubelet_socket=setup.config.flags.kubelet_socket,
                                              observer=self.node.observer)
                        await serving.start(plugin.run)
                    self._registered(generation)
                    if not started:
                        started = True
                        task_status.started()
                    await trio.sleep_forever()

    def _registered(self, generation: int) -> None:
        self._registered_generation = generation
        self._generation_changed.set()
        self._generation_changed = trio.Event()

    async def _wait_registered(self, generation: int) -> None:
        while self._registered_generation < generation:
            await self._generation_changed.wait()

    # --- reload -----------------------------------------------------------------------

    async def reload(self, new_config: Config | None = None, *, reason: str = "reload") -> None:
        """Serve ``new_config`` (default: the loader's, else the current configuration
        read again, which picks up IMEX channels created since).

        It is validated and planned before anything is torn down: a configuration that
        cannot be served raises :class:`ConfigError` and the running one keeps serving.
        Then resources that go away are advertised with no devices first, so the kubelet
        drops their capacity (NVIDIA #240), and every resource registers again; NVML
        and each GPU's health outlive it (NVIDIA's plugin forgets health, #111).
        Reloads run one at a time; ``reason`` prefixes their log lines.

        Returns once the new configuration is registered with the kubelet (waiting for
        the kubelet while it is away).  Called before :meth:`run`, it waits for the
        node to be discovered.

        Raises:
            ConfigError: the configuration cannot be served here.
        """
        generation = await self._reload(reason, new_config, (), always=True)
        assert generation is not None  # always=True reloads
        await self._wait_registered(generation)

    def _load(self) -> tuple[Config, Sequence[str]]:
        if self._loader is None:
            return self.config, ()
        return self._loader()

    async def _reload_logged(self, reason: str, *, always: bool = True) -> None:
        """A reload whose refusal is logged, not raised (a config file change; the
        command's SIGHUP): the running configuration keeps serving."""
        try:
            await self._reload(reason, None, (), always=always)
        except ConfigError as exc:
            log.error("%s: keeping the running configuration: %s", reason, exc)

    async def _reload(self, reason: str, config: Config | None, warnings: Sequence[str], *,
                      always: bool) -> int | None:
        """Validate, plan, then switch; ``config`` ``None``: the loader's (read under
        the lock, so that the last writer wins).  The generation that will serve it, or
        ``None`` when ``always`` is false and nothing changed."""
        async with self._reloading:
            try:
                if config is None:
                    config, warnings = self._load()
                if not always and config == self._setup.config:
                    log.info("%s: configuration unchanged; nothing to reload", reason)
                    return None
                check_supported(config)
                check_kubelet_socket_path(config.flags.kubelet_socket)
                check_kubelet_socket_path(config.flags.kubelet_socket)
                new = NodeSetup.read(config, self._setup.root)
                # In a worker thread: planning is bounded (the 4 MiB ListAndWatch limit)
                # but not free, and signals must be handled meanwhile.
                planned = await trio.to_thread.run_sync(new.plan, await self.node.wait_model())
                check_plugin_sockets(config.flags.kubelet_socket, planned)
            except ConfigError:
                raise
            except (ValueError, OSError) as exc:
                # Planning and reading the node speak ValueError and OSError; to the
                # caller it is all one thing: this configuration cannot be served.
                raise ConfigError(str(exc)) from exc
            log.info("%s: configuration reloaded; serving and registering again", reason)
            log_config(config, warnings)
            log_plan(new, planned)
            kept = {r.name for r in planned.resources}
            gone = [s for name, s in self._sources.items() if name not in kept]
            for source in gone:
                log.info("%s: no longer configured; advertising no devices before it goes",
                         source.name)
                source.empty()
                source.publish_now()
                self.node.observer.forget_resource(source.name)
            if gone:
                await trio.sleep(GONE_GRACE)
            self._setup, self._result = new, planned
            if self._generation is not None:
                self._generation.cancel()
            # The generation after the running one serves the new plan.
            return self._generations + 1
