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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from . import __version__
from ._devices import Resource
from ._nvml import NVML, load_pynvml
from ._nvml_source import PROBE_INTERVAL, RECOVERY_WINDOW, NvmlInitError, NvmlNode, whole_gpus
from ._runtime import DevicePlugin
from .proto import v1beta1

if TYPE_CHECKING:
    from ._control import FaultTarget

log = logging.getLogger("trio_gpu_plugin.cli")

#: NVIDIA's name for the socket of its full-GPU resource.
DEFAULT_SOCKET_NAME = "nvidia-gpu.sock"
DEFAULT_RESOURCE = "nvidia.com/gpu"
# Spelled out rather than imported: the simulator (and its control socket) load only
# when --simulate asks for them.  tests/test_cli.py keeps these equal to the real ones.
PRESET_NAMES = ("dgx-a100", "dgx-1", "pcie-4", "a100-mig", "dgx-h100", "single-t4")
CONTROL_OPS = ("xid", "ecc-dbe", "lost", "recover", "pending", "nvml-down", "nvml-up", "list")


def parse_bool(value: str) -> bool:
    """A boolean the way NVIDIA's flags (Go's strconv.ParseBool) read one."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (true or false)")


def seconds(value: str) -> float:
    """A non-negative number of seconds."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} must be a finite number of seconds >= 0")
    return number


def positive_seconds(value: str) -> float:
    """A number of seconds > 0."""
    number = seconds(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be more than 0 seconds")
    return number


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_typed(parser: argparse.ArgumentParser, name: str, default: Any,
               convert: Callable[[str], Any]) -> Any:
    """An environment twin's value, converted; a bad value stops start-up naming it."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except argparse.ArgumentTypeError as exc:
        parser.exit(2, f"trio-gpu-plugin: error: environment variable {name}: {exc}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-gpu-plugin",
        description="A Kubernetes device plugin for NVIDIA GPUs, on trio. Without a "
                    "subcommand it serves this node's GPUs to the kubelet.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--kubelet-socket", default=_env("KUBELET_SOCKET", v1beta1.KUBELET_SOCKET),
        help="the kubelet's registration socket; our sockets go in its directory "
             "(env KUBELET_SOCKET; default %(default)s)")
    parser.add_argument(
        "--fail-on-init-error", metavar="BOOL", nargs="?", const=True, type=parse_bool,
        default=_env_typed(parser, "FAIL_ON_INIT_ERROR", True, parse_bool),
        help="exit 1 if NVML cannot start; false keeps retrying with back-off and registers "
             "once it works (env FAIL_ON_INIT_ERROR; default true)")
    parser.add_argument(
        "--health-recovery-window", metavar="SECONDS", type=seconds,
        default=_env_typed(parser, "HEALTH_RECOVERY_WINDOW", RECOVERY_WINDOW, seconds),
        help="an Unhealthy GPU comes back once NVML answers for it, no critical event came "
             "for this long and no page retirement or row remap is pending; 0 never "
             f"recovers, as NVIDIA's plugin (env HEALTH_RECOVERY_WINDOW; default {RECOVERY_WINDOW:g})")
    parser.add_argument(
        "--health-probe-interval", metavar="SECONDS", type=positive_seconds,
        default=_env_typed(parser, "HEALTH_PROBE_INTERVAL", PROBE_INTERVAL, positive_seconds),
        help="how often every GPU is probed through NVML (lost GPUs, recovery) "
             f"(env HEALTH_PROBE_INTERVAL; default {PROBE_INTERVAL:g})")
    parser.add_argument(
        "--simulate", metavar="PRESET|FILE", default=os.environ.get("SIMULATE") or None,
        help="serve a simulated node through a simulated NVML instead of the real one: a "
             f"preset ({', '.join(PRESET_NAMES)}) or a YAML/JSON node file (env SIMULATE)")
    parser.add_argument(
        "--simulate-control", metavar="PATH", default=os.environ.get("SIMULATE_CONTROL") or None,
        help="with --simulate: serve a fault-injection socket here (see 'inject') "
             "(env SIMULATE_CONTROL)")
    parser.add_argument(
        "--log-level", default=os.environ.get("LOG_LEVEL"),
        choices=["debug", "info", "warning", "error"],
        help="(env LOG_LEVEL; default info, and error for the demo, whose narration says it all)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="run a fake kubelet and a simulated 8-GPU node, and narrate what happens")
    demo.add_argument("--preset", default="dgx-a100", choices=PRESET_NAMES)
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
    inject.add_argument("--retired-pages", metavar="BOOL", type=parse_bool,
                        help="for op pending: page retirement pending")
    inject.add_argument("--row-remap", metavar="BOOL", type=parse_bool,
                        help="for op pending: row remap pending")
    return parser


def resources_for(node: NvmlNode) -> list[Resource]:
    """The resources served over ``node`` (one, ``nvidia.com/gpu``, until the configuration
    file arrives)."""
    return [Resource(DEFAULT_RESOURCE, node.source(whole_gpus), DEFAULT_SOCKET_NAME)]


async def serve(args: argparse.Namespace, node: NvmlNode, simulated: FaultTarget | None = None,
                load: Callable[[NvmlNode], list[Resource]] = resources_for) -> int:
    """Serve until SIGTERM or SIGINT (exit 0); SIGHUP registers every resource again.

    NVML and the health of every GPU outlive a SIGHUP: a GPU that went Unhealthy stays so
    (NVIDIA's plugin forgets, #111).
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            generation: list[trio.CancelScope] = []

            async def run_plugin() -> None:
                await nursery.start(node.run)
                if simulated is not None and args.simulate_control:
                    from ._control import serve_control

                    await nursery.start(serve_control, simulated, args.simulate_control)
                    log.info("fault injection: %s (trio-gpu-plugin inject --control %s ...)",
                             args.simulate_control, args.simulate_control)
                while True:
                    plugin = DevicePlugin(load(node), kubelet_socket=args.kubelet_socket)
                    with trio.CancelScope() as scope:
                        generation[:] = [scope]
                        await plugin.run()

            nursery.start_soon(run_plugin)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: serving and registering again")
                    for scope in generation:
                        scope.cancel()
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    return 0


def inject(args: argparse.Namespace) -> int:
    """``trio-gpu-plugin inject``: one request, its answer on stdout."""
    from ._control import request_from_args, send_control_sync

    gpu_needed = args.op in ("xid", "ecc-dbe", "lost", "recover", "pending")
    if gpu_needed and args.gpu is None:
        print(f"trio-gpu-plugin inject: error: op {args.op} needs --gpu", file=sys.stderr)
        return 2
    request = request_from_args(args.op, args.gpu, args.xid, args.gi, args.ci,
                                args.retired_pages, args.row_remap)
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
    level = args.log_level or ("error" if args.command == "demo" else "info")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo":
        from ._demo import run_demo

        return trio.run(run_demo, args.preset)
    if args.command == "inject":
        return inject(args)
    if args.simulate_control and not args.simulate:
        parser.exit(2, "trio-gpu-plugin: error: --simulate-control needs --simulate "
                       "(faults can only be injected into a simulated node)\n")
    simulated = None
    root = "/"
    nvml: NVML
    if args.simulate:
        from ._nvml_sim import SimulatedNVML, node_from

        try:
            simulated = SimulatedNVML(node_from(args.simulate))
        except ValueError as exc:
            parser.exit(2, f"trio-gpu-plugin: error: --simulate: {exc}\n")
        root = tempfile.mkdtemp(prefix="tgp-sim-root-")
        simulated.write_driver_root(root)
        nvml = simulated
    else:
        nvml = load_pynvml()
    node = NvmlNode(nvml, root=root, recovery_window=args.health_recovery_window,
                    probe_interval=args.health_probe_interval,
                    fail_on_init_error=args.fail_on_init_error)
    try:
        return trio.run(serve, args, node, simulated)
    except BaseExceptionGroup as group:
        failed, _ = group.split(NvmlInitError)
        if failed is None:
            raise
        print(f"trio-gpu-plugin: error: {failed.exceptions[0]}", file=sys.stderr)
        return 1
    finally:
        if simulated is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
