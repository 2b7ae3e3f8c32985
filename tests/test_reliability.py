"""The reliability bench's scenarios, cut down to CI size: the same checks as
``bench/reliability.py`` on fewer admissions, so a regression in correctness or a
stalled ListAndWatch fails here before anyone runs the full bench."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_bench() -> types.ModuleType:
    # bench/ is not a package; load the script by path (it puts bench/ on sys.path itself
    # for its _stats import).
    spec = importlib.util.spec_from_file_location("bench_reliability", ROOT / "bench" / "reliability.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


reliability = load_bench()


async def test_load_burst_with_health_events_answers_correctly_within_bounds() -> None:
    with trio.fail_after(30):  # a hang guard well past the bounds checked below
        report = await reliability.load(admissions=200, clients=20, seed=7)
    assert report.problems() == []
    assert report.allocated + report.refused == 200 and report.allocated > 0
    assert len(report.latencies_ms) == 200
    assert max(report.latencies_ms) < reliability.ADMISSION_BOUND_S * 1000
    # The XIDs injected during the burst reached the kubelet's table, none stalled.
    assert report.xids > 0 and report.stalls == 0 and report.xid_lag_ms
    assert max(report.xid_lag_ms) < reliability.STALL_BOUND_S * 1000
    assert report.updates > 0 and report.recovered


def test_expected_visible_devices_are_the_gpus_in_order_once_each() -> None:
    assert reliability.expected_visible(["GPU-b::3", "GPU-a::0", "GPU-b::1"]) == "GPU-b,GPU-a"


async def test_sigterm_under_load_exits_0_quickly_and_sigkill_then_restart_recovers() -> None:
    with trio.fail_after(60):
        report = await reliability.shutdown(rounds=2, clients=10)
    assert report.problems() == []
    assert report.term_codes == [0, 0, 0] and report.sockets_left == 0
    assert max(report.term_exit_s) < reliability.SHUTDOWN_BOUND_S
    assert report.admissions_during > 0  # it was under load when told to stop
    assert report.stale_after_kill == 1  # SIGKILL left the socket; the restart replaced it
    assert report.restart_register_s[0] < reliability.RESTART_BOUND_S
