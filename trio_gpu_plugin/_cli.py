"""The ``trio-gpu-plugin`` command line: a thin layer over the library.

``trio-gpu-plugin`` serves the node's GPUs to the kubelet (flag and environment names
follow NVIDIA's k8s-device-plugin where a twin exists); ``trio-gpu-plugin demo`` shows
the whole protocol on a simulated node with a fake kubelet, no GPU or cluster needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import trio

from . import __version__
from ._devices import DeviceSource, Resource
from ._runtime import DevicePlugin
from ._simulated import PRESETS, SimulatedDeviceSource
from .proto import v1beta1

log = logging.getLogger("trio_gpu_plugin.cli")

#: NVIDIA's name for the socket of its full-GPU resource.
DEFAULT_SOCKET_NAME = "nvidia-gpu.sock"
DEFAULT_RESOURCE = "nvidia.com/gpu"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


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
        "--simulate", metavar="PRESET|FILE", default=os.environ.get("SIMULATE"),
        help="serve a simulated node instead of NVML: a preset "
             f"({', '.join(PRESETS)}) or a JSON file (env SIMULATE)")
    parser.add_argument(
        "--log-level", default=os.environ.get("LOG_LEVEL"),
        choices=["debug", "info", "warning", "error"],
        help="(env LOG_LEVEL; default info, and error for the demo, whose narration says it all)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="run a fake kubelet and a simulated 8-GPU node, and narrate what happens")
    demo.add_argument("--preset", default="dgx-a100", choices=sorted(PRESETS))
    return parser


def source_from(simulate: str | None) -> DeviceSource:
    """The device source the flags ask for; ``ValueError`` says what is wrong."""
    if simulate is None:
        raise ValueError(
            "no device source: this version does not read NVML yet; serve a simulated "
            "node with --simulate PRESET|FILE (presets: " + ", ".join(PRESETS) + ")")
    if simulate in PRESETS:
        return SimulatedDeviceSource.preset(simulate)
    if os.path.exists(simulate):
        return SimulatedDeviceSource.from_file(simulate)
    raise ValueError(f"--simulate {simulate!r} is neither a preset ({', '.join(PRESETS)}) "
                     "nor an existing file")


def resources_from(args: argparse.Namespace) -> list[Resource]:
    return [Resource(DEFAULT_RESOURCE, source_from(args.simulate), DEFAULT_SOCKET_NAME)]


async def serve(args: argparse.Namespace, resources: list[Resource],
                load: Callable[[argparse.Namespace], list[Resource]] = resources_from) -> int:
    """Serve until SIGTERM or SIGINT (exit 0); SIGHUP reloads with ``load`` and registers
    every resource again."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            generation: list[trio.CancelScope] = []

            async def run_plugin() -> None:
                nonlocal resources
                while True:
                    plugin = DevicePlugin(resources, kubelet_socket=args.kubelet_socket)
                    with trio.CancelScope() as scope:
                        generation[:] = [scope]
                        await plugin.run()

            nursery.start_soon(run_plugin)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        resources = load(args)
                    except ValueError as exc:
                        log.error("SIGHUP: keeping the running configuration: %s", exc)
                        continue
                    log.info("SIGHUP: configuration reloaded; serving and registering again")
                    for scope in generation:
                        scope.cancel()
                else:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    return 0


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
    try:
        resources = resources_from(args)  # refuse bad flags before anything starts
    except ValueError as exc:
        parser.exit(2, f"trio-gpu-plugin: error: {exc}\n")
    return trio.run(serve, args, resources)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
