"""Reliability scenarios for the plugin over a simulated NVML, one subcommand each.

``load`` (the reliability issue's item 1): a burst of ``--admissions`` admissions
(GetPreferredAllocation then Allocate, as the kubelet's devicesToAllocate sends them)
from ``--clients`` concurrent kubelet-side clients, each on its own connection to the
plugin's socket, on a 16-GPU simulated node (two NUMA nodes of eight A100s) shared by
time-slicing with 10 replicas (``nvidia.com/gpu.shared``, 160 devices), while an XID 79
hits a random GPU every 100 ms and the GPUs recover after a 0.3 s window.

Checks (any miss exits 1):

* every answer is correct: GetPreferredAllocation gives ``size`` distinct IDs, all from
  the available list, on ``size`` distinct GPUs (the default ``distributed`` policy with
  every healthy GPU equally free); Allocate answers ``NVIDIA_VISIBLE_DEVICES`` = the
  chosen replicas' GPU UUIDs in order, de-duplicated.  An Allocate naming a replica whose
  GPU took an XID since the client read the table may fail ``FAILED_PRECONDITION``
  naming it: that is the plugin refusing an unhealthy device, so it counts as correct
  (as "refused") when the GPU it names did take an XID within the last 2 s;
* no admission (both calls) takes longer than ``ADMISSION_BOUND_S`` (1 s);
* ListAndWatch never stalls: each injected XID shows in the fake kubelet's table (all
  ten replicas of that GPU unhealthy) within ``STALL_BOUND_S`` (1 s), and once the load
  ends every device is healthy again in the table within 2 s.

Reported: throughput (admissions/s over the burst), latency p50/p99/max, correctness
counts, XID-to-table lag p50/max, and the longest gap between ListAndWatch updates.

Run from the repository root: python bench/reliability.py load [--admissions N]
[--clients N] [--seed N].  ``shutdown`` is the issue's item 5 (see :func:`shutdown`);
``soak``, ``chaos`` and ``hostile`` run ``bench/soak.py``, ``bench/chaos.py`` and
``bench/hostile.py`` with the rest of the command line, so this one script runs every
full scenario.  A new section is a scenario function returning a report and a
``SECTIONS`` entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _stats import line  # noqa: E402
from trio_gpu_plugin import Channel, RpcError, StatusCode, open_unix_channel  # noqa: E402
from trio_gpu_plugin._config import resolve_config  # noqa: E402
from trio_gpu_plugin._configured import NodeSetup  # noqa: E402
from trio_gpu_plugin._health import HealthChecks  # noqa: E402
from trio_gpu_plugin._nvml_sim import SimGpuSpec, SimNodeSpec, SimulatedNVML  # noqa: E402
from trio_gpu_plugin._nvml_source import NvmlNode  # noqa: E402
from trio_gpu_plugin._observe import Observer  # noqa: E402
from trio_gpu_plugin._runtime import DevicePlugin  # noqa: E402
from trio_gpu_plugin.proto import v1beta1  # noqa: E402
from trio_gpu_plugin.testing import FakeKubelet  # noqa: E402

#: Every admission (GetPreferredAllocation + Allocate) must finish within this.  The
#: kubelet sends Allocate with no deadline, so this is our own bound: well above what a
#: loaded single-threaded event loop needs for two small RPCs, well below anything a pod
#: start would notice.
ADMISSION_BOUND_S = 1.0
#: An injected XID must reach the kubelet's table within this.
STALL_BOUND_S = 1.0
#: After the load, every device must be back in the table as healthy within this
#: (recovery window 0.3 s + a probe every 50 ms, plus slack).
RECOVERY_BOUND_S = 2.0
#: An FAILED_PRECONDITION refusal is only credible for a GPU that took an XID this recently
#: (the recovery window plus the longest an admission may take, with slack).
REFUSAL_WINDOW_S = 2.0

RESOURCE = "nvidia.com/gpu.shared"
REPLICAS = 10
XID_INTERVAL_S = 0.1
RECOVERY_WINDOW_S = 0.3
PROBE_INTERVAL_S = 0.05
# A hard stop for any one RPC, so a hung plugin fails the run instead of hanging it.
RPC_TIMEOUT_S = 10.0

SIXTEEN = SimNodeSpec(name="sixteen", gpus=tuple(
    SimGpuSpec(name="NVIDIA A100-SXM4-40GB", numa_node=i // 8) for i in range(16)))
TIME_SLICING = {"version": "v1", "sharing": {"timeSlicing": {
    "renameByDefault": True,
    "resources": [{"name": "nvidia.com/gpu", "replicas": REPLICAS}]}}}


def environment() -> str:
    return (f"# {platform.platform()} / {platform.python_implementation()} "
            f"{platform.python_version()} / trio {trio.__version__} / {os.cpu_count()} CPUs")


# --- a served node --------------------------------------------------------------------

@dataclasses.dataclass
class Served:
    """A plugin serving a simulated node to a fake kubelet."""
    nvml: SimulatedNVML
    node: NvmlNode
    kubelet: FakeKubelet
    socket: pathlib.Path
    uuids: list[str]  # GPU UUIDs by index
    plugin: DevicePlugin


async def serve_node(nursery: trio.Nursery, directory: pathlib.Path, spec: SimNodeSpec,
                     document: object, resource: str, *, recovery_window: float,
                     probe_interval: float, call_timeout: float = 10.0,
                     observer: Observer | None = None) -> Served:
    """The configured plugin of ``tests/test_configured.py::serve_in_process`` over
    ``spec``, registered with a fake kubelet in ``directory``; returns once the kubelet
    holds the first table of ``resource``."""
    kubelet = FakeKubelet(directory / "kubelet")
    (directory / "kubelet").mkdir()
    await nursery.start(kubelet.run)
    nvml = SimulatedNVML(spec)
    root = directory / "root"
    root.mkdir()
    nvml.write_driver_root(root)
    config, _ = resolve_config({}, {}, document)
    node = NvmlNode(nvml, root=root, checks=HealthChecks(), recovery_window=recovery_window,
                    probe_interval=probe_interval, call_timeout=call_timeout, observer=observer)
    await nursery.start(node.run)
    setup = NodeSetup.read(config, root)
    model = await node.wait_model()
    plugin = DevicePlugin(setup.resources(node, setup.plan(model)),
                          kubelet_socket=kubelet.kubelet_socket, observer=observer)
    await nursery.start(plugin.run)
    await kubelet.wait_registered(resource)
    endpoint = kubelet.resources[resource].endpoint
    return Served(nvml, node, kubelet, kubelet.socket_dir / pathlib.Path(endpoint).name,
                  [g.uuid for g in model.gpus], plugin)


# --- load -----------------------------------------------------------------------------

@dataclasses.dataclass
class LoadReport:
    admissions: int
    clients: int
    elapsed_s: float
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    allocated: int = 0  # both calls answered and correct
    refused: int = 0  # Allocate refused a device that had just become unhealthy
    failures: list[str] = dataclasses.field(default_factory=list)
    xids: int = 0
    xid_lag_ms: list[float] = dataclasses.field(default_factory=list)
    stalls: int = 0  # XIDs that did not reach the table within STALL_BOUND_S
    max_update_gap_ms: float = 0.0
    updates: int = 0  # ListAndWatch messages the kubelet applied during the load
    recovered: bool = False

    @property
    def throughput(self) -> float:
        return self.admissions / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def over_bound(self) -> int:
        return sum(1 for v in self.latencies_ms if v > ADMISSION_BOUND_S * 1000)

    def problems(self) -> list[str]:
        """Everything that fails the run, in words; empty when it passes."""
        out = list(self.failures[:10])
        if len(self.failures) > 10:
            out.append(f"... and {len(self.failures) - 10} more wrong answers")
        if self.allocated + self.refused != self.admissions:
            out.append(f"{self.allocated} allocated + {self.refused} refused != "
                       f"{self.admissions} admissions")
        if self.over_bound:
            out.append(f"{self.over_bound} admission(s) over {ADMISSION_BOUND_S:g} s")
        if self.stalls:
            out.append(f"{self.stalls} XID(s) not in the kubelet's table within "
                       f"{STALL_BOUND_S:g} s")
        if not self.xid_lag_ms:
            out.append("no XID was measured")
        if not self.recovered:
            out.append(f"not every device healthy again within {RECOVERY_BOUND_S:g} s")
        return out


def expected_visible(ids: list[str]) -> str:
    # Replica IDs are "<GPU UUID>::<n>"; the container sees each GPU once, in order.
    return ",".join(dict.fromkeys(i.split("::")[0] for i in ids))


async def load(admissions: int = 1000, clients: int = 50, seed: int = 1) -> LoadReport:
    """Run the load scenario in a temporary directory and return its report."""
    rng = random.Random(seed)
    directory = pathlib.Path(tempfile.mkdtemp(prefix="tgp-rel-", dir="/tmp"))
    try:
        async with trio.open_nursery() as nursery:
            served = await serve_node(nursery, directory, SIXTEEN, TIME_SLICING, RESOURCE,
                                      recovery_window=RECOVERY_WINDOW_S,
                                      probe_interval=PROBE_INTERVAL_S)
            report = await _load(served, admissions, clients, rng)
            nursery.cancel_scope.cancel()
        return report
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _load(served: Served, admissions: int, clients: int, rng: random.Random) -> LoadReport:
    kubelet, view = served.kubelet, served.kubelet.resources[RESOURCE]
    report = LoadReport(admissions, clients, 0.0)
    last_xid: dict[str, float] = {}  # GPU UUID -> trio time of its latest XID
    remaining = admissions
    go = trio.Event()
    done = trio.Event()

    def fail(text: str) -> None:
        report.failures.append(text)

    async def admit_one(channel: Channel, n: int) -> None:
        size = rng.randint(1, 4)
        # What the kubelet offers: the devices healthy in its table now.
        available = sorted(view.healthy)
        rng.shuffle(available)
        started = time.perf_counter()
        try:
            answer = await channel.unary(
                v1beta1.DEVICE_PLUGIN, "GetPreferredAllocation",
                v1beta1.PreferredAllocationRequest(container_requests=[
                    v1beta1.ContainerPreferredAllocationRequest(
                        available_deviceIDs=available, allocation_size=size)]),
                timeout=RPC_TIMEOUT_S)
        except RpcError as exc:
            report.latencies_ms.append((time.perf_counter() - started) * 1000)
            fail(f"#{n} GetPreferredAllocation: {exc}")
            return
        (container,) = answer.container_responses
        chosen = list(container.deviceIDs)
        gpus = {i.split("::")[0] for i in chosen}
        if (len(chosen) != size or len(set(chosen)) != size or not set(chosen) <= set(available)
                or len(gpus) != size):
            report.latencies_ms.append((time.perf_counter() - started) * 1000)
            fail(f"#{n} GetPreferredAllocation size {size}: {chosen}")
            return
        try:
            response = await channel.unary(
                v1beta1.DEVICE_PLUGIN, "Allocate",
                v1beta1.AllocateRequest(container_requests=[
                    v1beta1.ContainerAllocateRequest(devices_ids=chosen)]),
                timeout=RPC_TIMEOUT_S)
        except RpcError as exc:
            report.latencies_ms.append((time.perf_counter() - started) * 1000)
            named = [i for i in chosen if i in exc.message]
            recent = [i for i in named
                      if trio.current_time() - last_xid.get(i.split("::")[0], -1e9)
                      < REFUSAL_WINDOW_S]
            if exc.code is StatusCode.FAILED_PRECONDITION and recent:
                report.refused += 1
            else:
                fail(f"#{n} Allocate {chosen}: {exc}")
            return
        report.latencies_ms.append((time.perf_counter() - started) * 1000)
        (got,) = response.container_responses
        want = expected_visible(chosen)
        if got.envs.get("NVIDIA_VISIBLE_DEVICES") != want:
            fail(f"#{n} Allocate {chosen}: envs {dict(got.envs)}, want {want}")
            return
        report.allocated += 1

    async def client() -> None:
        nonlocal remaining
        # Each client holds its own connection, as separate kubelet-side callers would.
        async with open_unix_channel(served.socket) as channel:
            await go.wait()
            while remaining > 0:
                remaining -= 1
                await admit_one(channel, admissions - remaining)

    async def inject(nursery: trio.Nursery) -> None:
        while not done.is_set():
            index = rng.randrange(len(served.uuids))
            uuid = served.uuids[index]
            at = trio.current_time()
            last_xid[uuid] = at
            served.nvml.xid(index, 79)
            # A reset right away: the simulated XID leaves the GPU answering, and the
            # reset clears anything pending, so only the recovery window decides when it
            # comes back (and the next XID on it restarts that window).
            served.nvml.recover(index)
            report.xids += 1
            nursery.start_soon(measure_lag, uuid, at)
            await trio.sleep(XID_INTERVAL_S)

    async def measure_lag(uuid: str, at: float) -> None:
        replicas = {f"{uuid}::{n}" for n in range(REPLICAS)}
        try:
            await kubelet.wait_until(lambda: replicas <= view.unhealthy, timeout=STALL_BOUND_S)
        except trio.TooSlowError:
            report.stalls += 1
            return
        report.xid_lag_ms.append((trio.current_time() - at) * 1000)

    async def watch_updates() -> None:
        # The gap between ListAndWatch messages the kubelet applies while the load runs:
        # informative only (a quiet spell is legitimate when nothing changed), the stall
        # bound is on the XID lag above.
        previous, seen = trio.current_time(), view.updates
        while not done.is_set():
            with trio.move_on_after(0.05):
                await kubelet.wait_until(lambda: view.updates != seen or done.is_set(),
                                         timeout=3600)
            if view.updates != seen:
                now = trio.current_time()
                report.max_update_gap_ms = max(report.max_update_gap_ms, (now - previous) * 1000)
                report.updates += view.updates - seen
                previous, seen = now, view.updates

    async with trio.open_nursery() as background:
        background.start_soon(watch_updates)
        background.start_soon(inject, background)
        async with trio.open_nursery() as workers:
            for _ in range(clients):
                workers.start_soon(client)
            # Let the clients connect first so the burst starts together.
            await trio.sleep(0.2)
            started = time.perf_counter()
            go.set()
        report.elapsed_s = time.perf_counter() - started
        done.set()
    # Every device healthy again: recoveries reach the table too.
    try:
        await kubelet.wait_until(lambda: not view.unhealthy and len(view.healthy)
                                 == REPLICAS * len(served.uuids), timeout=RECOVERY_BOUND_S)
        report.recovered = True
    except trio.TooSlowError:
        report.recovered = False
    return report


def print_load(report: LoadReport) -> None:
    print(f"load: {report.admissions} admissions from {report.clients} clients, 16 GPUs x "
          f"{REPLICAS} replicas, an XID every {XID_INTERVAL_S * 1000:.0f} ms "
          f"(recovery window {RECOVERY_WINDOW_S:g} s)")
    print(f"throughput {report.throughput:8.1f} admissions/s ({report.elapsed_s:.2f} s)")
    line("admission (GPA + Allocate)", report.latencies_ms,
         f"[every one < {ADMISSION_BOUND_S * 1000:.0f} ms: {report.over_bound} over]")
    print(f"answers: {report.allocated} allocated, {report.refused} refused as unhealthy "
          f"(correct), {len(report.failures)} wrong")
    if report.xid_lag_ms:
        line("XID -> kubelet table", report.xid_lag_ms,
             f"[every one < {STALL_BOUND_S * 1000:.0f} ms: {report.stalls} stalled of "
             f"{report.xids}]")
    print(f"ListAndWatch: {report.updates} updates during the load, longest gap "
          f"{report.max_update_gap_ms:.1f} ms; all healthy again after the load: "
          f"{report.recovered}")


async def run_load(args: argparse.Namespace) -> list[str]:
    report = await load(args.admissions, args.clients, args.seed)
    print_load(report)
    return report.problems()


# --- shutdown: SIGTERM under load, SIGKILL and restart ------------------------------

SHUTDOWN_BOUND_S = 1.0
#: Process start to registration (spawn, imports, NVML, serve, Register): ~0.5 s here.
RESTART_BOUND_S = 5.0


@dataclasses.dataclass
class ShutdownReport:
    """What SIGTERM under load and SIGKILL-then-restart showed, per round."""

    term_exit_s: list[float] = dataclasses.field(default_factory=list)
    term_codes: list[int] = dataclasses.field(default_factory=list)
    sockets_left: int = 0
    admissions_during: int = 0
    stale_after_kill: int = 0
    restart_register_s: list[float] = dataclasses.field(default_factory=list)

    def problems(self) -> list[str]:
        out = []
        if any(code != 0 for code in self.term_codes):
            out.append(f"SIGTERM exit codes {self.term_codes}")
        if self.term_exit_s and max(self.term_exit_s) >= SHUTDOWN_BOUND_S:
            out.append(f"SIGTERM -> exit took {max(self.term_exit_s):.2f} s (bound {SHUTDOWN_BOUND_S} s)")
        if self.sockets_left:
            out.append(f"{self.sockets_left} plugin socket(s) left after SIGTERM")
        if self.restart_register_s and max(self.restart_register_s) >= RESTART_BOUND_S:
            out.append(f"restart -> registered took {max(self.restart_register_s):.2f} s "
                       f"(bound {RESTART_BOUND_S} s)")
        return out


async def _spawn(kubelet: FakeKubelet, config: pathlib.Path) -> trio.Process:
    env = {k: v for k, v in os.environ.items() if k not in ("SIMULATE", "KUBELET_SOCKET")}
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_gpu_plugin", "--log-level", "error", "--simulate", "dgx-a100",
         "--config-file", str(config), "--kubelet-socket", str(kubelet.kubelet_socket)],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


async def _hammer(path: pathlib.Path, ids: list[str], stop: trio.Event, counter: list[int]) -> None:
    """Admissions as fast as they go, until ``stop`` or the plugin goes away."""
    try:
        async with open_unix_channel(path) as channel:
            while not stop.is_set():
                await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate", v1beta1.AllocateRequest(
                    container_requests=[v1beta1.ContainerAllocateRequest(devices_ids=ids[:1])]),
                    timeout=RPC_TIMEOUT_S)
                counter[0] += 1
    except (OSError, RpcError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the plugin is stopping: exactly what is being measured


async def shutdown(rounds: int = 5, clients: int = 20) -> ShutdownReport:
    """SIGTERM while ``clients`` connections allocate; then SIGKILL and a restart."""
    report = ShutdownReport()
    directory = pathlib.Path(tempfile.mkdtemp(prefix="tgp-rel-", dir="/tmp"))
    config = directory / "config.yaml"
    config.write_text(json.dumps(TIME_SLICING))
    socket = directory / "kubelet" / "nvidia-gpu.shared.sock"
    (directory / "kubelet").mkdir()
    try:
        kubelet = FakeKubelet(directory / "kubelet")
        async with trio.open_nursery() as nursery:
            await nursery.start(kubelet.run)
            registrations = 0
            for _ in range(rounds):
                process = await _spawn(kubelet, config)
                registrations += 1
                await kubelet.wait_registered(RESOURCE, count=registrations, timeout=30)
                ids = sorted(kubelet.resources[RESOURCE].healthy)
                stop, counter = trio.Event(), [0]
                async with trio.open_nursery() as load:
                    for _ in range(clients):
                        load.start_soon(_hammer, socket, ids, stop, counter)
                    await trio.sleep(0.3)  # under load
                    sent = time.perf_counter()
                    process.send_signal(signal.SIGTERM)
                    with trio.fail_after(30):
                        code = await process.wait()
                    report.term_exit_s.append(time.perf_counter() - sent)
                    report.term_codes.append(code)
                    stop.set()
                report.admissions_during += counter[0]
                report.sockets_left += socket.exists()
            # SIGKILL leaves the socket file behind; the next process must replace it.
            process = await _spawn(kubelet, config)
            registrations += 1
            await kubelet.wait_registered(RESOURCE, count=registrations, timeout=30)
            process.kill()
            await process.wait()
            report.stale_after_kill = int(socket.exists())
            started = time.perf_counter()
            process = await _spawn(kubelet, config)
            registrations += 1
            await kubelet.wait_registered(RESOURCE, count=registrations, timeout=30)
            report.restart_register_s.append(time.perf_counter() - started)
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                report.term_codes.append(await process.wait())
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return report


async def run_shutdown(args: argparse.Namespace) -> list[str]:
    report = await shutdown(args.rounds, args.clients)
    line("SIGTERM under load -> exit", [s * 1000 for s in report.term_exit_s],
         f"[< {SHUTDOWN_BOUND_S * 1000:.0f} ms, exit 0, sockets removed]", width=32)
    print(f"{'':<32} exit codes {sorted(set(report.term_codes))}, sockets left "
          f"{report.sockets_left}, {report.admissions_during} Allocates answered meanwhile")
    print(f"{'SIGKILL then restart':<32} stale socket left by SIGKILL: "
          f"{'yes' if report.stale_after_kill else 'no'}; new process registered in "
          f"{report.restart_register_s[0] * 1000:.0f} ms [< {RESTART_BOUND_S:.0f} s]")
    return report.problems()


# --- command line ---------------------------------------------------------------------

Section = Callable[[argparse.Namespace], Awaitable[list[str]]]


def add_load(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("load", help="a burst of admissions while health events arrive")
    p.add_argument("--admissions", type=int, default=1000)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(section=run_load)


def add_shutdown(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("shutdown", help="SIGTERM under load; SIGKILL and restart")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=20)
    p.set_defaults(section=run_shutdown)


#: One entry per section: adds its subcommand (which sets ``section``).
SECTIONS = [add_load, add_shutdown]
#: Sections that are scripts of their own (bench/<name>.py), run with the rest of the
#: command line: ``reliability.py soak --seconds 1800`` is ``soak.py --seconds 1800``.
DELEGATED = {
    "soak": "30 minutes of churn, sampling RSS, fds, tasks, threads (bench/soak.py)",
    "chaos": "kubelet killed mid-call, socket deleted, directory unwritable, NVML hung "
             "(bench/chaos.py)",
    "hostile": "100,000 random and mutated gRPC requests over raw HTTP/2 (bench/hostile.py)",
}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in DELEGATED:
        import importlib

        script = importlib.import_module(sys.argv[1])
        return int(script.main(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True, metavar="SECTION")
    for add in SECTIONS:
        add(sub)
    for name, what in DELEGATED.items():
        sub.add_parser(name, help=f"{what}; its options: bench/{name}.py --help")
    args = parser.parse_args()
    # The plugin logs every Allocate at INFO; a thousand of them would bury the report.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("trio_gpu_plugin").setLevel(logging.ERROR)
    print(environment())
    problems = trio.run(args.section, args)
    for problem in problems:
        print(f"FAIL: {problem}")
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
