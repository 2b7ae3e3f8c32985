"""Soak: a long run of churn on one in-process node, watching for leaks and stale state.

The reliability issue's soak item: 30 minutes (``--seconds 1800``; CI runs a shorter
variant, see ``tests/test_soak.py``) of churn against the configured plugin on the
16-GPU simulated node of ``bench/reliability.py`` (time-slicing, 10 replicas,
``nvidia.com/gpu.shared``), served to the test kit's FakeKubelet, all in ONE process:

* the kubelet restarts every 2-3 s; each restart must be followed by a new accepted
  registration (with its first ListAndWatch message) within ``REREGISTER_BOUND_S``
  (5 s), else it counts as a *missed re-registration*;
* an XID 79 on a random GPU every ~0.5 s, and a reset (``recover``) of that GPU
  0.1-0.6 s later (the node's 0.3 s recovery window then brings it back);
* a config reload every ~5 s, as an operator does it: the config file is rewritten with
  the other replica count (10 <-> 8) and the process sends itself SIGHUP.  The plugin
  is the CLI's own: a ``GpuPlugin`` (which watches the config file) run by the CLI's
  ``serve`` (which maps SIGHUP to a reload), so a reload is the real one: re-read,
  validate, plan, register again.  It passes when, within the bound, a new registration arrived and the kubelet's
  table holds exactly the new replica set.  Kubelet restarts and reloads are serialized
  so each can be matched to its registration;
* admissions continuously: admit 1-4 devices, hold them 0-0.5 s, release.  Rejections
  are expected while the kubelet restarts or a GPU is unhealthy and are only counted.

Sampled every second: RSS (VmRSS), open fds, threads, trio tasks (the whole task tree).
After a warm-up (the first 20% of samples) a least-squares slope per minute is fitted
to each metric; reported with the max.  The run fails (``Report.problems()``) when:

* RSS grows faster than ``RSS_SLOPE_LIMIT_MIB_PER_MIN`` after the warm-up;
* fds, tasks or threads, sampled once the churn stopped and the node settled, exceed
  their warm-up max plus a small slack;
* any re-registration was missed;
* after the churn stops, every GPU reset and all admissions released, the kubelet's
  table does not match the plugin's published devices, all healthy, within
  ``SETTLE_BOUND_S`` (stale device state).

In-process, RSS measures the whole process, the test kit and this bench included (the
fake kubelet keeps every registration for tests to inspect; the samples are kept too).
``--process`` runs the plugin as operators do, ``python -m trio_gpu_plugin --simulate``
in a process of its own, and samples that process alone (RSS, fds and threads from
``/proc/<pid>``; its trio tasks cannot be counted from outside): XIDs and resets go
through its ``--simulate-control`` socket, reloads are a rewritten config file and
SIGHUP, kubelet restarts and admissions come from this process's fake kubelet.
``--trace-memory`` says whose it is: ``tracemalloc`` snapshots at the end of the warm-up
and once settled, the growth between them summed by owner (the plugin's package, the test
kit, this bench, libraries, the standard library) and the files that grew most.  Tracing
slows the run several times over, so its latencies are not the plugin's.

Run from the repository root: ``python bench/soak.py [--seconds 1800] [--seed N]
[--process | --trace-memory] [--json]``; exits 1 on any problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import reliability as rel

from trio_gpu_plugin import GpuPlugin
from trio_gpu_plugin._cli import Settings, build_parser
from trio_gpu_plugin._cli import serve as serve_cli
from trio_gpu_plugin._control import send_control
from trio_gpu_plugin._health import HealthChecks
from trio_gpu_plugin._nvml_sim import SimulatedNVML
from trio_gpu_plugin._nvml_source import NvmlNode
from trio_gpu_plugin.testing import FakeKubelet
from trio_gpu_plugin.testing._fake_kubelet import Admission, AdmissionError

RESOURCE = rel.RESOURCE
#: Each reload switches the config file between these replica counts.
REPLICA_COUNTS = (rel.REPLICAS, 8)
RECOVERY_WINDOW_S = 0.3
PROBE_INTERVAL_S = 0.05

KUBELET_RESTART_S = (2.0, 3.0)
XID_INTERVAL_S = 0.5
RESET_DELAY_S = (0.1, 0.6)
RELOAD_INTERVAL_S = 5.0
HOLD_S = (0.0, 0.5)
#: After a reload's check, quiet time for the config file watch's own reload to land.
RELOAD_SETTLE_S = 1.0
#: A kubelet restart or reload must be followed by a new registration within this.
REREGISTER_BOUND_S = 5.0
#: After the churn: everything healthy and matching within this.
SETTLE_BOUND_S = 5.0
SAMPLE_INTERVAL_S = 1.0
WARMUP_FRACTION = 0.2
RSS_SLOPE_LIMIT_MIB_PER_MIN = 1.0
#: How far above its warm-up max each count may be once settled.
SLACK = {"fds": 8, "tasks": 20, "threads": 2}
METRICS = ("rss_mib", "fds", "tasks", "threads")


# --- sampling -------------------------------------------------------------------------

def status(pid: int | str, field: str) -> int:
    """A number from ``/proc/<pid>/status`` (``VmRSS`` in KiB, ``Threads``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {field}")


def rss_mib(pid: int | str = "self") -> float:
    return status(pid, "VmRSS") / 1024


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def trio_tasks() -> int:
    count = 0
    root = trio.lowlevel.current_root_task()
    stack = [root] if root is not None else []
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def sample(pid: int | None = None) -> dict[str, float]:
    """This process's figures, or (``pid``) another's, whose trio tasks are not visible."""
    if pid is not None:
        return {"rss_mib": rss_mib(pid), "fds": open_fds(pid), "threads": status(pid, "Threads")}
    return {"rss_mib": rss_mib(), "fds": open_fds(), "tasks": trio_tasks(),
            "threads": threading.active_count()}


def slope_per_minute(times: list[float], values: list[float]) -> float:
    """Least-squares slope of ``values`` over ``times`` (seconds), per minute."""
    n = len(times)
    if n < 2:
        return 0.0
    mt, mv = sum(times) / n, sum(values) / n
    den = sum((t - mt) ** 2 for t in times)
    if not den:
        return 0.0
    return 60 * sum((t - mt) * (v - mv) for t, v in zip(times, values)) / den


# --- the report -----------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    seconds: float
    seed: int
    samples: list[dict[str, float]] = dataclasses.field(default_factory=list)  # with "t"
    settled: dict[str, float] = dataclasses.field(default_factory=dict)
    kubelet_restarts: int = 0
    reloads: int = 0
    reregister_s: list[float] = dataclasses.field(default_factory=list)
    missed: list[str] = dataclasses.field(default_factory=list)  # missed re-registrations
    xids: int = 0
    resets: int = 0
    admitted: int = 0
    rejected: int = 0
    rejections: dict[str, int] = dataclasses.field(default_factory=dict)  # by first words
    stale: list[str] = dataclasses.field(default_factory=list)
    settle_s: float | None = None
    #: With --trace-memory: traced heap growth (KiB) from the warm-up's end to settled,
    #: by owner, and the files that grew most.
    heap_growth_kib: dict[str, float] = dataclasses.field(default_factory=dict)
    heap_top: list[str] = dataclasses.field(default_factory=list)
    #: The RSS slope (MiB/min after the warm-up) above which the run fails.
    rss_slope_limit: float = RSS_SLOPE_LIMIT_MIB_PER_MIN

    def _after_warmup(self) -> list[dict[str, float]]:
        skip = int(len(self.samples) * WARMUP_FRACTION)
        return self.samples[skip:]

    def _warmup(self) -> list[dict[str, float]]:
        skip = max(1, int(len(self.samples) * WARMUP_FRACTION))
        return self.samples[:skip]

    def trends(self) -> dict[str, dict[str, float]]:
        after = self._after_warmup()
        warm = self._warmup()
        out = {}
        for m in METRICS:
            if self.samples and m not in self.samples[0]:
                continue  # trio tasks of a plugin in another process
            out[m] = {
                "slope_per_min": slope_per_minute([s["t"] for s in after], [s[m] for s in after]),
                "max": max((s[m] for s in self.samples), default=0.0),
                "warmup_max": max((s[m] for s in warm), default=0.0),
                "first": self.samples[0][m] if self.samples else 0.0,
                "last": self.samples[-1][m] if self.samples else 0.0,
                "settled": self.settled.get(m, 0.0),
            }
        return out

    def problems(self) -> list[str]:
        out: list[str] = []
        if len(self.samples) < 5:
            out.append(f"only {len(self.samples)} samples")
        trends = self.trends()
        rss = trends["rss_mib"]["slope_per_min"]
        if rss > self.rss_slope_limit:
            out.append(f"RSS grows {rss:.2f} MiB/min after warm-up "
                       f"(limit {self.rss_slope_limit:g})")
        for m, slack in SLACK.items():
            if m not in trends:
                continue
            t = trends[m]
            if t["settled"] > t["warmup_max"] + slack:
                out.append(f"{m}: {t['settled']:g} once settled > warm-up max "
                           f"{t['warmup_max']:g} + {slack}")
        out.extend(f"missed re-registration: {m}" for m in self.missed[:10])
        if not self.kubelet_restarts or not self.reloads:
            out.append(f"too little churn: {self.kubelet_restarts} kubelet restarts, "
                       f"{self.reloads} reloads")
        if not self.admitted:
            out.append("no admission succeeded")
        out.extend(f"stale: {s}" for s in self.stale[:10])
        return out


# --- the node -------------------------------------------------------------------------

def config_document(replicas: int) -> dict[str, object]:
    return {"version": "v1", "sharing": {"timeSlicing": {
        "renameByDefault": True,
        "resources": [{"name": "nvidia.com/gpu", "replicas": replicas}]}}}


@dataclasses.dataclass
class Node:
    """The simulated node served through the CLI's ``serve`` to a fake kubelet."""
    kubelet: FakeKubelet
    config_file: pathlib.Path
    uuids: list[str]  # GPU UUIDs by index
    replicas: int  # what the config file says now
    #: The plugin's process (this one, unless --process).
    pid: int
    #: Injects one fault, a control-socket request ({"op": "xid", "gpu": 3, "xid": 79}).
    inject: Callable[[dict[str, object]], Awaitable[None]]
    #: Sampled in another process: tasks are not counted.
    separate: bool = False

    def expected(self) -> set[str]:
        """The device IDs the current config file asks for (``<uuid>::<n>``)."""
        return {f"{u}::{i}" for u in self.uuids for i in range(self.replicas)}

    def write_config(self, replicas: int) -> None:
        # Replaced in one rename, as a ConfigMap update is: a reader never sees half.
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(config_document(replicas)))
        tmp.replace(self.config_file)
        self.replicas = replicas


async def serve(nursery: trio.Nursery, directory: pathlib.Path) -> Node:
    """The reliability bench's 16-GPU time-sliced node, served by the CLI's plugin and
    ``serve`` (SIGHUP and config-file reloads included); returns once the kubelet holds its table."""
    kubelet = FakeKubelet(directory / "kubelet")
    (directory / "kubelet").mkdir()
    await nursery.start(kubelet.run)
    nvml = SimulatedNVML(rel.SIXTEEN)
    root = directory / "root"
    root.mkdir()
    nvml.write_driver_root(root)

    async def inject(request: dict[str, object]) -> None:
        gpu = request["gpu"]
        assert isinstance(gpu, int)
        if request["op"] == "xid":
            nvml.xid(gpu, 79)
        else:
            nvml.recover(gpu)

    node = Node(kubelet, directory / "config.json", [], REPLICA_COUNTS[0], os.getpid(), inject)
    node.write_config(REPLICA_COUNTS[0])
    args = build_parser().parse_args(["--config-file", str(node.config_file),
                                      "--kubelet-socket", str(kubelet.kubelet_socket)])
    settings = Settings(args, {})
    config, _ = settings.load()
    nvml_node = NvmlNode(nvml, root=root, checks=HealthChecks(),
                         recovery_window=RECOVERY_WINDOW_S, probe_interval=PROBE_INTERVAL_S)
    plugin = GpuPlugin(config, nvml, root=root, node=nvml_node,
                       config_file=settings.config_file, loader=settings.load)
    nursery.start_soon(serve_cli, plugin)
    await kubelet.wait_registered(RESOURCE)
    node.uuids = [g.uuid for g in (await nvml_node.wait_model()).gpus]
    await kubelet.wait_until(lambda: table_ids(node) == node.expected())
    return node


async def serve_process(nursery: trio.Nursery, directory: pathlib.Path) -> tuple[Node, trio.Process]:
    """The same node and configuration, served by ``python -m trio_gpu_plugin`` in a
    process of its own; returns once the kubelet holds its table."""
    kubelet = FakeKubelet(directory / "kubelet")
    (directory / "kubelet").mkdir()
    await nursery.start(kubelet.run)
    node_file = directory / "node.json"
    node_file.write_text(json.dumps({"name": "sixteen", "gpus": [
        {"model": g.name, "numa_node": g.numa_node} for g in rel.SIXTEEN.gpus]}))
    control = directory / "control.sock"

    async def inject(request: dict[str, object]) -> None:
        answer = await send_control(control, request)
        if not answer.get("ok"):
            raise RuntimeError(f"control socket refused {request}: {answer}")

    node = Node(kubelet, directory / "config.json", [], REPLICA_COUNTS[0], 0, inject,
                separate=True)
    node.write_config(REPLICA_COUNTS[0])
    env = {k: v for k, v in os.environ.items()
           if k not in ("SIMULATE", "SIMULATE_CONTROL", "KUBELET_SOCKET", "CONFIG_FILE")}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_gpu_plugin", "--log-level", "error",
         "--simulate", str(node_file), "--simulate-control", str(control),
         "--config-file", str(node.config_file), "--kubelet-socket", str(kubelet.kubelet_socket),
         "--health-probe-interval", str(PROBE_INTERVAL_S),
         "--health-recovery-window", str(RECOVERY_WINDOW_S)],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
    node.pid = process.pid
    await kubelet.wait_registered(RESOURCE, timeout=30)
    answer = await send_control(control, {"op": "list"})
    node.uuids = [g["uuid"] for g in answer["gpus"]]
    await kubelet.wait_until(lambda: table_ids(node) == node.expected())
    return node, process


def accepted(kubelet: FakeKubelet) -> int:
    return sum(1 for r in kubelet.registrations if r.accepted and r.resource_name == RESOURCE)


def table_ids(n: Node) -> set[str]:
    view = n.kubelet.resources.get(RESOURCE)
    return set() if view is None else view.healthy | view.unhealthy


def stale_state(n: Node) -> list[str]:
    """Differences between the kubelet's table and what the config file asks for, all
    healthy."""
    view = n.kubelet.resources.get(RESOURCE)
    if view is None:
        return ["the kubelet has no table"]
    out = []
    if not view.connected:
        out.append("the kubelet's endpoint is not connected")
    want = n.expected()
    if view.unhealthy:
        out.append(f"kubelet table has {len(view.unhealthy)} unhealthy: {sorted(view.unhealthy)[:3]}")
    if view.healthy != want:
        out.append(f"kubelet healthy set ({len(view.healthy)}) != the {len(want)} devices "
                   f"of {n.replicas} replicas: missing {sorted(want - view.healthy)[:3]}, "
                   f"extra {sorted(view.healthy - want)[:3]}")
    if view.allocated:
        out.append(f"{len(view.allocated)} devices still allocated after every release")
    return out


# --- the scenario ---------------------------------------------------------------------

def owner(filename: str) -> str:
    """Whose code allocated a traced block, by the allocating frame's file."""
    if "/trio_gpu_plugin/testing/" in filename:
        return "test kit"
    if "/trio_gpu_plugin/" in filename or filename.startswith("<trio_gpu_plugin"):
        return "plugin"
    if "/bench/" in filename:
        return "bench"
    if "site-packages" in filename:
        return "libraries"
    return "python"


def heap_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot,
                report: Report) -> None:
    stats = after.compare_to(before, "filename")
    growth: dict[str, float] = {}
    for stat in stats:
        name = stat.traceback[0].filename
        growth[owner(name)] = growth.get(owner(name), 0.0) + stat.size_diff / 1024
    report.heap_growth_kib = {k: round(v, 1) for k, v in sorted(growth.items())}
    report.heap_top = [f"{s.traceback[0].filename}: {s.size_diff / 1024:+.1f} KiB "
                       f"({s.count_diff:+d} blocks)" for s in stats[:8]]


async def soak(seconds: float, seed: int = 1, trace_memory: bool = False,
               process: bool = False) -> Report:
    """Run the soak for ``seconds`` of churn in a temporary directory; return the report.
    ``process``: the plugin runs as a process of its own (see the module docstring)."""
    quiet = logging.getLogger("trio_gpu_plugin")
    level = quiet.level
    # Thousands of expected warnings (rejected pods, kubelet gone): keep them out of any
    # log capture, whose growth would otherwise show up as an RSS trend.
    quiet.setLevel(logging.ERROR)
    directory = pathlib.Path(tempfile.mkdtemp(prefix="tgp-soak-", dir="/tmp"))
    try:
        async with trio.open_nursery() as nursery:
            if trace_memory:
                tracemalloc.start(1)
            plugin: trio.Process | None = None
            if process:
                n, plugin = await serve_process(nursery, directory)
            else:
                n = await serve(nursery, directory)
            report = await _soak(n, seconds, random.Random(seed), Report(seconds, seed),
                                 trace_memory)
            if plugin is not None:
                plugin.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    code = await plugin.wait()
                if code != 0:
                    report.stale.append(f"the plugin exited {code} on SIGTERM, not 0")
            nursery.cancel_scope.cancel()
        return report
    finally:
        tracemalloc.stop()
        quiet.setLevel(level)
        shutil.rmtree(directory, ignore_errors=True)


async def _soak(n: Node, seconds: float, rng: random.Random, report: Report,
                trace_memory: bool = False) -> Report:
    kubelet = n.kubelet
    warmed: list[tracemalloc.Snapshot] = []
    reregister = trio.Lock()  # one kubelet restart or reload at a time
    held: set[Admission] = set()
    start = trio.current_time()

    async def churn_once(what: str, action: Callable[[], Awaitable[None]],
                         settled: Callable[[], bool] = lambda: True) -> None:
        async with reregister:
            before = accepted(kubelet)
            at = trio.current_time()
            await action()
            try:
                await kubelet.wait_until(lambda: accepted(kubelet) > before and settled(),
                                         timeout=REREGISTER_BOUND_S)
            except trio.TooSlowError:
                report.missed.append(f"{what} at t={at - start:.1f}s: no registration "
                                     f"within {REREGISTER_BOUND_S:g} s")
                return
            report.reregister_s.append(trio.current_time() - at)

    async def kubelet_restarts() -> None:
        while True:
            await trio.sleep(rng.uniform(*KUBELET_RESTART_S))
            await churn_once("kubelet restart", kubelet.restart)
            report.kubelet_restarts += 1

    async def reloads() -> None:
        async def reload() -> None:
            n.write_config(REPLICA_COUNTS[1] if n.replicas == REPLICA_COUNTS[0]
                           else REPLICA_COUNTS[0])
            os.kill(n.pid, signal.SIGHUP)

        while True:
            await trio.sleep(RELOAD_INTERVAL_S * rng.uniform(0.8, 1.2))
            await churn_once("SIGHUP reload", reload, lambda: table_ids(n) == n.expected())
            # The config file's watch reloads too, a moment later: let that registration
            # land inside this round rather than be credited to the next kubelet restart.
            async with reregister:
                await trio.sleep(RELOAD_SETTLE_S)
            report.reloads += 1

    async def reset_later(index: int, delay: float) -> None:
        await trio.sleep(delay)
        await n.inject({"op": "recover", "gpu": index})
        report.resets += 1

    async def xids(nursery: trio.Nursery) -> None:
        while True:
            await trio.sleep(XID_INTERVAL_S * rng.uniform(0.5, 1.5))
            index = rng.randrange(len(n.uuids))
            await n.inject({"op": "xid", "gpu": index, "xid": 79})
            report.xids += 1
            nursery.start_soon(reset_later, index, rng.uniform(*RESET_DELAY_S))

    async def hold(admission: Admission) -> None:
        try:
            await trio.sleep(rng.uniform(*HOLD_S))
        finally:
            held.discard(admission)
            kubelet.release(admission)

    async def admissions(nursery: trio.Nursery) -> None:
        i = 0
        while True:
            i += 1
            try:
                admission = await kubelet.admit(RESOURCE, rng.randint(1, 4), pod=f"p{i}")
            except AdmissionError as exc:
                report.rejected += 1
                key = " ".join(exc.message.split()[:4])
                report.rejections[key] = report.rejections.get(key, 0) + 1
                await trio.sleep(0.02)
                continue
            report.admitted += 1
            held.add(admission)
            nursery.start_soon(hold, admission)
            await trio.sleep(0.01)

    async def sampler() -> None:
        while True:
            s = sample(n.pid if n.separate else None)
            s["t"] = trio.current_time() - start
            report.samples.append(s)
            if trace_memory and not warmed and s["t"] >= seconds * WARMUP_FRACTION:
                gc.collect()
                warmed.append(tracemalloc.take_snapshot())
            await trio.sleep(SAMPLE_INTERVAL_S)

    async with trio.open_nursery() as churn:
        churn.start_soon(sampler)
        churn.start_soon(kubelet_restarts)
        churn.start_soon(reloads)
        churn.start_soon(xids, churn)
        churn.start_soon(admissions, churn)
        await trio.sleep(seconds)
        # Let an in-flight restart/reload finish its check rather than cancel it mid-way.
        async with reregister:
            churn.cancel_scope.cancel()
    # Cancelling ran each holder's finally: every admission is released.
    for index in range(len(n.uuids)):
        await n.inject({"op": "recover", "gpu": index})
    at = trio.current_time()
    try:
        await kubelet.wait_until(lambda: not stale_state(n), timeout=SETTLE_BOUND_S)
        report.settle_s = trio.current_time() - at
    except trio.TooSlowError:
        report.stale = stale_state(n)
    # A few quiet seconds so transient tasks/fds of the last churn go away, then sample.
    await trio.sleep(2.0)
    if not report.stale:
        report.stale = stale_state(n)  # still right after the quiet spell
    report.settled = sample(n.pid if n.separate else None)
    if warmed:
        gc.collect()
        heap_growth(warmed[0], tracemalloc.take_snapshot(), report)
    return report


# --- CLI ------------------------------------------------------------------------------

def render(report: Report) -> str:
    lines = [rel.environment(),
             (f"soak {report.seconds:g} s, seed {report.seed}: {len(report.samples)} samples; "
             f"{report.kubelet_restarts} kubelet restarts, {report.reloads} reloads, "
             f"{report.xids} XIDs / {report.resets} resets, {report.admitted} admitted / "
             f"{report.rejected} rejected")]
    if report.reregister_s:
        rr = sorted(report.reregister_s)
        lines.append(f"re-registration: p50 {rr[len(rr) // 2] * 1000:.0f} ms, "
                     f"max {rr[-1] * 1000:.0f} ms, missed {len(report.missed)}")
    lines.append(f"rejections: {report.rejections}")
    for m, t in report.trends().items():
        lines.append(f"{m:8} slope {t['slope_per_min']:+.3f}/min  max {t['max']:g}  "
                     f"first {t['first']:g}  warm-up max {t['warmup_max']:g}  "
                     f"last {t['last']:g}  settled {t['settled']:g}")
    lines.append(f"settled in {report.settle_s:.3f} s" if report.settle_s is not None
                 else "did NOT settle")
    if report.heap_growth_kib:
        lines.append("traced heap growth after the warm-up, KiB by owner: "
                     + ", ".join(f"{k} {v:+.1f}" for k, v in report.heap_growth_kib.items()))
        lines.extend(f"  {top}" for top in report.heap_top)
    problems = report.problems()
    lines.append("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1800.0)
    parser.add_argument("--seed", type=int, default=1)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--process", action="store_true",
                      help="run the plugin in a process of its own and sample that one")
    mode.add_argument("--trace-memory", action="store_true",
                      help="attribute heap growth to its owners (slows the run)")
    parser.add_argument("--json", action="store_true", help="also print the report as JSON")
    parser.add_argument("--rss-slope-limit", type=float, default=RSS_SLOPE_LIMIT_MIB_PER_MIN,
                        metavar="MIB_PER_MIN", help="fail above this RSS slope after the "
                        f"warm-up (default {RSS_SLOPE_LIMIT_MIB_PER_MIN:g})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = trio.run(soak, args.seconds, args.seed, args.trace_memory, args.process)
    report.rss_slope_limit = args.rss_slope_limit
    print(render(report))
    print(f"# wall {time.perf_counter() - started:.1f} s")
    if args.json:
        print(json.dumps({**dataclasses.asdict(report), "trends": report.trends(),
                          "problems": report.problems()}))
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
