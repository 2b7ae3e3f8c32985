"""The NVML device source on a real GPU: discovery, events, health task, clean stop.

Run on a machine with an NVIDIA GPU and driver (``nvidia-smi`` on the PATH):

    python bench/real_nvml.py [--seconds 5] [--json FILE]

It discovers the GPUs through real NVML (pynvml) with the same code the plugin runs,
checks the device model against ``nvidia-smi -q -x`` (UUID, minor number, memory, PCI bus
ID) and ``nvidia-smi topo -m`` / sysfs (NUMA node), reads what health checking reads
(supported event types, MIG mode, pending page retirement / row remap, the driver's
recovery action field, volatile uncorrectable ECC count) and times a probe's calls and an
idle event wait, then runs the NvmlNode (event task + probes) for a few seconds with a
source publishing the device list (RSS and CPU measured), stops it by cancellation and
times the stop.

``--fault`` also compiles (``nvcc``) and runs a CUDA program that writes through an
illegal address while the node watches: the driver raises an XID that NVIDIA's filter
counts as an application error (13/31/43), so the event must be seen and logged while the
GPU stays Healthy; the recovery action the driver reports after it is recorded.  It does
not change any setting of the GPU (MIG mode included).

Exit status 0 only if every check passed.  Prints what it found.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pynvml  # noqa: E402
import trio  # noqa: E402

from trio_gpu_plugin import DevicePlugin, Resource  # noqa: E402
from trio_gpu_plugin._devices import DeviceInfo  # noqa: E402
from trio_gpu_plugin._discovery import discover, numa_node_path  # noqa: E402
from trio_gpu_plugin._health import HealthChecks  # noqa: E402
from trio_gpu_plugin._nvml import load_pynvml  # noqa: E402
from trio_gpu_plugin._nvml_source import NvmlNode, mig_slices, whole_gpus  # noqa: E402
from trio_gpu_plugin._observe import Observer  # noqa: E402

FAULT_CU = r"""
#include <cstdio>
// Writes through an address no allocation owns: the driver raises an XID for this
// context (an application error: 13/31/43 by NVIDIA's filter), the GPU is fine.
__global__ void fault(int *p) { p[threadIdx.x] = 42; }
int main() {
    fault<<<1, 32>>>(reinterpret_cast<int *>(0x10));
    cudaError_t err = cudaDeviceSynchronize();
    std::printf("cudaDeviceSynchronize: %s\n", cudaGetErrorString(err));
    return err == cudaSuccess ? 1 : 0;  // 0: it faulted, as it must
}
"""


class Events(Observer):
    """Counts the NVML events the node reports (XIDs by number)."""

    def __init__(self) -> None:
        self.xids: list[int] = []
        self.kinds: list[str] = []

    def nvml_event(self, xid: int | None, kind: str) -> None:
        self.kinds.append(kind)
        if xid is not None:
            self.xids.append(xid)


def rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_fault(directory: str) -> str | None:
    """The faulting CUDA program, built with nvcc; ``None`` without nvcc."""
    nvcc = shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    if nvcc is None:
        return None
    source = pathlib.Path(directory) / "fault.cu"
    source.write_text(FAULT_CU)
    binary = pathlib.Path(directory) / "fault"
    subprocess.run([nvcc, "-o", str(binary), str(source)], check=True, timeout=300,
                   capture_output=True, text=True)
    return str(binary)
from trio_gpu_plugin.testing import FakeKubelet  # noqa: E402

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


def nvidia_smi() -> dict[str, dict[str, Any]]:
    """Per GPU UUID: minor, memory MiB, bus id, from ``nvidia-smi -q -x``."""
    out = subprocess.run(["nvidia-smi", "-q", "-x"], capture_output=True, text=True, timeout=120)
    tree = ET.fromstring(out.stdout)
    found = {}
    for gpu in tree.findall("gpu"):
        total = gpu.findtext("fb_memory_usage/total") or ""
        found[(gpu.findtext("uuid") or "").strip()] = {
            "minor": int(gpu.findtext("minor_number") or -1)
            if (gpu.findtext("minor_number") or "").strip().isdigit() else None,
            "memory_mib": int(total.split()[0]) if total.split() else None,
            "bus_id": (gpu.get("id") or "").upper(),
            "product": (gpu.findtext("product_name") or "").strip(),
            "mig_mode": (gpu.findtext("mig_mode/current_mig") or "").strip(),
        }
    return found


def smi_numa() -> dict[int, int | None]:
    """GPU index -> NUMA affinity column of ``nvidia-smi topo -m`` (when it has one)."""
    out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=60)
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in out.stdout.splitlines()]
    header = next((line for line in lines if "NUMA Affinity" in line), None)
    if header is None:
        return {}
    columns = re.split(r"\t+", header.strip())
    try:
        position = columns.index("NUMA Affinity")
    except ValueError:
        return {}
    numa: dict[int, int | None] = {}
    for line in lines:
        match = re.match(r"^GPU(\d+)\t", line)
        if match:
            cells = re.split(r"\t+", line.strip())
            # The header has no cell for the row label.
            value = cells[position + 1] if position + 1 < len(cells) else ""
            numa[int(match.group(1))] = int(value) if value.strip().isdigit() else None
    return numa


async def run_node(seconds: float, probe_interval: float, wait_ms: int,
                   fault: str | None = None) -> dict[str, Any]:
    nvml = load_pynvml()
    events = Events()
    node = NvmlNode(nvml, root="/", checks=HealthChecks.from_env(os.environ),
                    probe_interval=probe_interval, wait_timeout_ms=wait_ms, observer=events)
    published: list[list[DeviceInfo]] = []
    report: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        t0 = time.perf_counter()
        await nursery.start(node.run)
        report["start_s"] = time.perf_counter() - t0
        model = node.model
        assert model is not None
        select = mig_slices if any(g.mig_enabled for g in model.gpus) else whole_gpus
        await nursery.start(node.source(select).run, published.append)
        report["rss_mib"] = rss_mib()
        cpu = time.process_time()
        await trio.sleep(seconds)
        report["cpu_s"] = time.process_time() - cpu
        if fault is not None:
            run = await trio.run_process([fault], capture_stdout=True, check=False)
            report["fault_rc"] = run.returncode
            report["fault_out"] = run.stdout.decode(errors="replace").strip()
            # The XID reaches us through the event wait; give it a few waits' time.
            with trio.move_on_after(5):
                while not events.xids:
                    await trio.sleep(0.05)
            await trio.sleep(max(2 * probe_interval, 1.0))  # probes, and a recovery-action read
        report["xids"] = events.xids
        report["event_kinds"] = events.kinds
        report["recovery_actions"] = {g.uuid: node.recovery_action(g.uuid) for g in model.gpus}
        report["published"] = [[(d.id, d.healthy, d.numa_nodes) for d in devices]
                               for devices in published]
        report["unhealthy"] = node.tracker.unhealthy_units()
        report["sessions"] = node.sessions
        t1 = time.perf_counter()
        nursery.cancel_scope.cancel()
    report["stop_s"] = time.perf_counter() - t1
    return report


async def with_kubelet() -> dict[str, Any]:
    """The plugin runtime over real NVML, registered with the test kit's fake kubelet."""
    directory = tempfile.mkdtemp(prefix="tgp-real-", dir="/tmp")
    try:
        node = NvmlNode(load_pynvml(), root="/", checks=HealthChecks.from_env(os.environ))
        kubelet = FakeKubelet(directory)
        async with trio.open_nursery() as nursery:
            await nursery.start(kubelet.run)
            await nursery.start(node.run)
            plugin = DevicePlugin([Resource("nvidia.com/gpu", node.source(whole_gpus), "nvidia-gpu.sock")],
                                  kubelet_socket=kubelet.kubelet_socket)
            await nursery.start(plugin.run)
            view = kubelet.resources["nvidia.com/gpu"]
            admission = await kubelet.admit("nvidia.com/gpu", 1, pod="real", container="cuda")
            found = {"healthy": sorted(view.healthy), "unhealthy": sorted(view.unhealthy),
                     "topology": {k: list(v) for k, v in view.topology.items()},
                     "allocate_envs": dict(admission.response.envs)}
            nursery.cancel_scope.cancel()
        return found
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def recovery_field(nvml: Any, handle: Any) -> str:
    """What the driver answers for NVML_FI_DEV_GET_GPU_RECOVERY_ACTION (230)."""
    [value] = nvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])
    if value.nvmlReturn != pynvml.NVML_SUCCESS:
        return f"field not reported (NVML return code {value.nvmlReturn})"
    return f"{value.value.uiVal} (valueType {value.valueType})"


def probe_ms(nvml: Any, uuid: str) -> float:
    """Wall time of the calls one probe of this GPU makes, in ms."""
    t0 = time.perf_counter()
    handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
    try:
        nvml.nvmlDeviceGetMemoryInfo(handle)
    except pynvml.NVMLError_NoPermission:
        pass
    nvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])
    return round((time.perf_counter() - t0) * 1000, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--probe-interval", type=float, default=5.0,
                        help="the node's probe period (the plugin's default: 5 s)")
    parser.add_argument("--wait-ms", type=int, default=250, help="event wait timeout")
    parser.add_argument("--json", help="also write the findings here")
    parser.add_argument("--fault", action="store_true",
                        help="also run a CUDA program that faults on purpose (needs nvcc)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, trio {trio.__version__}, nvidia-ml-py "
          f"{getattr(pynvml, '__version__', '?')}")
    if shutil.which("nvidia-smi") is None:
        print("nvidia-smi not found: no NVIDIA GPU here")
        return 2

    nvml = load_pynvml()
    nvml.nvmlInit()
    try:
        t0 = time.perf_counter()
        result = discover(nvml, "/")
        discovery_s = time.perf_counter() - t0
        model = result.model
        print(f"\ndiscovery: driver {model.driver_version}, {len(model.gpus)} GPU(s) in "
              f"{discovery_s * 1000:.1f} ms; problems: {result.problems or 'none'}")
        health_reads = {}
        for gpu in model.gpus:
            handle = nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
            reads: dict[str, Any] = {}
            for name, call in [
                ("supported_events", lambda: hex(nvml.nvmlDeviceGetSupportedEventTypes(handle))),
                ("mig_mode", lambda: nvml.nvmlDeviceGetMigMode(handle)),
                ("retired_pages_pending", lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle)),
                ("remapped_rows", lambda: nvml.nvmlDeviceGetRemappedRows(handle)),
                ("recovery_action", lambda: recovery_field(nvml, handle)),
                ("uncorrected_volatile_ecc", lambda: nvml.nvmlDeviceGetTotalEccErrors(
                    handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)),
                ("probe_calls_ms", lambda: probe_ms(nvml, gpu.uuid)),
            ]:
                try:
                    reads[name] = call()
                except pynvml.NVMLError as exc:
                    reads[name] = f"error: {exc}"
            health_reads[gpu.uuid] = reads
            print(f"  GPU {gpu.index}: {gpu.name} {gpu.uuid} minor {gpu.minor} "
                  f"{gpu.memory_bytes / 2**20:.0f} MiB bus {gpu.pci_bus_id} cc "
                  f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]} NUMA {gpu.numa_node} "
                  f"NVLink peers {dict(gpu.nvlinks)} other links {gpu.nvswitch_links} "
                  f"MIG {'on' if gpu.mig_enabled else 'off'} {[m.profile for m in gpu.mig_devices]}")
            print(f"         {reads}")
        print(f"  PCIe levels: {sorted(set(model.pcie.values()))}")
        event_set = nvml.nvmlEventSetCreate()
        try:
            t0 = time.perf_counter()
            try:
                nvml.nvmlEventSetWait_v2(event_set, 100)
                idle_wait = "an event arrived"
            except pynvml.NVMLError_Timeout:
                idle_wait = f"timed out after {(time.perf_counter() - t0) * 1000:.1f} ms (asked 100)"
            print(f"  an idle 100 ms event wait {idle_wait}")
        finally:
            nvml.nvmlEventSetFree(event_set)
    finally:
        nvml.nvmlShutdown()

    print("\nagainst nvidia-smi -q -x:")
    smi = nvidia_smi()
    check(set(smi) == {g.uuid for g in model.gpus},
          f"same GPU UUIDs ({len(smi)} from nvidia-smi, {len(model.gpus)} from discovery)")
    for gpu in model.gpus:
        row = smi.get(gpu.uuid, {})
        check(row.get("minor") == gpu.minor, f"GPU {gpu.index} minor {gpu.minor} == nvidia-smi {row.get('minor')}")
        check(row.get("memory_mib") == gpu.memory_bytes // 2**20,
              f"GPU {gpu.index} memory {gpu.memory_bytes // 2**20} MiB == nvidia-smi {row.get('memory_mib')} MiB")
        check(row.get("bus_id") == gpu.pci_bus_id.upper(),
              f"GPU {gpu.index} bus {gpu.pci_bus_id} == nvidia-smi {row.get('bus_id')}")
        check(row.get("product") == gpu.name, f"GPU {gpu.index} name {gpu.name!r} == nvidia-smi {row.get('product')!r}")
    topo = smi_numa()
    print(f"\nNUMA (nvidia-smi topo -m affinity: {topo or 'no column'}):")
    for gpu in model.gpus:
        path = numa_node_path("/", gpu.pci_bus_id)
        try:
            raw = pathlib.Path(path).read_text().strip()
        except OSError as exc:
            raw = f"unreadable ({exc.strerror})"
        expected = int(raw) if raw.lstrip("-").isdigit() and int(raw) >= 0 else None
        check(gpu.numa_node == expected, f"GPU {gpu.index} NUMA {gpu.numa_node} == {path} ({raw})")
        if gpu.index in topo and expected is not None:
            check(topo[gpu.index] == gpu.numa_node,
                  f"GPU {gpu.index} NUMA {gpu.numa_node} == nvidia-smi topo {topo[gpu.index]}")
        elif gpu.index in topo:
            # sysfs says -1 (no NUMA information, typical of a VM): NVIDIA's plugin then
            # reports no topology, and so do we; nvidia-smi prints its own guess.
            print(f"  [info] GPU {gpu.index}: sysfs has no NUMA node, so no topology is "
                  f"reported (as NVIDIA's plugin); nvidia-smi topo shows {topo[gpu.index]}")

    print(f"\nhealth task: NvmlNode over real NVML for {args.seconds:g} s (event waits of "
          f"{args.wait_ms} ms, probes every {args.probe_interval:g} s), then cancelled")
    fault = None
    if args.fault:
        build = tempfile.mkdtemp(prefix="tgp-fault-", dir="/tmp")
        try:
            fault = build_fault(build)
        except subprocess.CalledProcessError as exc:
            check(False, f"nvcc builds the faulting program: {exc.stderr.strip()[-300:]}")
        if fault is None and not failures:
            print("  [skip] --fault: no nvcc here")
    report = trio.run(run_node, args.seconds, args.probe_interval, args.wait_ms, fault)
    print(f"  started (init + discovery + first publish) in {report['start_s'] * 1000:.1f} ms")
    last = report["published"][-1]
    print(f"  device lists published: {len(report['published'])}; last ({len(last)} devices): "
          f"{last[:4]}{' ...' if len(last) > 4 else ''}")
    print(f"  CPU used while watching: {report['cpu_s']:.3f} s over {args.seconds:g} s "
          f"({report['cpu_s'] / args.seconds * 60:.3f} s per 60 s)")
    print(f"  RSS with the node running: {report['rss_mib']:.1f} MiB; recovery actions "
          f"{report['recovery_actions']}")
    if fault is not None:
        print(f"  faulting program: exit {report['fault_rc']}, {report['fault_out']!r}; "
              f"XIDs seen {report['xids']}")
        check(report["fault_rc"] == 0, "the CUDA program faulted as it was written to")
        check(bool(report["xids"]), "its XID reached the node through the event wait")
        check(all(x in (13, 31, 43, 45) for x in report["xids"]),
              f"as an application-error XID NVIDIA's filter skips ({report['xids']})")
    check(report["sessions"] == 1, f"one NVML session, no failure (sessions {report['sessions']})")
    check(not report["unhealthy"], f"no device unhealthy: {report['unhealthy'] or 'none'}")
    check(report["stop_s"] < max(1.0, 2 * args.wait_ms / 1000), f"stopped by cancellation in {report['stop_s'] * 1000:.1f} ms (< 1 s)")
    print("\nplugin runtime over real NVML, registered with the fake kubelet:")
    seen = trio.run(with_kubelet)
    print(f"  {seen}")
    check(seen["healthy"] == sorted(g.uuid for g in model.gpus) and not seen["unhealthy"],
          "the kubelet sees every GPU Healthy")
    check(all(seen["topology"].get(g.uuid, []) == ([] if g.numa_node is None else [g.numa_node])
              for g in model.gpus), "with its NUMA node")
    check(seen["allocate_envs"].get("NVIDIA_VISIBLE_DEVICES", "") in {g.uuid for g in model.gpus},
          f"Allocate answers NVIDIA_VISIBLE_DEVICES={seen['allocate_envs'].get('NVIDIA_VISIBLE_DEVICES')}")
    nvml.nvmlInit()  # and NVML is still usable afterwards: the event set was freed cleanly
    check(nvml.nvmlDeviceGetCount() == len(model.gpus), "NVML usable after the stop")
    nvml.nvmlShutdown()

    if args.json:
        with open(args.json, "w") as file:
            json.dump({"gpus": [g.__dict__ | {"nvlinks": dict(g.nvlinks), "mig_devices": [m.__dict__ for m in g.mig_devices]}
                                for g in model.gpus],
                       "health_reads": health_reads, "smi": smi, "node": report,
                       "failures": failures}, file, indent=1, default=str)
    print(f"\n{'all checks passed' if not failures else f'{len(failures)} check(s) failed'}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
