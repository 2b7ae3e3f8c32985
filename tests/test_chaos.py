"""The chaos bench's scenarios, cut down to CI size (``bench/chaos.py`` runs them in
full): the kubelet killed mid-Allocate and mid-Register, our socket deleted while its
ListAndWatch streams, the socket directory unwritable for a while, NVML hanging in a call.
Each must leave the other resource serving, report the affected devices honestly, log
once per cause and recover within its bound."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import pytest
import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_bench() -> types.ModuleType:
    # bench/ is not a package; load the script by path (it puts bench/ on sys.path itself).
    spec = importlib.util.spec_from_file_location("bench_chaos", ROOT / "bench" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


chaos = load_bench()


async def run(scenario: str, rounds: int) -> object:
    with trio.fail_after(120):  # a hang guard well past every bound checked
        report = await chaos.chaos(rounds=rounds, seed=5, scenarios=(scenario,))
    (outcome,) = report.outcomes
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    assert report.problems() == []
    assert outcome.rounds == rounds and len(outcome.latencies_s) == rounds
    return outcome


async def test_the_kubelet_killed_mid_allocate_then_back_finds_the_plugin_registered() -> None:
    outcome = await run("kill-mid-allocate", 6)
    # Even rounds kill the kubelet the moment the plugin answers Allocate.
    assert outcome.figures["phases"]["plugin answered Allocate, kubelet died before reading it"] >= 1
    assert max(outcome.latencies_s) < chaos.REREGISTER_BOUND_S


async def test_the_kubelet_killed_mid_register_is_registered_with_once_it_is_back() -> None:
    outcome = await run("kill-mid-register", 2)
    assert outcome.figures["registration warnings per round"] == [0, 0]
    assert all(0 < n <= 4 for n in outcome.figures["kubelet-not-answering notes per round"])


async def test_our_socket_deleted_mid_stream_is_served_again_and_the_other_resource_untouched() -> None:
    await run("socket-deleted", 3)


async def test_an_unwritable_socket_directory_is_logged_once_and_served_once_writable() -> None:
    outcome = await run("dir-unwritable", 1)
    assert max(outcome.latencies_s) < chaos.DIR_RECOVER_BOUND_S


async def test_a_gpu_hung_in_nvml_is_unhealthy_alone_while_everything_else_serves() -> None:
    outcome = await run("nvml-hang", 2)  # a whole GPU, then the MIG GPU
    assert max(outcome.latencies_s) < chaos.HANG_DETECT_BOUND_S
    assert all(r < chaos.HANG_RECOVER_BOUND_S for r in outcome.figures["recovery_s"])
    assert set(outcome.figures["admissions during hangs"]) == set(chaos.RESOURCES)
