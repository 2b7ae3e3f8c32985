"""The ``trio-gpu-plugin`` command line: a thin layer over the library.

``trio-gpu-plugin`` serves the node's GPUs to the kubelet, read through NVML (flag and
environment names follow NVIDIA's k8s-device-plugin where a twin exists);
``--simulate`` runs the very same NVML device source over a simulated NVML.
``trio-gpu-plugin demo`` shows the whole protocol on a simulated node with a fake
kubelet; ``trio-gpu-plugin inject`` breaks a simulated GPU of a running plugin through
its ``--simulate-control`` socket.

The same entry point is also installed as ``nvidia-device-plugin``, the command NVIDIA's
Helm chart runs; it takes the same flags and names itself so in usage and errors.

A value the plugin cannot start with is one ``<prog>: error: <flag> <value>: <reason>``
line on stderr and exit status 1 (2 for a malformed command line), never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Protocol

import trio

from . import __version__
from ._allocate import cdi_warning, find_missing_cdi_devices, required_cdi_devices
from ._config import (
    FLAGS,
    Config,
    ConfigError,
    add_flags,
    effective_config_json,
    flag_value,
    load_config_file,
    parse_bool,
    resolve_config,
)
from ._configured import NodeSetup, PlannedSource
from ._inspect import envvar_conflict_warning
from ._logging import configure_logging
from ._observe import Observer
from ._nvml import NVML, load_pynvml
from ._nvml_source import NvmlInitError, NvmlNode
from ._resources import PlanResult
from ._runtime import DevicePlugin, check_kubelet_socket_path
from ._transport import MAX_UNIX_PATH
from ._watch import Identity, PathWatcher, identity

if TYPE_CHECKING:
    from ._control import FaultTarget
    from ._metrics import Metrics

log = logging.getLogger("trio_gpu_plugin.cli")

# Spelled out rather than imported: the simulator (and its control socket) load only
# when --simulate asks for them.  tests/test_cli.py keeps these equal to the real ones.
PRESET_NAMES = ("dgx-a100", "dgx-1", "pcie-4", "a100-mig", "dgx-h100", "single-t4")
CONTROL_OPS = ("xid", "ecc-dbe", "lost", "recover", "hang", "unhang", "pending",
               "recovery-action", "ecc-errors", "fail", "unfail", "nvml-down", "nvml-up", "list")

PROG: Final = "trio-gpu-plugin"
#: The command NVIDIA's Helm chart runs (``command: ["nvidia-device-plugin"]``); the same
#: entry point answers to it.
NVIDIA_PROG: Final = "nvidia-device-plugin"
#: How long a config file change waits for its writer to finish before it is read;
#: editors and ``kubectl cp`` write in steps.
CONFIG_SETTLE: Final = 0.1


def program_name(argv0: str | None = None) -> str:
    """The name to use in usage and errors: ``nvidia-device-plugin`` when invoked as
    that (``argv0``, default ``sys.argv[0]``), else ``trio-gpu-plugin``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    return NVIDIA_PROG if os.path.basename(argv0) == NVIDIA_PROG else PROG


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


def check_kubelet_socket(path: str, given_as: str) -> None:
    """Refuse a ``--kubelet-socket`` no Unix socket can be at (``ConfigError``):
    otherwise the plugin would wait forever for a kubelet that cannot appear there."""
    if not path:
        raise ConfigError(f"{given_as} '': an empty path (the kubelet's is "
                          "/var/lib/kubelet/device-plugins/kubelet.sock)")
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH:
        raise ConfigError(f"{given_as} {path}: {size} bytes, longer than the {MAX_UNIX_PATH} "
                          "a Unix socket path can hold")


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


def _extend_help(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    """Append ``text`` to the help of ``flag``, which :func:`add_flags` defined (argparse
    has no public way to reach an action once added)."""
    for action in parser._actions:
        if flag in action.option_strings:
            action.help = f"{action.help} {text}"
            return
    raise AssertionError(f"{flag} is not a flag of this parser")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The whole command line: the serving flags, ``demo``, ``inspect`` and ``inject``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A Kubernetes device plugin for NVIDIA GPUs, on trio. Without a "
                    "subcommand it serves this node's GPUs to the kubelet. Flags, environment "
                    "variables and the config file are NVIDIA's k8s-device-plugin's; a flag "
                    "given here beats its environment twin, which beats the config file.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_flags(parser)
    _extend_help(parser, "--simulate", f"(presets: {', '.join(PRESET_NAMES)})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="run a fake kubelet and a simulated 8-GPU node, and narrate what happens")
    demo.add_argument("--preset", default="dgx-a100", choices=PRESET_NAMES)
    inspect = sub.add_parser(
        "inspect", help="show what this node would advertise (real NVML, or --simulate), "
                        "with health and the GPU topology; exit 1 if a device is unhealthy",
        description="Discover the node through NVML (or the simulated node of --simulate), "
                    "plan the resources with the configuration given by the other flags, "
                    "probe every device once, and print the result.")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inject = sub.add_parser(
        "inject", help="inject a fault into a running plugin's simulated node",
        description="Send one request to a --simulate-control socket and print the answer; "
                    "exit 1 if it was refused.")
    inject.add_argument("--control", metavar="PATH", required=True,
                        help="the plugin's --simulate-control socket")
    inject.add_argument("op", choices=CONTROL_OPS)
    inject.add_argument("--gpu", help="GPU index or UUID (or a MIG UUID for xid)")
    inject.add_argument("--xid", type=int, help="the XID number, for op xid")
    inject.add_argument("--gi", type=int, help="GPU instance ID, for op xid on a MIG GPU")
    inject.add_argument("--ci", type=int, help="compute instance ID, for op xid on a MIG GPU")
    inject.add_argument("--retired-pages", metavar="BOOL", type=parse_bool_arg,
                        help="for op pending: page retirement pending")
    inject.add_argument("--row-remap", metavar="BOOL", type=parse_bool_arg,
                        help="for op pending: row remap pending")
    inject.add_argument("--row-remap-failed", metavar="BOOL", type=parse_bool_arg,
                        help="for op pending: row remapping failed (survives a reset)")
    inject.add_argument("--action", metavar="ACTION",
                        help="for op recovery-action: none, gpu_reset, node_reboot, drain_p2p, "
                             "drain_and_reset, recover_imex_domain, bus_reset, system_reboot, "
                             "or null (a driver that reports none)")
    inject.add_argument("--count", type=int, help="for op ecc-errors: how many errors")
    inject.add_argument("--corrected", metavar="BOOL", type=parse_bool_arg,
                        help="for op ecc-errors: corrected errors (default: uncorrectable)")
    inject.add_argument("--calls", metavar="NAMES",
                        help="for op fail: NVML calls to fail, comma-separated "
                             "(e.g. nvmlDeviceGetMinorNumber,nvmlDeviceGetName)")
    inject.add_argument("--code", metavar="ERROR",
                        help="for op fail: the NVML error, a name (gpu_is_lost, unknown, "
                             "no_permission...) or its number")
    return parser


def parse_bool_arg(value: str) -> bool:
    """A boolean as Go's strconv.ParseBool reads one, for argparse."""
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Settings:
    """How to (re)build the configuration: the command line and environment are fixed
    for the process's life; the config file is read again on every load."""

    def __init__(self, args: argparse.Namespace, env: Mapping[str, str]) -> None:
        self.cli = {k: v for k, v in vars(args).items() if k not in ("command",)}
        self.env = dict(env)
        self.config_file: str | None = flag_value("--config-file", self.cli, self.env) or None

    def load(self) -> tuple[Config, list[str]]:
        """The effective configuration now; ``ConfigError`` says what is wrong."""
        document = load_config_file(self.config_file) if self.config_file else None
        source = f"config file {self.config_file}" if self.config_file else "config file"
        config, warnings = resolve_config(self.cli, self.env, document, source=source)
        if config.flags.device_discovery_strategy == "tegra":
            raise ConfigError("--device-discovery-strategy tegra: Tegra (integrated GPU) "
                              "systems are not supported by trio-gpu-plugin; use NVIDIA's "
                              "plugin there, or auto/nvml on a discrete-GPU node")
        return config, warnings


def _log_config(config: Config, warnings: Sequence[str]) -> None:
    for warning in warnings:
        log.warning("%s", warning)
    # One line, as NVIDIA's "Running with config" (its JSON key names).
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


async def serve(settings: Settings, setup: NodeSetup, node: NvmlNode,
                simulated: FaultTarget | None = None,
                simulate_control: str | None = None,
                metrics: tuple[Metrics, str, int] | None = None) -> int:
    """Serve until SIGTERM or SIGINT (exit 0).  SIGHUP or a change of the config file
    reloads: the new configuration is validated and planned before anything is torn
    down (a bad one is logged and the running one keeps serving); resources that go away
    are first advertised with no devices, so the kubelet drops their capacity (NVIDIA
    #240); then every resource registers again.  A file change that leaves the
    configuration as it is (a SIGHUP already read it, or the file was rewritten with
    the same settings) reloads nothing; SIGHUP always reloads.  NVML and each GPU's
    health outlive a reload (NVIDIA's plugin forgets health, #111).

    A flag value that cannot be used (``--metrics-address`` on a port in use,
    ``--simulate-control`` in a directory that does not exist) raises
    :class:`StartupError` naming it.
    """
    current = setup
    result: PlanResult | None = None
    generation: list[trio.CancelScope] = []
    sources: dict[str, PlannedSource] = {}
    reloading = trio.Lock()

    async def reload(reason: str, *, always: bool = True) -> None:
        nonlocal current, result
        async with reloading:
            try:
                config, warnings = settings.load()
                if not always and config == current.config:
                    log.info("%s: configuration unchanged; nothing to reload", reason)
                    return
                check_kubelet_socket(config.flags.kubelet_socket, "--kubelet-socket")
                check_kubelet_socket_path(config.flags.kubelet_socket)
                new = NodeSetup.read(config, current.root)
                # In a worker thread: planning is bounded (the 4 MiB ListAndWatch limit)
                # but not free, and signals must be handled meanwhile.
                planned = await trio.to_thread.run_sync(new.plan, await node.wait_model())
                check_plugin_sockets(config.flags.kubelet_socket, planned)
            except (ConfigError, ValueError, OSError) as exc:
                log.error("%s: keeping the running configuration: %s", reason, exc)
                return
            log.info("%s: configuration reloaded; serving and registering again", reason)
            _log_config(config, warnings)
            log_plan(new, planned)
            gone = [s for name, s in sources.items()
                    if name not in {r.name for r in planned.resources}]
            for source in gone:
                log.info("%s: no longer configured; advertising no devices before it goes",
                         source.name)
                source.empty()
                source.publish_now()
                node.observer.forget_resource(source.name)
            if gone:
                # The kubelet reads the empty list from the open ListAndWatch stream at
                # once; a moment for it to arrive before the socket goes away.
                await trio.sleep(0.5)
            current, result = new, planned
            for scope in generation:
                scope.cancel()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def run_plugin() -> None:
                nonlocal result
                if metrics is not None:
                    from ._metrics import serve_metrics

                    observer, host, port = metrics
                    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                    try:
                        bound = await nursery.start(serve_metrics, observer, host, port)
                    except* OSError as failed:  # socket.gaierror is one too
                        raise StartupError("--metrics-address", address, metrics_bind_reason(
                            _first_leaf(failed, OSError), host, port)) from None
                    log.info("health and metrics: http://%s:%s/healthz, /readyz, /metrics",
                             host, bound)
                await nursery.start(node.run)
                if simulated is not None and simulate_control:
                    from ._control import serve_control

                    try:
                        await nursery.start(serve_control, simulated, simulate_control)
                    except* OSError as failed:
                        raise StartupError("--simulate-control", simulate_control,
                                           control_bind_reason(_first_leaf(failed, OSError),
                                                               simulate_control)) from None
                    log.info("fault injection: %s (trio-gpu-plugin inject --control %s ...)",
                             simulate_control, simulate_control)
                if result is None:
                    # ConfigError: exit 1.  A worker thread, as in reload().
                    result = await trio.to_thread.run_sync(current.plan, await node.wait_model())
                    check_plugin_sockets(current.config.flags.kubelet_socket, result)
                    log_plan(current, result)
                if settings.config_file:
                    await nursery.start(watch_config_file, settings.config_file, reload)
                while True:
                    resources = current.resources(node, result)
                    sources.clear()
                    sources.update({r.name: r.source for r in resources
                                    if isinstance(r.source, PlannedSource)})
                    if not resources:
                        log.warning("no devices to advertise with this configuration; waiting "
                                    "for a reload (SIGHUP or a config file change)")
                    plugin = DevicePlugin(resources, kubelet_socket=current.config.flags.kubelet_socket,
                                          observer=node.observer) if resources else None
                    with trio.CancelScope() as scope:
                        generation[:] = [scope]
                        if plugin is None:
                            await trio.sleep_forever()
                        else:
                            await plugin.run()

            nursery.start_soon(run_plugin)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    # Always: the operator asked (to pick up IMEX channels created since,
                    # say), even when the file reads as before.
                    nursery.start_soon(reload, "SIGHUP")
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    return 0


def _first_leaf(exc: BaseException, kind: type[OSError]) -> OSError:
    """The first ``kind`` in ``exc``, looking inside (nested) exception groups: trio
    wraps what a task raises in one."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            try:
                return _first_leaf(inner, kind)
            except LookupError:
                continue
    raise LookupError(f"no {kind.__name__} in {exc!r}")


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
    """What :func:`watch_config_file` calls: ``serve``'s reload."""

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


def inject(args: argparse.Namespace, prog: str = PROG) -> int:
    """``trio-gpu-plugin inject``: one request, its answer on stdout."""
    from ._control import request_from_args, send_control_sync

    gpu_needed = args.op not in ("nvml-down", "nvml-up", "list")
    if gpu_needed and args.gpu is None:
        print(f"{prog} inject: error: op {args.op} needs --gpu", file=sys.stderr)
        return 2
    request = request_from_args(args.op, args.gpu, args.xid, args.gi, args.ci,
                                args.retired_pages, args.row_remap,
                                row_remap_failed=args.row_remap_failed, action=args.action,
                                count=args.count, corrected=args.corrected,
                                calls=args.calls, code=args.code)
    try:
        answer = send_control_sync(args.control, request)
    except OSError as exc:
        reason = _strerror(exc, args.control)
    except ValueError as exc:
        reason = str(exc).removeprefix(f"{args.control}: ")
    else:
        print(json.dumps(answer))
        return 0 if answer.get("ok") else 1
    print(f"{prog} inject: error: --control {args.control}: {reason} (is the plugin running "
          "with --simulate-control there?)", file=sys.stderr)
    return 1


def _given_as(flag: str, args: argparse.Namespace, env: Mapping[str, str]) -> str:
    """How the operator gave ``flag``: the flag itself, or its environment twin."""
    spec = next(s for s in FLAGS if s.name == flag)
    if getattr(args, spec.dest, None) is not None:
        return flag
    return next((f"environment variable {e}" for e in spec.envs if e in env), flag)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console scripts (``trio-gpu-plugin``, ``nvidia-device-plugin``)
    and of ``python -m trio_gpu_plugin``; ``argv`` defaults to ``sys.argv[1:]``."""
    prog = program_name()
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1

    try:
        level = flag_value("--log-level", vars(args), os.environ)
        log_format = flag_value("--log-format", vars(args), os.environ) or "text"
    except ConfigError as exc:
        return fail(str(exc))
    # inspect's output is the table (or JSON) on stdout; INFO lines on stderr would
    # only bury it in a terminal.  The demo narrates, so only errors are logged.
    level = level or {"demo": "error", "inspect": "warning"}.get(args.command, "info")
    configure_logging(level, log_format)
    if args.command == "demo":
        from ._demo import run_demo

        return trio.run(run_demo, args.preset)
    if args.command == "inject":
        return inject(args, prog)
    inspecting = args.command == "inspect"
    try:
        settings = Settings(args, os.environ)
        config, warnings = settings.load()
        simulate = flag_value("--simulate", vars(args), os.environ)
        simulate_control = flag_value("--simulate-control", vars(args), os.environ)
        if not inspecting:
            check_kubelet_socket(config.flags.kubelet_socket,
                                 _given_as("--kubelet-socket", args, os.environ))
    except ConfigError as exc:
        return fail(str(exc))
    if simulate_control and not simulate:
        parser.exit(2, f"{prog}: error: --simulate-control needs --simulate "
                       "(faults can only be injected into a simulated node)\n")
    _log_config(config, warnings)
    simulated = None
    root = "/"
    nvml: NVML
    if simulate:
        from ._nvml_sim import SimulatedNVML, node_from

        try:
            simulated = SimulatedNVML(node_from(simulate))
        except ValueError as exc:
            parser.exit(2, f"{prog}: error: --simulate: {exc}\n")
        root = tempfile.mkdtemp(prefix="tgp-sim-root-")
        simulated.write_driver_root(root)
        nvml = simulated
    else:
        nvml = load_pynvml(config.flags.plugin.container_driver_root)
    observer: Observer = Observer()
    metrics = None
    address = None if inspecting else flag_value("--metrics-address", vars(args), os.environ)
    if address:
        try:
            from ._metrics import Metrics, parse_address  # noqa: F811 (the runtime import)
        except ImportError as exc:
            return fail(f"--metrics-address needs the 'metrics' extra (pip install "
                        f"'trio-gpu-plugin[metrics]'): {exc}")
        try:
            host, port = parse_address(address)
        except ValueError as exc:
            return fail(f"--metrics-address: {exc}")
        metrics = (Metrics(), host, port)
        observer = metrics[0]
    node = NvmlNode(nvml, root=root, recovery_window=config.flags.health_recovery_window,
                    # inspect probes every device once, at once.
                    probe_interval=0.05 if inspecting else config.flags.health_probe_interval,
                    fail_on_init_error=config.flags.fail_on_init_error or inspecting,
                    observer=observer)
    try:
        setup = NodeSetup.read(config, root)
        if inspecting:
            from ._inspect import inspect_node, render_json, render_text

            data = trio.run(inspect_node, node, setup)
            try:
                print(render_json(data) if args.json else render_text(data), flush=True)
            except BrokenPipeError:
                # Piped into head or less and cut short: not an error of ours.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1 if data["unhealthy"] else 0
        return trio.run(serve, settings, setup, node, simulated, simulate_control, metrics)
    except (ConfigError, ValueError, StartupError) as exc:
        return fail(str(exc))
    except BaseExceptionGroup as group:
        # What a task of the serving nursery raised reaches us wrapped, once per nursery.
        failed, _ = group.split((NvmlInitError, ConfigError, StartupError))
        if failed is None:
            raise
        first: BaseException = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        return fail(str(first))
    finally:
        if simulated is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
