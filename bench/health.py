"""Health figures of the NVML device source over the simulated NVML.

* ``XID -> kubelet Unhealthy``: an XID is injected into the simulated NVML (as the
  driver would raise it) and we time until the fake kubelet's device table, fed by
  ListAndWatch, shows the GPU Unhealthy: NVML event wait (worker thread) -> health
  tracker -> device source -> service -> gRPC stream -> kubelet.  ``--injections``
  times, each GPU recovering (short hold-down window) before it is hit again.
  [p50 < 10 ms]
* the same through the ``--simulate-control`` socket (one JSON line each way), as
  ``trio-gpu-plugin inject`` sends it.
* ``idle CPU``: CPU time of the process while the node runs its event task (waits of
  250 ms) and probes (every 5 s, the default) for ``--idle`` seconds with nothing
  happening.  [< 0.1 s per 60 s]

Plugin, fake kubelet and simulated NVML share one process (and one event loop), so both
sides' work is in the latency figures.  Run: python bench/health.py [--injections N] [--idle S]
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _stats import line  # noqa: E402
from trio_gpu_plugin import DevicePlugin, Resource  # noqa: E402
from trio_gpu_plugin._control import send_control, serve_control  # noqa: E402
from trio_gpu_plugin._health import HealthChecks  # noqa: E402
from trio_gpu_plugin._nvml_sim import SimulatedNVML, node_from  # noqa: E402
from trio_gpu_plugin._nvml_source import NvmlNode  # noqa: E402
from trio_gpu_plugin.testing import FakeKubelet  # noqa: E402

GPU = "nvidia.com/gpu"


async def latency(injections: int) -> None:
    directory = tempfile.mkdtemp(prefix="tgp-bench-", dir="/tmp")
    try:
        nvml = SimulatedNVML(node_from("dgx-a100"))
        root = os.path.join(directory, "root")
        nvml.write_driver_root(root)
        # A short window so that each GPU is healthy again before its next XID.
        node = NvmlNode(nvml, root=root, checks=HealthChecks(), recovery_window=0.05,
                        probe_interval=0.02)
        kubelet = FakeKubelet(directory)
        control = os.path.join(directory, "control.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(kubelet.run)
            await nursery.start(node.run)
            await nursery.start(serve_control, nvml, control)
            plugin = DevicePlugin([Resource(GPU, node.source(), "nvidia-gpu.sock")],
                                  kubelet_socket=kubelet.kubelet_socket)
            await nursery.start(plugin.run)
            model = node.model
            assert model is not None
            for name, via_socket in (("XID -> kubelet Unhealthy", False),
                                     ("  via the control socket", True)):
                samples = []
                for i in range(injections):
                    gpu = model.gpus[i % len(model.gpus)]
                    await kubelet.wait_until(lambda: gpu.uuid in kubelet.resources[GPU].healthy)
                    await trio.sleep(0.005)
                    started = time.perf_counter()
                    if via_socket:
                        await send_control(control, {"op": "xid", "gpu": gpu.index, "xid": 79})
                    else:
                        nvml.xid(gpu.index, 79)
                    await kubelet.wait_until(lambda: gpu.uuid in kubelet.resources[GPU].unhealthy)
                    samples.append((time.perf_counter() - started) * 1000)
                line(name, samples, "[p50 < 10 ms]", width=32)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def idle(seconds: float) -> None:
    directory = tempfile.mkdtemp(prefix="tgp-bench-", dir="/tmp")
    try:
        nvml = SimulatedNVML(node_from("dgx-a100"))
        nvml.write_driver_root(directory)
        node = NvmlNode(nvml, root=directory, checks=HealthChecks())
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await trio.sleep(1)
            waits, cpu = nvml.calls["nvmlEventSetWait_v2"], time.process_time()
            await trio.sleep(seconds)
            used = time.process_time() - cpu
            waits = nvml.calls["nvmlEventSetWait_v2"] - waits
            nursery.cancel_scope.cancel()
        print(f"{'idle CPU (event task + probes)':<32} {used:.3f} s over {seconds:g} s "
              f"({used / seconds * 60:.3f} s per 60 s; {waits} event waits)   [< 0.1 s per 60 s]")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--injections", type=int, default=100)
    parser.add_argument("--idle", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"python {platform.python_version()}, trio {trio.__version__}, {os.cpu_count()} CPUs")
    trio.run(latency, args.injections)
    trio.run(idle, args.idle)


if __name__ == "__main__":
    main()
