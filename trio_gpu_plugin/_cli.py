"""The ``trio-gpu-plugin`` command line: a thin layer over the library.

``trio-gpu-plugin`` serves the node's GPUs to the kubelet, read through NVML (flag and
environment names follow NVIDIA's k8s-device-plugin where a twin exists);
``--simulate`` runs the very same NVML device source over a simulated NVML.
``trio-gpu-plugin demo`` shows the whole protocol on a simulated node with a fake
kubelet; ``trio-gpu-plugin inject`` breaks a simulated GPU of a running plugin through
its ``--simulate-control`` socket.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import trio

from . import __version__
from ._allocate import cdi_warning, find_missing_cdi_devices, required_cdi_devices
from ._config import (
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
from ._logging import configure_logging
from ._observe import Observer
from ._nvml import NVML, load_pynvml
from ._nvml_source import NvmlInitError, NvmlNode
from ._resources import PlanResult
from ._runtime import DevicePlugin
from ._watch import PathWatcher, identity

if TYPE_CHECKING:
    from ._control import FaultTarget
    from ._metrics import Metrics

log = logging.getLogger("trio_gpu_plugin.cli")

# Spelled out rather than imported: the simulator (and its control socket) load only
# when --simulate asks for them.  tests/test_cli.py keeps these equal to the real ones.
PRESET_NAMES = ("dgx-a100", "dgx-1", "pcie-4", "a100-mig", "dgx-h100", "single-t4")
CONTROL_OPS = ("xid", "ecc-dbe", "lost", "recover", "hang", "unhang", "pending",
               "recovery-action", "ecc-errors", "fail", "unfail", "nvml-down", "nvml-up", "list")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-gpu-plugin",
        description="A Kubernetes device plugin for NVIDIA GPUs, on trio. Without a "
                    "subcommand it serves this node's GPUs to the kubelet. Flags, environment "
                    "variables and the config file are NVIDIA's k8s-device-plugin's; a flag "
                    "given here beats its environment twin, which beats the config file.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_flags(parser)
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


async def serve(settings: Settings, setup: NodeSetup, node: NvmlNode,
                simulated: FaultTarget | None = None,
                simulate_control: str | None = None,
                metrics: tuple[Metrics, str, int] | None = None) -> int:
    """Serve until SIGTERM or SIGINT (exit 0).  SIGHUP or a change of the config file
    reloads: the new configuration is validated and planned before anything is torn
    down (a bad one is logged and the running one keeps serving); resources that go away
    are first advertised with no devices, so the kubelet drops their capacity (NVIDIA
    #240); then every resource registers again.  NVML and each GPU's health outlive a
    reload (NVIDIA's plugin forgets health, #111).
    """
    current = setup
    result: PlanResult | None = None
    generation: list[trio.CancelScope] = []
    sources: dict[str, PlannedSource] = {}
    reloading = trio.Lock()

    async def reload(reason: str) -> None:
        nonlocal current, result
        async with reloading:
            try:
                config, warnings = settings.load()
                new = NodeSetup.read(config, current.root)
                planned = new.plan(await node.wait_model())
            except (ConfigError, ValueError, OSError) as exc:
                log.error("%s: keeping the running configuration: %s", reason, exc)
                return
            log.info("%s: configuration reloaded; serving and registering again", reason)
            _log_config(config, warnings)
            for warning in planned.warnings:
                log.warning("%s", warning)
            check_cdi(new, planned)
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
                    bound = await nursery.start(serve_metrics, observer, host, port)
                    log.info("health and metrics: http://%s:%s/healthz, /readyz, /metrics",
                             host, bound)
                await nursery.start(node.run)
                if simulated is not None and simulate_control:
                    from ._control import serve_control

                    await nursery.start(serve_control, simulated, simulate_control)
                    log.info("fault injection: %s (trio-gpu-plugin inject --control %s ...)",
                             simulate_control, simulate_control)
                if result is None:
                    result = current.plan(await node.wait_model())  # ConfigError: exit 1
                    for warning in result.warnings:
                        log.warning("%s", warning)
                    check_cdi(current, result)
                if settings.config_file:
                    nursery.start_soon(watch_config_file, settings.config_file, reload)
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
                    nursery.start_soon(reload, "SIGHUP")
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    return 0


async def watch_config_file(path: str, reload: Callable[[str], Awaitable[None]]) -> None:
    """Reload whenever the config file changes: edited in place, replaced, or (a
    Kubernetes ConfigMap) its symlinked target swapped."""
    with PathWatcher(poll_interval=10.0) as watcher:
        while True:
            target = os.path.realpath(path)
            baseline = {path: identity(path), target: identity(target)}
            await watcher.wait_for_change(baseline)
            await trio.sleep(0.1)  # let the writer finish; editors write in steps
            await reload(f"config file {path} changed")


def inject(args: argparse.Namespace) -> int:
    """``trio-gpu-plugin inject``: one request, its answer on stdout."""
    from ._control import request_from_args, send_control_sync

    gpu_needed = args.op not in ("nvml-down", "nvml-up", "list")
    if gpu_needed and args.gpu is None:
        print(f"trio-gpu-plugin inject: error: op {args.op} needs --gpu", file=sys.stderr)
        return 2
    request = request_from_args(args.op, args.gpu, args.xid, args.gi, args.ci,
                                args.retired_pages, args.row_remap,
                                row_remap_failed=args.row_remap_failed, action=args.action,
                                count=args.count, corrected=args.corrected,
                                calls=args.calls, code=args.code)
    try:
        answer = send_control_sync(args.control, request)
    except (OSError, ValueError) as exc:
        where = "" if str(exc).startswith(str(args.control)) else f"{args.control}: "
        print(f"trio-gpu-plugin inject: error: {where}{exc} (is the plugin running "
              "with --simulate-control there?)", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0 if answer.get("ok") else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m trio_gpu_plugin``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        level = flag_value("--log-level", vars(args), os.environ)
    except ConfigError as exc:
        parser.exit(1, f"trio-gpu-plugin: error: {exc}\n")
    level = level or ("error" if args.command == "demo" else "info")
    try:
        log_format = flag_value("--log-format", vars(args), os.environ) or "text"
    except ConfigError as exc:
        parser.exit(1, f"trio-gpu-plugin: error: {exc}\n")
    configure_logging(level, log_format)
    if args.command == "demo":
        from ._demo import run_demo

        return trio.run(run_demo, args.preset)
    if args.command == "inject":
        return inject(args)
    try:
        settings = Settings(args, os.environ)
        config, warnings = settings.load()
        simulate = flag_value("--simulate", vars(args), os.environ)
        simulate_control = flag_value("--simulate-control", vars(args), os.environ)
    except ConfigError as exc:
        print(f"trio-gpu-plugin: error: {exc}", file=sys.stderr)
        return 1
    if simulate_control and not simulate:
        parser.exit(2, "trio-gpu-plugin: error: --simulate-control needs --simulate "
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
            parser.exit(2, f"trio-gpu-plugin: error: --simulate: {exc}\n")
        root = tempfile.mkdtemp(prefix="tgp-sim-root-")
        simulated.write_driver_root(root)
        nvml = simulated
    else:
        nvml = load_pynvml(config.flags.plugin.container_driver_root)
    inspecting = args.command == "inspect"
    observer: Observer = Observer()
    metrics = None
    address = None if inspecting else flag_value("--metrics-address", vars(args), os.environ)
    if address:
        try:
            from ._metrics import Metrics, parse_address  # noqa: F811 (the runtime import)
        except ImportError as exc:
            print(f"trio-gpu-plugin: error: --metrics-address needs the 'metrics' extra "
                  f"(pip install 'trio-gpu-plugin[metrics]'): {exc}", file=sys.stderr)
            return 1
        try:
            host, port = parse_address(address)
        except ValueError as exc:
            print(f"trio-gpu-plugin: error: --metrics-address: {exc}", file=sys.stderr)
            return 1
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
    except (ConfigError, ValueError) as exc:
        print(f"trio-gpu-plugin: error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        failed, _ = group.split((NvmlInitError, ConfigError))
        if failed is None:
            raise
        first: BaseException = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"trio-gpu-plugin: error: {first}", file=sys.stderr)
        return 1
    finally:
        if simulated is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
