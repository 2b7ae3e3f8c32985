"""``trio-gpu-plugin demo``: the whole protocol on a simulated node, narrated.

No GPU and no kubelet needed: a fake kubelet (the test kit's) serves its registration
socket in a temporary directory, and the real plugin runtime serves the real NVML device
source over a simulated NVML.  A GPU is broken through the fault-injection socket, as
``trio-gpu-plugin inject`` would, and recovers after its reset.  Every step prints what
the kubelet sees.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import trio

from ._control import send_control, serve_control
from ._devices import Resource
from ._health import HealthChecks
from ._nvml_sim import SimulatedNVML, node_from
from ._nvml_source import NvmlNode, whole_gpus
from ._runtime import DevicePlugin
from .testing import FakeKubelet

RESOURCE = "nvidia.com/gpu"
#: Short so the demo shows a recovery in a second rather than a minute.
DEMO_RECOVERY_WINDOW = 1.0


def _short(device_id: str) -> str:
    return device_id[:12] + "…" if len(device_id) > 13 else device_id


async def run_demo(preset: str = "dgx-a100", say: Callable[[str], None] = print) -> int:
    """Run the demo; ``say`` receives each narrated line.  Returns the exit status."""
    directory = tempfile.mkdtemp(prefix="tgp-demo-", dir="/tmp")
    try:
        nvml = SimulatedNVML(node_from(preset))
        root = os.path.join(directory, "driver-root")
        nvml.write_driver_root(root)
        node = NvmlNode(nvml, root=root, checks=HealthChecks.from_env({}),
                        recovery_window=DEMO_RECOVERY_WINDOW, probe_interval=0.1)
        kubelet = FakeKubelet(directory)
        # Not in the kubelet's directory: a kubelet restart removes every socket there.
        os.mkdir(os.path.join(directory, "control"))
        control = os.path.join(directory, "control", "control.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(kubelet.run)
            await nursery.start(node.run)
            await nursery.start(serve_control, nvml, control)
            model = await node.wait_model()
            say(f"trio-gpu-plugin demo: a fake kubelet and a simulated {len(model.gpus)}-GPU node "
                f"({preset}, read through the NVML device source) in {directory}")
            plugin = DevicePlugin([Resource(RESOURCE, node.source(whole_gpus), "nvidia-gpu.sock")],
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
            for gpu in model.gpus:
                health = "Healthy" if gpu.uuid in view.healthy else "Unhealthy"
                nodes = ",".join(map(str, view.topology.get(gpu.uuid, []))) or "-"
                say(f"     {gpu.uuid}  {health:<9}  NUMA {nodes}  {gpu.name}")

            admission = await kubelet.admit(RESOURCE, 2, pod="demo-pod", container="cuda")
            say(f"3. admission of a 2-GPU pod: the plugin preferred "
                f"{', '.join(map(_short, admission.preferred or [])) or 'nothing'}; the kubelet "
                f"allocated {', '.join(map(_short, admission.device_ids))}")
            for key, value in sorted(admission.response.envs.items()):
                say(f"     AllocateResponse env {key}={value}")

            victim = next(g for g in model.gpus if g.uuid not in admission.device_ids)
            changed = trio.current_time()
            answer = await send_control(control, {"op": "xid", "gpu": victim.index, "xid": 79})
            await kubelet.wait_until(lambda: victim.uuid in kubelet.resources[RESOURCE].unhealthy)
            view = kubelet.resources[RESOURCE]
            say(f"4. fault injected through the control socket (trio-gpu-plugin inject --control "
                f"... xid --gpu {victim.index} --xid 79, answered {answer}): NVML reported XID 79 "
                f"on GPU {victim.index}; {(trio.current_time() - changed) * 1000:.1f} ms later the "
                f"kubelet counts {view.allocatable} allocatable of {view.capacity}")

            restarted = trio.current_time()
            await kubelet.restart()
            record = await kubelet.wait_registered(RESOURCE, count=2)
            view = kubelet.resources[RESOURCE]
            say(f"5. kubelet restart: every socket removed, kubelet.sock recreated; the plugin "
                f"registered again {(record.at - restarted) * 1000:.1f} ms after the restart began "
                f"({view.allocatable} of {view.capacity} allocatable, the unhealthy GPU still "
                f"unhealthy)")

            reset = trio.current_time()
            await send_control(control, {"op": "recover", "gpu": victim.index})
            await kubelet.wait_until(lambda: victim.uuid in kubelet.resources[RESOURCE].healthy)
            view = kubelet.resources[RESOURCE]
            say(f"6. GPU {victim.index} reset: NVML answers for it again, and after "
                f"{DEMO_RECOVERY_WINDOW:g} s without a critical event it is Healthy again "
                f"({(trio.current_time() - reset):.1f} s; {view.allocatable} of {view.capacity} "
                f"allocatable). NVIDIA's plugin would need a restart.")
            nursery.cancel_scope.cancel()
        say("done: the plugin stopped and removed its socket.")
        return 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
