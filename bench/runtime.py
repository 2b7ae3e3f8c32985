"""The plugin runtime's figures: re-registration and health latency, memory, idle CPU, start.

What is measured (targets from the runtime issue in brackets):

* ``restart -> Register``: the fake kubelet restarts (closes every connection, removes
  every socket, serves a new kubelet.sock) and we time from the start of that restart to
  the plugin's Register arriving, over ``--restarts`` restarts.  The start of the restart
  is earlier than the new kubelet.sock existing, so this is an upper bound on what the
  plugin itself takes.  [p50 < 10 ms; a grpcio plugin polling every 10 ms gets 17 ms]
* ``health -> kubelet``: a simulated GPU changes health and we time until the kubelet's
  device table shows it (ListAndWatch update received and applied).  [p50 < 5 ms]
* For the CLI as a separate process (``--simulate dgx-a100``) registering with a fake
  kubelet in this process: ``start -> registered`` (process spawn, imports, serve,
  Register), ``RSS`` after registration [<= 32 MiB], ``idle CPU`` over ``--idle``
  seconds after registration [< 0.1 s per 60 s], and ``SIGTERM -> exit`` [< 1 s].

The first two run plugin and fake kubelet in one trio process (one event loop: both
sides' work is in the figure).  Run: python bench/runtime.py [--restarts N] [--idle S]
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _stats import line  # noqa: E402
from trio_gpu_plugin import DevicePlugin, Resource  # noqa: E402
from trio_gpu_plugin.testing import FakeKubelet, SimulatedDeviceSource  # noqa: E402

GPU = "nvidia.com/gpu"


async def in_process(restarts: int, health_changes: int) -> None:
    directory = tempfile.mkdtemp(prefix="tgp-bench-", dir="/tmp")
    try:
        source = SimulatedDeviceSource.preset("dgx-a100")
        kubelet = FakeKubelet(directory)
        async with trio.open_nursery() as nursery:
            await nursery.start(kubelet.run)
            plugin = DevicePlugin([Resource(GPU, source, "nvidia-gpu.sock")],
                                  kubelet_socket=kubelet.kubelet_socket)
            await nursery.start(plugin.run)
            await kubelet.wait_registered(GPU)

            latencies = []
            for i in range(restarts):
                await trio.sleep(0.02)  # let the previous epoch settle
                started = trio.current_time()
                await kubelet.restart()
                record = await kubelet.wait_registered(GPU, count=i + 2)
                latencies.append((record.at - started) * 1000)
            line("restart -> Register", latencies, "target p50 < 10 ms")

            health = []
            gpu = source.gpus[0].uuid
            for i in range(health_changes):
                await trio.sleep(0.005)
                healthy = i % 2 == 1
                started = trio.current_time()
                source.set_health(gpu, healthy)
                await kubelet.wait_until(
                    lambda healthy=healthy: (gpu in kubelet.resources[GPU].healthy) == healthy)
                health.append((trio.current_time() - started) * 1000)
            line("health -> kubelet", health, "target p50 < 5 ms")
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for row in status:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def as_a_process(idle: float, runs: int) -> None:
    directory = tempfile.mkdtemp(prefix="tgp-bench-", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if k not in ("SIMULATE", "KUBELET_SOCKET", "PYTHONDONTWRITEBYTECODE")}
    # As installed by pip, which compiles bytecode: without it every start compiles our
    # modules, and the compiler's arenas stay in the RSS (~4 MiB).  (__pycache__ is
    # git-ignored; the dependencies' bytecode came with their installation.)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "trio_gpu_plugin")],
                   env=env, check=True)
    starts, rsses, stops, idles = [], [], [], []
    try:
        kubelet = FakeKubelet(directory)
        async with trio.open_nursery() as nursery:
            await nursery.start(kubelet.run)
            for run in range(runs):
                spawned = trio.current_time()
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "trio_gpu_plugin", "--log-level", "warning",
                     "--simulate", "dgx-a100", "--kubelet-socket", str(kubelet.kubelet_socket)],
                    cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
                try:
                    record = await kubelet.wait_registered(GPU, count=run + 1, timeout=30)
                    starts.append((record.at - spawned) * 1000)
                    await trio.sleep(0.5)  # let start-up garbage settle
                    rsses.append(rss_mib(process.pid))
                    if run == 0:
                        before = cpu_seconds(process.pid)
                        await trio.sleep(idle)
                        idles.append(cpu_seconds(process.pid) - before)
                    stopping = trio.current_time()
                    process.send_signal(signal.SIGTERM)
                    with trio.fail_after(10):
                        code = await process.wait()
                    stops.append((trio.current_time() - stopping) * 1000)
                    if code != 0:
                        raise RuntimeError(f"the plugin exited with {code} on SIGTERM")
                finally:
                    process.kill()
                    await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    line("start -> registered", starts, "(process spawn, imports, serve, Register)")
    print(f"{'RSS after registration':<28} n={len(rsses):<4} median {statistics.median(rsses):5.1f} MiB  "
          f"max {max(rsses):5.1f} MiB   target <= 32 MiB")
    print(f"{'idle CPU':<28} {idles[0]:.3f} s over {idle:g} s "
          f"({idles[0] * 60 / idle:.3f} s per 60 s)   target < 0.1 s per 60 s")
    line("SIGTERM -> exit 0", stops, "target < 1000 ms")


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--health-changes", type=int, default=200)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measurement")
    parser.add_argument("--runs", type=int, default=5, help="plugin processes started")
    args = parser.parse_args()
    print(f"# {platform.platform()} / Python {platform.python_version()} / {os.cpu_count()} CPUs / "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    trio.run(in_process, args.restarts, args.health_changes)
    trio.run(as_a_process, args.idle, args.runs)


if __name__ == "__main__":
    main()
