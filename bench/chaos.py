"""Chaos: the kubelet killed mid-call, our socket deleted, the directory unwritable, NVML hung.

The reliability issue's chaos item, against the configured plugin in ONE process, on a
4-GPU simulated node split by the ``mixed`` MIG strategy into two resources:
``nvidia.com/gpu`` (GPUs 1-3, whole) and ``nvidia.com/mig-1g.5gb`` (GPU 0's seven
slices), registered with the test kit's FakeKubelet.  Each scenario runs ``--rounds``
times; every round checks that the plugin

* keeps its other resources serving (their ListAndWatch stream never ends, they are not
  registered again, admissions to them go on),
* reports the affected devices honestly (the kubelet's table shows exactly them
  Unhealthy, or the resource gone while it cannot be served),
* logs once per cause (counted from the plugin's own log records), and
* recovers, within a stated bound, once the cause goes away.

Scenarios:

``kill-mid-allocate``
    An admission (GetPreferredAllocation + Allocate) is started and the kubelet is killed
    (``FakeKubelet.kill``: every connection drops, ``kubelet.sock`` stays behind): in even
    rounds the moment the plugin has answered Allocate (its answer then meets a dead
    connection), in odd rounds after a random number of scheduler ticks, so it also dies
    before the calls, between them, and after.  Then a new kubelet starts.
``kill-mid-register``
    The kubelet restarts and is killed inside the first Register it gets (after dialling
    the plugin back, before answering); the plugin's Register fails, it retries against
    the dead socket; then a new kubelet starts.
``socket-deleted``
    ``nvidia.com/gpu``'s socket file is deleted while its ListAndWatch streams.
``dir-unwritable``
    The socket directory is made unwritable (``chattr +i`` as root, where mode bits do not
    stop root; ``chmod 0555`` otherwise) and the plugin is told to serve again (what SIGHUP
    does), so it can neither remove its old sockets nor bind new ones; after
    ``UNWRITABLE_S`` the directory is writable again.
``nvml-hang``
    Every NVML call naming one GPU blocks (``SimulatedNVML.hang``), alternately a whole
    GPU of ``nvidia.com/gpu`` and the MIG GPU; admissions to both resources go on during
    the hang; then the GPU answers again.

After all scenarios: both resources registered, the kubelet's tables equal to what the
plugin publishes and all healthy, no ERROR logged, trio tasks back to their count before,
no NVML thread left blocked, the NVML thread limiter back to its size.

Run from the repository root: ``python bench/chaos.py [--rounds N] [--seed N]
[--json]``; exits 1 on any problem.  ``bench/reliability.py chaos`` runs the same.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import reliability as rel  # noqa: E402

from trio_gpu_plugin._nvml_sim import SimGpuSpec, SimNodeSpec  # noqa: E402
from trio_gpu_plugin._observe import Observer  # noqa: E402
from trio_gpu_plugin._runtime import SERVE_RETRY_CAP  # noqa: E402
from trio_gpu_plugin.testing import FakeKubelet  # noqa: E402
from trio_gpu_plugin.testing._fake_kubelet import AdmissionError  # noqa: E402

GPU = "nvidia.com/gpu"
MIG = "nvidia.com/mig-1g.5gb"
RESOURCES = (GPU, MIG)
A100 = "NVIDIA A100-SXM4-40GB"
NODE = SimNodeSpec(name="chaos", gpus=(
    SimGpuSpec(name=A100, numa_node=0, mig=("1g.5gb",) * 7),
    *(SimGpuSpec(name=A100, numa_node=i // 2) for i in range(1, 4))))
CONFIG = {"version": "v1", "flags": {"migStrategy": "mixed"}}
MIG_GPU = 0  # the GPU whose slices are nvidia.com/mig-1g.5gb

RECOVERY_WINDOW_S = 0.3
PROBE_INTERVAL_S = 0.05
#: An NVML call not returned after this is hung (the plugin's default is 10 s).
CALL_TIMEOUT_S = 0.5
#: Once the cause is gone (a new kubelet, the socket deleted), registered again within.
REREGISTER_BOUND_S = 2.0
#: The directory writable again: serving and registered within one capped retry delay.
DIR_RECOVER_BOUND_S = SERVE_RETRY_CAP + 1.0
#: A hung GPU shows Unhealthy in the kubelet's table within this.
HANG_DETECT_BOUND_S = CALL_TIMEOUT_S + PROBE_INTERVAL_S + 1.0
#: The GPU answering again: healthy in the table within this (window + probes, slack).
HANG_RECOVER_BOUND_S = RECOVERY_WINDOW_S + 1.5
UNWRITABLE_S = 2.0
HANG_S = 2.0
#: Trio tasks may be this many above the count before the scenarios once all is quiet.
TASK_SLACK = 10
SCENARIOS = ("kill-mid-allocate", "kill-mid-register", "socket-deleted", "dir-unwritable",
             "nvml-hang")


# --- what the plugin says ------------------------------------------------------------------

class Calls(Observer):
    """Counts the DevicePlugin calls the plugin answered, by method."""

    def __init__(self) -> None:
        self.answered: Counter[str] = Counter()
        #: Called (once) the moment the plugin has answered an Allocate.
        self.on_allocate: Callable[[], None] | None = None

    def rpc(self, method: str, resource: str, seconds: float, ok: bool) -> None:
        self.answered[method] += 1
        if method == "Allocate" and self.on_allocate is not None:
            hook, self.on_allocate = self.on_allocate, None
            hook()


class Records(logging.Handler):
    """The plugin's own log records (not the test kit's), kept for counting."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("trio_gpu_plugin.testing"):
            self.records.append(record)

    def since(self, mark: int, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records[mark:] if r.levelno >= level]


@contextlib.contextmanager
def captured() -> Iterator[Records]:
    logger = logging.getLogger("trio_gpu_plugin")
    records = Records()
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # counted here, not printed
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


# --- the node -------------------------------------------------------------------------------

@dataclasses.dataclass
class Chaos:
    served: rel.Served
    calls: Calls
    logs: Records
    directory: pathlib.Path
    rng: random.Random

    @property
    def kubelet(self) -> FakeKubelet:
        return self.served.kubelet


@dataclasses.dataclass
class Outcome:
    """One scenario's rounds: its figures and, if it failed, why."""
    scenario: str
    rounds: int = 0
    latencies_s: list[float] = dataclasses.field(default_factory=list)
    figures: dict[str, object] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    skipped: str = ""


def accepted(kubelet: FakeKubelet, resource: str) -> int:
    return sum(1 for r in kubelet.registrations if r.accepted and r.resource_name == resource)


def stream_ends(kubelet: FakeKubelet, resource: str) -> int:
    return sum(1 for e in kubelet.stream_ends if e.resource_name == resource)


def table_problems(c: Chaos) -> list[str]:
    """Differences between each kubelet table and what the plugin publishes."""
    out = []
    for name in RESOURCES:
        view = c.kubelet.resources.get(name)
        published = c.served.plugin.services[name].devices
        if view is None or not view.connected:
            out.append(f"{name}: not connected to the kubelet")
            continue
        healthy = {i for i, d in published.items() if d.healthy}
        if (view.healthy, view.unhealthy) != (healthy, set(published) - healthy):
            out.append(f"{name}: kubelet table ({len(view.healthy)} healthy, "
                       f"{len(view.unhealthy)} unhealthy) differs from the plugin's "
                       f"({len(healthy)} healthy of {len(published)})")
    return out


async def registered_again(c: Chaos, resources: tuple[str, ...], before: dict[str, int],
                           timeout: float) -> float | None:
    """Seconds until every resource has a new accepted registration and a connected
    table; None if not within ``timeout``."""
    kubelet = c.kubelet
    at = trio.current_time()
    try:
        for resource in resources:
            # A new registration and its first ListAndWatch message (the table is back).
            await kubelet.wait_registered(resource, count=before[resource] + 1,
                                          timeout=max(at + timeout - trio.current_time(), 0.001))
    except trio.TooSlowError:
        return None
    return trio.current_time() - at


def count_round(out: Outcome, i: int, took: float | None, missed: str) -> bool:
    """Count round ``i``: its recovery time, or (``took`` None) the problem ``missed``."""
    out.rounds += 1
    if took is None:
        out.problems.append(f"round {i}: {missed}")
        return False
    out.latencies_s.append(took)
    return True


async def new_kubelet(c: Chaos, out: Outcome, i: int) -> bool:
    """Start a new kubelet and count the round: whether both resources were registered
    with it again within the bound (the time taken is recorded)."""
    before = {r: accepted(c.kubelet, r) for r in RESOURCES}
    await c.kubelet.restart()
    took = await registered_again(c, RESOURCES, before, REREGISTER_BOUND_S)
    return count_round(out, i, took, f"not registered again within {REREGISTER_BOUND_S:g} s")


def no_errors(c: Chaos, out: Outcome, i: int, mark: int) -> None:
    errors = c.logs.since(mark, logging.ERROR)
    if errors:
        out.problems.append(f"round {i}: ERROR logged: {errors[:2]}")


async def admit_and_release(c: Chaos, resource: str, pod: str) -> None:
    admission = await c.kubelet.admit(resource, 1, pod=pod)
    c.kubelet.release(admission)


# --- scenarios ------------------------------------------------------------------------------

async def kill_mid_allocate(c: Chaos, rounds: int) -> Outcome:
    out = Outcome("kill-mid-allocate")
    phases: Counter[str] = Counter()
    kubelet = c.kubelet
    for i in range(rounds):
        resource = RESOURCES[i % 2]
        answered = c.calls.answered["Allocate"]
        result: list[object] = []

        async def admit(resource: str = resource, index: int = i,
                        result: list[object] = result) -> None:
            try:
                result.append(await kubelet.admit(resource, 1, pod=f"chaos-{index}"))
            except AdmissionError as exc:
                result.append(exc)

        async with trio.open_nursery() as nursery:
            if i % 2 == 0:
                c.calls.on_allocate = kubelet.kill_now
                await admit()
            else:
                nursery.start_soon(admit)
                for _ in range(c.rng.randrange(0, 60)):
                    await trio.lowlevel.checkpoint()
                await kubelet.kill()
        if not isinstance(result[0], AdmissionError):
            phases["after the answer"] += 1
            kubelet.release(result[0])  # type: ignore[arg-type]
        elif c.calls.answered["Allocate"] > answered:
            phases["plugin answered Allocate, kubelet died before reading it"] += 1
        else:
            phases["before Allocate was answered"] += 1
        mark = len(c.logs.records)
        await trio.sleep(0.05)  # dead for a moment: the plugin sees only dropped connections
        if not await new_kubelet(c, out, i):
            continue
        for resource_ in RESOURCES:
            await admit_and_release(c, resource_, f"after-{i}")
        no_errors(c, out, i, mark)
    out.figures["phases"] = dict(phases)
    if not phases["plugin answered Allocate, kubelet died before reading it"]:
        out.problems.append("no round killed the kubelet while the plugin answered Allocate; "
                            "more rounds needed")
    return out


async def kill_mid_register(c: Chaos, rounds: int) -> Outcome:
    out = Outcome("kill-mid-register")
    kubelet = c.kubelet
    warnings: list[int] = []
    notes: list[int] = []
    for i in range(rounds):
        mark = len(c.logs.records)
        kubelet.kill_during_next_register()
        total = len(kubelet.registrations)
        await kubelet.restart()
        # The first Register is recorded by the kubelet, then it dies without answering.
        await kubelet.wait_until(lambda: len(kubelet.registrations) > total)  # noqa: B023
        await trio.sleep(0.5)  # the plugin's Register failed; it retries on the dead socket
        if not await new_kubelet(c, out, i):
            continue
        failed = [m for m in c.logs.since(mark) if "registration with the kubelet failed" in m]
        warnings.append(len(failed))
        # A kubelet back within moments is a restart, not a failure: the dropped call and
        # the dead socket's refusals are INFO, and a WARNING only after KUBELET_GONE_GRACE.
        noted = [m for m in c.logs.since(mark, logging.INFO)
                 if "does not answer" in m and "probably restarting" in m]
        notes.append(len(noted))
        if failed:
            out.problems.append(f"round {i}: a kubelet back within moments was warned about: "
                                f"{failed}")
        # Per resource at most two causes: the connection dropping mid-call, then the
        # dead socket refusing; never a line per retry.
        causes = Counter(m.split(":")[0] for m in noted)
        if any(n > 2 for n in causes.values()) or len(set(noted)) != len(noted):
            out.problems.append(f"round {i}: the kubelet not answering was logged more than "
                                f"once per cause: {noted}")
        no_errors(c, out, i, mark)
    out.figures["registration warnings per round"] = warnings
    out.figures["kubelet-not-answering notes per round"] = notes
    return out


async def socket_deleted(c: Chaos, rounds: int) -> Outcome:
    out = Outcome("socket-deleted")
    kubelet = c.kubelet
    for i in range(rounds):
        mark = len(c.logs.records)
        mig_ends, mig_accepted = stream_ends(kubelet, MIG), accepted(kubelet, MIG)
        before = {GPU: accepted(kubelet, GPU)}
        os.unlink(kubelet.resources[GPU].endpoint)
        took = await registered_again(c, (GPU,), before, REREGISTER_BOUND_S)
        if not count_round(out, i, took, f"{GPU} not serving and registered again within "
                                         f"{REREGISTER_BOUND_S:g} s"):
            continue
        await admit_and_release(c, GPU, f"deleted-{i}")
        await admit_and_release(c, MIG, f"deleted-{i}")
        if (stream_ends(kubelet, MIG), accepted(kubelet, MIG)) != (mig_ends, mig_accepted):
            out.problems.append(f"round {i}: {MIG} was disturbed (its stream ended or it "
                                "registered again)")
        said = [m for m in c.logs.since(mark, logging.INFO) if "was removed" in m]
        if len(said) != 1:
            out.problems.append(f"round {i}: the removal logged {len(said)} times: {said}")
    return out


@contextlib.contextmanager
def unwritable(directory: pathlib.Path) -> Iterator[str]:
    """Make ``directory`` unwritable for this process; yields how (empty: cannot here)."""
    if os.geteuid() != 0:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
        try:
            yield "chmod 0555"
        finally:
            directory.chmod(mode)
        return
    chattr = shutil.which("chattr")
    ok = chattr is not None and subprocess.run(
        [chattr, "+i", str(directory)], capture_output=True, check=False).returncode == 0
    if not ok:
        yield ""
        return
    try:
        yield "chattr +i"
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)  # type: ignore[list-item]


async def dir_unwritable(c: Chaos, rounds: int) -> Outcome:
    out = Outcome("dir-unwritable")
    kubelet = c.kubelet
    for i in range(rounds):
        mark = len(c.logs.records)
        before = {r: accepted(kubelet, r) for r in RESOURCES}
        with unwritable(kubelet.socket_dir) as how:
            if not how:
                out.skipped = "cannot make a directory unwritable here (root without chattr)"
                return out
            out.figures["how"] = how
            c.served.plugin.restart("SIGHUP")
            await trio.sleep(UNWRITABLE_S)
            # Honest: while it cannot serve, the kubelet has no endpoint for either.
            connected = [r for r in RESOURCES if kubelet.resources[r].connected]
            if connected:
                out.problems.append(f"round {i}: still connected while unservable: {connected}")
            failures = [m for m in c.logs.since(mark) if "cannot serve" in m]
        took = await registered_again(c, RESOURCES, before, DIR_RECOVER_BOUND_S)
        if not count_round(out, i, took, f"not serving and registered within "
                                         f"{DIR_RECOVER_BOUND_S:g} s of the directory being writable"):
            continue
        per_resource = Counter(m.split(":")[0] for m in failures)
        if sorted(per_resource.values()) != [1] * len(RESOURCES):
            out.problems.append(f"round {i}: 'cannot serve' logged {dict(per_resource)} times "
                                f"per resource, want once each: {failures}")
        again = [m for m in c.logs.since(mark, logging.INFO) if "again (it had failed" in m]
        if len(again) != len(RESOURCES):
            out.problems.append(f"round {i}: recovery logged {len(again)} times: {again}")
        for resource in RESOURCES:
            await admit_and_release(c, resource, f"writable-{i}")
    return out


async def nvml_hang(c: Chaos, rounds: int) -> Outcome:
    out = Outcome("nvml-hang")
    kubelet, nvml = c.kubelet, c.served.nvml
    recoveries: list[float] = []
    admitted: Counter[str] = Counter()
    for i in range(rounds):
        index = 2 if i % 2 == 0 else MIG_GPU
        hit, spared = (GPU, MIG) if index != MIG_GPU else (MIG, GPU)
        uuid = c.served.uuids[index]
        victims = set(c.served.plugin.services[hit].devices) if hit == MIG else {uuid}
        mark = len(c.logs.records)
        spared_ends, spared_accepted = stream_ends(kubelet, spared), accepted(kubelet, spared)
        nvml.hang(index)
        try:
            at = trio.current_time()
            try:
                await kubelet.wait_until(lambda: kubelet.resources[hit].unhealthy == victims,  # noqa: B023
                                         timeout=HANG_DETECT_BOUND_S)
                out.latencies_s.append(trio.current_time() - at)
            except trio.TooSlowError:
                out.problems.append(f"round {i}: GPU {index} hung, but {hit}'s table shows "
                                    f"{sorted(kubelet.resources[hit].unhealthy)} unhealthy "
                                    f"after {HANG_DETECT_BOUND_S:g} s, want {sorted(victims)}")
            # Everything else keeps serving: admissions to both resources go on.
            until = trio.current_time() + HANG_S
            n = 0
            while trio.current_time() < until:
                n += 1
                for resource in RESOURCES:
                    if resource == hit and hit == MIG:
                        continue  # every MIG slice is on the hung GPU
                    try:
                        await admit_and_release(c, resource, f"hang-{i}-{n}")
                        admitted[resource] += 1
                    except AdmissionError as exc:
                        out.problems.append(f"round {i}: admission to {resource} failed "
                                            f"during the hang: {exc.message}")
                await trio.sleep(0.05)
            if kubelet.resources[spared].unhealthy:
                out.problems.append(f"round {i}: {spared} has unhealthy devices though its "
                                    "GPUs answer")
            if kubelet.resources[hit].unhealthy != victims:
                out.problems.append(f"round {i}: {hit}'s unhealthy set changed during the hang")
        finally:
            nvml.unhang(index)
        at = trio.current_time()
        try:
            await kubelet.wait_until(lambda: not kubelet.resources[hit].unhealthy,  # noqa: B023
                                     timeout=HANG_RECOVER_BOUND_S)
            recoveries.append(trio.current_time() - at)
        except trio.TooSlowError:
            out.problems.append(f"round {i}: GPU {index} answers again but is not healthy "
                                f"within {HANG_RECOVER_BOUND_S:g} s")
        out.rounds += 1
        if (stream_ends(kubelet, spared), accepted(kubelet, spared)) != (spared_ends, spared_accepted):
            out.problems.append(f"round {i}: {spared} was disturbed (stream ended or registered "
                                "again)")
        # Once per cause: one line for the hang, and the resource's own line for the
        # devices it reports Unhealthy (as for any health change), nothing per probe.
        said = [m for m in c.logs.since(mark) if uuid in m]
        hang_lines = [m for m in said if "has not returned" in m]
        if len(hang_lines) != 1 or len(said) > 2:
            out.problems.append(f"round {i}: the hang of GPU {index} logged as {said}, want "
                                "one warning for the hang")
    out.figures["recovery_s"] = [round(r, 3) for r in recoveries]
    out.figures["admissions during hangs"] = dict(admitted)
    return out


RUNNERS: dict[str, Callable[[Chaos, int], Awaitable[Outcome]]] = {
    "kill-mid-allocate": kill_mid_allocate,
    "kill-mid-register": kill_mid_register,
    "socket-deleted": socket_deleted,
    "dir-unwritable": dir_unwritable,
    "nvml-hang": nvml_hang,
}


# --- the run --------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    rounds: int
    seed: int
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    final: list[str] = dataclasses.field(default_factory=list)
    tasks_before: int = 0
    tasks_after: int = 0

    def problems(self) -> list[str]:
        out = [f"{o.scenario}: {p}" for o in self.outcomes for p in o.problems]
        return out + [f"after the chaos: {p}" for p in self.final]


def trio_tasks() -> int:
    count, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def chaos(rounds: int = 10, seed: int = 1,
                scenarios: tuple[str, ...] = SCENARIOS) -> Report:
    """Run ``scenarios`` ``rounds`` times each, in order, on one served node."""
    report = Report(rounds, seed)
    directory = pathlib.Path(tempfile.mkdtemp(prefix="tgp-chaos-", dir="/tmp"))
    try:
        with captured() as logs:
            async with trio.open_nursery() as nursery:
                calls = Calls()
                served = await rel.serve_node(
                    nursery, directory, NODE, CONFIG, GPU, recovery_window=RECOVERY_WINDOW_S,
                    probe_interval=PROBE_INTERVAL_S, call_timeout=CALL_TIMEOUT_S, observer=calls)
                await served.kubelet.wait_registered(MIG)
                c = Chaos(served, calls, logs, directory, random.Random(seed))
                await trio.sleep(0.2)
                report.tasks_before = trio_tasks()
                for name in scenarios:
                    report.outcomes.append(await RUNNERS[name](c, rounds))
                report.final = await settle(c)
                report.tasks_after = trio_tasks()
                if report.tasks_after > report.tasks_before + TASK_SLACK:
                    report.final.append(f"{report.tasks_after} trio tasks, "
                                        f"{report.tasks_before} before the chaos")
                nursery.cancel_scope.cancel()
    finally:
        # A safety net should a round have died inside unwritable(): rmtree cannot
        # empty an immutable directory.  Quick, and only ever at the very end.
        subprocess.run(["chattr", "-i", str(directory / "kubelet")],  # noqa: ASYNC221
                       capture_output=True, check=False)
        shutil.rmtree(directory, ignore_errors=True)
    return report


async def settle(c: Chaos) -> list[str]:
    """What is wrong once every cause is gone and the node had a moment."""
    try:
        await c.kubelet.wait_until(
            lambda: not table_problems(c) and all(
                not c.kubelet.resources[r].unhealthy for r in RESOURCES), timeout=5.0)
    except trio.TooSlowError:
        pass
    await trio.sleep(0.5)
    out = table_problems(c)
    out += [f"{r}: {len(c.kubelet.resources[r].unhealthy)} unhealthy" for r in RESOURCES
            if c.kubelet.resources[r].unhealthy]
    errors = [r.getMessage() for r in c.logs.records if r.levelno >= logging.ERROR]
    if errors:
        out.append(f"{len(errors)} ERROR record(s): {errors[:3]}")
    if c.served.nvml.blocked:
        out.append(f"{c.served.nvml.blocked} NVML call(s) still blocked")
    if c.served.node.limiter.total_tokens != 2:
        out.append(f"NVML thread limiter has {c.served.node.limiter.total_tokens} tokens, not 2")
    return out


def render(report: Report) -> str:
    lines = [rel.environment(), f"chaos: {report.rounds} round(s) per scenario, seed {report.seed}"]
    for o in report.outcomes:
        if o.skipped:
            lines.append(f"{o.scenario:18} SKIPPED: {o.skipped}")
            continue
        lat = sorted(o.latencies_s)
        figure = (f"p50 {lat[len(lat) // 2] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms"
                  if lat else "no latency measured")
        lines.append(f"{o.scenario:18} {o.rounds} rounds; recovered in {figure}; "
                     f"{json.dumps(o.figures)}; {'ok' if not o.problems else 'FAILED'}")
    lines.append(f"trio tasks {report.tasks_before} before, {report.tasks_after} after")
    problems = report.problems()
    lines.append("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems[:30]))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=10, help="rounds per scenario")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run only this one (repeatable); default all")
    parser.add_argument("--json", action="store_true", help="also print the report as JSON")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    report = trio.run(chaos, args.rounds, args.seed, tuple(args.scenario or SCENARIOS))
    print(render(report))
    print(f"# wall {time.perf_counter() - started:.1f} s")
    if args.json:
        print(json.dumps({**dataclasses.asdict(report), "problems": report.problems()}))
    return 1 if report.problems() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
