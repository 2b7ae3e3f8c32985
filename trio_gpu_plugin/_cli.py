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
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Final

import trio

from . import __version__
from ._config import (
    FLAGS,
    Config,
    ConfigError,
    add_flags,
    flag_value,
    load_config,
    parse_bool,
)
from ._configured import NodeSetup
from ._logging import configure_logging
from ._nvml import NVML, load_pynvml
from ._nvml_source import NvmlInitError, NvmlNode
# The plugin's pieces the command (and its callers: tests, bench/) use by these names.
from ._plugin import (
    CONFIG_SETTLE as CONFIG_SETTLE,
    GpuPlugin,
    Reload as Reload,
    StartupError as StartupError,
    _strerror,
    check_cdi as check_cdi,
    check_plugin_sockets as check_plugin_sockets,
    check_supported,
    control_bind_reason as control_bind_reason,
    first_leaf,
    log_config,
    log_plan as log_plan,
    metrics_bind_reason as metrics_bind_reason,
    watch_config_file as watch_config_file,
)
from ._runtime import check_kubelet_socket_path

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


def program_name(argv0: str | None = None) -> str:
    """The name to use in usage and errors: ``nvidia-device-plugin`` when invoked as
    that (``argv0``, default ``sys.argv[0]``), else ``trio-gpu-plugin``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    return NVIDIA_PROG if os.path.basename(argv0) == NVIDIA_PROG else PROG


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
    # The serving flags after the subcommand too (``inspect --simulate dgx-a100``), as
    # well as before it; a flag given in both places takes the later value.
    add_flags(inspect, default=argparse.SUPPRESS)
    _extend_help(inspect, "--simulate", f"(presets: {', '.join(PRESET_NAMES)})")
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
        config, warnings = load_config(self.config_file, flags=self.cli, env=self.env)
        check_supported(config)
        return config, warnings


async def serve(plugin: GpuPlugin) -> int:
    """Run ``plugin`` until SIGTERM or SIGINT (exit 0); SIGHUP reloads it, always (the
    operator asked: to pick up IMEX channels created since, say, even when the file
    reads as before).  A configuration that cannot be served is logged and the running
    one keeps serving.

    A flag value that cannot be used (``--metrics-address`` on a port in use,
    ``--simulate-control`` in a directory that does not exist) raises
    :class:`StartupError` naming it.
    """

    async def on_sighup() -> None:
        try:
            await plugin.reload(reason="SIGHUP")
        except ConfigError as exc:
            log.error("%s: keeping the running configuration: %s", "SIGHUP", exc)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(plugin.run)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    nursery.start_soon(on_sighup)
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    return 0


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
            check_kubelet_socket_path(config.flags.kubelet_socket,
                                      _given_as("--kubelet-socket", args, os.environ))
    except ConfigError as exc:
        return fail(str(exc))
    if simulate_control and not simulate:
        parser.exit(2, f"{prog}: error: --simulate-control needs --simulate "
                       "(faults can only be injected into a simulated node)\n")
    log_config(config, warnings)
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
    try:
        if inspecting:
            from ._inspect import inspect_node, render_json, render_text

            # inspect probes every device once, at once, and needs NVML to answer.
            node = NvmlNode(nvml, root=root, recovery_window=config.flags.health_recovery_window,
                            probe_interval=0.05, fail_on_init_error=True)
            data = trio.run(inspect_node, node, NodeSetup.read(config, root))
            try:
                print(render_json(data) if args.json else render_text(data), flush=True)
            except BrokenPipeError:
                # Piped into head or less and cut short: not an error of ours.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1 if data["unhealthy"] else 0
        plugin = GpuPlugin(
            config, nvml, root=root,
            metrics_address=flag_value("--metrics-address", vars(args), os.environ),
            config_file=settings.config_file, loader=settings.load,
            control_socket=simulate_control if simulated is not None else None)
        return trio.run(serve, plugin)
    except (ConfigError, ValueError, StartupError) as exc:
        return fail(str(exc))
    except BaseExceptionGroup as group:
        # What a task of the serving nursery raised reaches us wrapped, once per nursery.
        failed, _ = group.split((NvmlInitError, ConfigError, StartupError))
        if failed is None:
            raise
        return fail(str(first_leaf(failed)))
    finally:
        if simulated is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
