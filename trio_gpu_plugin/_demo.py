"""``trio-gpu-plugin demo``: the whole protocol on a simulated node, narrated.

No GPU and no kubelet needed: a fake kubelet (the test kit's) serves its registration
socket in a temporary directory, and the real plugin runtime serves a simulated node to
it.  Every step prints what the kubelet sees.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable

import trio

from ._devices import Resource
from ._runtime import DevicePlugin
from ._simulated import SimulatedDeviceSource
from .testing import FakeKubelet

RESOURCE = "nvidia.com/gpu"


def _short(device_id: str) -> str:
    return device_id[:12] + "…" if len(device_id) > 13 else device_id


async def run_demo(preset: str = "dgx-a100", say: Callable[[str], None] = print) -> int:
    """Run the demo; ``say`` receives each narrated line.  Returns the exit status."""
    directory = tempfile.mkdtemp(prefix="tgp-demo-", dir="/tmp")
    try:
        source = SimulatedDeviceSource.preset(preset)
        kubelet = FakeKubelet(directory)
        say(f"trio-gpu-plugin demo: a fake kubelet and a simulated {len(source.gpus)}-GPU node "
            f"({preset}) in {directory}")
        async with trio.open_nursery() as nursery:
            await nursery.start(kubelet.run)
            plugin = DevicePlugin([Resource(RESOURCE, source, "nvidia-gpu.sock")],
                                  kubelet_socket=kubelet.kubelet_socket)
            started = trio.current_time()
            await nursery.start(plugin.run)
            record = await kubelet.wait_registered(RESOURCE)
            view = kubelet.resources[RESOURCE]
            say(f"1. registration: {RESOURCE} registered from {record.endpoint} in "
                f"{(record.at - started) * 1000:.1f} ms; the kubelet dialled back and read the "
                f"options (preferred allocation: "
                f"{'offered' if view.options and view.options.get_preferred_allocation_available else 'no'})")

            say(f"2. the kubelet's device table: {view.capacity} devices, {view.allocatable} healthy")
            for gpu in source.gpus:
                health = "Healthy" if gpu.uuid in view.healthy else "Unhealthy"
                nodes = ",".join(map(str, view.topology.get(gpu.uuid, []))) or "-"
                say(f"     {gpu.uuid}  {health:<9}  NUMA {nodes}  {gpu.model}")

            admission = await kubelet.admit(RESOURCE, 2, pod="demo-pod", container="cuda")
            say(f"3. admission of a 2-GPU pod: the plugin preferred "
                f"{', '.join(map(_short, admission.preferred or [])) or 'nothing'}; the kubelet "
                f"allocated {', '.join(map(_short, admission.device_ids))}")
            for key, value in sorted(admission.response.envs.items()):
                say(f"     AllocateResponse env {key}={value}")

            victim = next(g.uuid for g in source.gpus if g.uuid not in admission.device_ids)
            changed = trio.current_time()
            source.set_health(victim, False)
            await kubelet.wait_until(lambda: victim in kubelet.resources[RESOURCE].unhealthy)
            view = kubelet.resources[RESOURCE]
            say(f"4. {_short(victim)} went unhealthy: {(trio.current_time() - changed) * 1000:.1f} ms "
                f"later the kubelet counts {view.allocatable} allocatable of {view.capacity}")

            restarted = trio.current_time()
            await kubelet.restart()
            record = await kubelet.wait_registered(RESOURCE, count=2)
            view = kubelet.resources[RESOURCE]
            say(f"5. kubelet restart: every socket removed, kubelet.sock recreated; the plugin "
                f"registered again {(record.at - restarted) * 1000:.1f} ms after the restart began "
                f"({view.allocatable} of {view.capacity} allocatable, the unhealthy GPU still "
                f"unhealthy)")
            nursery.cancel_scope.cancel()
        say("done: the plugin stopped and removed its socket.")
        return 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
