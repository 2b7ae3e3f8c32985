"""The plugin runtime against the fake kubelet: registration, the device table, admission,
restarts in every form, and nothing left behind.

Fixtures ``fake_kubelet`` and ``simulated_node`` come from the test kit's pytest plugin
(the ``pytest11`` entry point), as they would for any embedder.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import trio

from trio_gpu_plugin import (
    DeviceInfo,
    DevicePlugin,
    Resource,
    RpcError,
    StatusCode,
    first_fit,
    open_unix_channel,
)
from trio_gpu_plugin import _runtime
from trio_gpu_plugin._config import ConfigError
from trio_gpu_plugin._watch import Identity, PathWatcher
from trio_gpu_plugin.proto import v1beta1
from trio_gpu_plugin.testing import FakeKubelet, SimulatedDeviceSource

GPU = "nvidia.com/gpu"
HANG_GUARD = 10.0


async def start_plugin(
    nursery: trio.Nursery, kubelet: FakeKubelet, source: SimulatedDeviceSource, **resource: Any
) -> DevicePlugin:
    plugin = DevicePlugin([Resource(GPU, source, "nvidia-gpu.sock", **resource)],
                          kubelet_socket=kubelet.kubelet_socket)
    with trio.fail_after(HANG_GUARD):
        await nursery.start(plugin.run)
    return plugin


def plugin_socket(kubelet: FakeKubelet) -> pathlib.Path:
    return kubelet.socket_dir / "nvidia-gpu.sock"


async def test_registers_and_the_kubelet_sees_every_device_with_its_numa_node(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    plugin = await start_plugin(nursery, fake_kubelet, simulated_node)
    record = await fake_kubelet.wait_registered(GPU)
    assert (record.version, record.endpoint, record.accepted) == ("v1beta1", "nvidia-gpu.sock", True)
    assert record.options == v1beta1.DevicePluginOptions(get_preferred_allocation_available=True)
    view = fake_kubelet.resources[GPU]
    assert view.healthy == {g.uuid for g in simulated_node.gpus}
    assert view.topology == {g.uuid: [g.numa_node] for g in simulated_node.gpus}
    assert plugin.registrations == {GPU: 1}


async def test_health_change_reaches_the_kubelet_and_recovers(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    gpu = simulated_node.gpus[3].uuid
    simulated_node.set_health(gpu, False)
    await fake_kubelet.wait_until(lambda: gpu in fake_kubelet.resources[GPU].unhealthy)
    assert fake_kubelet.resources[GPU].allocatable == 7
    simulated_node.set_health(gpu, True)
    await fake_kubelet.wait_until(lambda: fake_kubelet.resources[GPU].allocatable == 8)


async def watch(path: pathlib.Path, received: list[v1beta1.ListAndWatchResponse],
                count: int) -> None:
    async with open_unix_channel(path) as channel:
        async with channel.server_stream(v1beta1.DEVICE_PLUGIN, "ListAndWatch",
                                         v1beta1.Empty()) as responses:
            async for message in responses:
                received.append(message)
                if len(received) == count:
                    return


async def test_concurrent_watchers_each_get_the_full_list_then_every_change(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    plugin = await start_plugin(nursery, fake_kubelet, simulated_node)
    service = plugin.services[GPU]
    streams: list[list[v1beta1.ListAndWatchResponse]] = [[] for _ in range(5)]
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as watchers:
            for received in streams:
                watchers.start_soon(watch, plugin_socket(fake_kubelet), received, 2)
            # The kubelet's own stream plus our five.
            while service.watchers < 6 or not all(streams):
                await trio.sleep(0.001)
            simulated_node.set_health(simulated_node.gpus[0].uuid, False)
    for first, second in streams:
        assert [d.health for d in first.devices] == ["Healthy"] * 8
        assert [d.health for d in second.devices] == ["Unhealthy"] + ["Healthy"] * 7
    # Watchers that went away cost nothing: only the kubelet's stream is left.
    with trio.fail_after(HANG_GUARD):
        while service.watchers != 1:
            await trio.sleep(0.001)


async def test_a_burst_of_changes_reaches_the_kubelet_as_the_latest_state(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    updates_before = fake_kubelet.resources[GPU].updates
    gpu = simulated_node.gpus[0].uuid
    for i in range(100):  # no checkpoint in between: one burst
        simulated_node.set_health(gpu, i % 2 == 0)
    simulated_node.set_health(gpu, False)
    await fake_kubelet.wait_until(lambda: gpu in fake_kubelet.resources[GPU].unhealthy)
    await trio.testing.wait_all_tasks_blocked()
    assert fake_kubelet.resources[GPU].updates - updates_before <= 2


async def allocate(path: pathlib.Path, *ids: str) -> v1beta1.AllocateResponse:
    async with open_unix_channel(path) as channel:
        return await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate", v1beta1.AllocateRequest(
            container_requests=[v1beta1.ContainerAllocateRequest(devices_ids=list(ids))]))


async def test_allocate_of_an_unknown_device_is_invalid_argument_naming_it(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    await start_plugin(nursery, fake_kubelet, simulated_node)
    with pytest.raises(RpcError) as info:
        await allocate(plugin_socket(fake_kubelet), simulated_node.gpus[0].uuid, "GPU-nope")
    assert info.value.code is StatusCode.INVALID_ARGUMENT
    assert "GPU-nope" in info.value.message and GPU in info.value.message


async def test_allocate_of_an_unhealthy_device_is_failed_precondition_naming_it(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    await start_plugin(nursery, fake_kubelet, simulated_node)
    sick = simulated_node.gpus[5].uuid
    simulated_node.set_health(sick, False)
    with pytest.raises(RpcError) as info:
        await allocate(plugin_socket(fake_kubelet), sick)
    assert info.value.code is StatusCode.FAILED_PRECONDITION
    assert sick in info.value.message
    ok = await allocate(plugin_socket(fake_kubelet), simulated_node.gpus[1].uuid,
                        simulated_node.gpus[1].uuid)  # duplicates collapse
    assert ok.container_responses[0].envs == {"NVIDIA_VISIBLE_DEVICES": simulated_node.gpus[1].uuid}


async def test_admission_asks_for_a_preferred_allocation_and_allocates_it(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    admission = await fake_kubelet.admit(GPU, 2)
    assert admission.preferred is not None and len(admission.preferred) == 2
    assert admission.device_ids == admission.preferred
    assert admission.response.envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(admission.device_ids)
    # The default policy keeps a pod's GPUs on one NUMA node when it can.
    numa = {g.uuid: g.numa_node for g in simulated_node.gpus}
    second = await fake_kubelet.admit(GPU, 3)
    assert len({numa[i] for i in second.device_ids}) >= 1
    assert fake_kubelet.resources[GPU].allocated == set(admission.device_ids + second.device_ids)


async def test_without_a_policy_the_kubelet_is_told_not_to_ask(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    await start_plugin(nursery, fake_kubelet, simulated_node, preferred_allocation=None)
    await fake_kubelet.wait_registered(GPU)
    admission = await fake_kubelet.admit(GPU, 1)
    assert admission.preferred is None
    with pytest.raises(RpcError) as info:
        async with open_unix_channel(plugin_socket(fake_kubelet)) as channel:
            await channel.unary(v1beta1.DEVICE_PLUGIN, "GetPreferredAllocation",
                                v1beta1.PreferredAllocationRequest())
    assert info.value.code is StatusCode.UNIMPLEMENTED


async def test_pre_start_hook_runs_with_the_containers_devices(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    seen: list[list[str]] = []

    async def pre_start(ids: Sequence[str]) -> None:
        seen.append(list(ids))

    await start_plugin(nursery, fake_kubelet, simulated_node, pre_start=pre_start)
    record = await fake_kubelet.wait_registered(GPU)
    assert record.options is not None and record.options.pre_start_required
    admission = await fake_kubelet.admit(GPU, 2)
    await fake_kubelet.pre_start(admission)
    assert seen == [admission.device_ids]


def test_first_fit_keeps_must_include_prefers_its_numa_node_and_never_exceeds_size() -> None:
    devices = [DeviceInfo(f"g{i}", True, (i // 4,)) for i in range(8)]
    assert first_fit(devices, ["g5"], 3) == ["g5", "g4", "g6"]
    assert first_fit(devices, [], 2) == ["g0", "g1"]
    assert first_fit(devices, ["unknown", "g1"], 1) == ["g1"]
    assert first_fit(devices, [], 20) == [f"g{i}" for i in range(8)]


async def test_plugin_started_before_the_kubelet_registers_when_it_appears(
    nursery: trio.Nursery, simulated_node: SimulatedDeviceSource, socket_dir: pathlib.Path
) -> None:
    kubelet = FakeKubelet(socket_dir / "kubelet")
    plugin = DevicePlugin([Resource(GPU, simulated_node, "nvidia-gpu.sock")],
                          kubelet_socket=kubelet.kubelet_socket)
    registered = trio.Event()

    async def run_plugin() -> None:
        await nursery.start(plugin.run)
        registered.set()

    nursery.start_soon(run_plugin)
    await trio.testing.wait_all_tasks_blocked()
    assert not registered.is_set()  # the directory does not even exist yet
    await nursery.start(kubelet.run)
    with trio.fail_after(HANG_GUARD):
        await registered.wait()
    await kubelet.wait_registered(GPU)


async def test_own_socket_deleted_brings_a_fresh_registration(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    plugin = await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    plugin_socket(fake_kubelet).unlink()
    await fake_kubelet.wait_registered(GPU, count=2)
    assert plugin_socket(fake_kubelet).exists()
    with trio.fail_after(HANG_GUARD):
        while plugin.registrations[GPU] != 2:
            await trio.sleep(0.001)
    assert fake_kubelet.resources[GPU].connected


async def test_directory_deleted_and_recreated_brings_a_fresh_registration(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    await fake_kubelet.stop()
    shutil.rmtree(fake_kubelet.socket_dir)
    await trio.sleep(0.05)
    await fake_kubelet.restart()  # recreates the directory and kubelet.sock
    await fake_kubelet.wait_registered(GPU, count=2)
    assert fake_kubelet.resources[GPU].connected


class SeesNothing(PathWatcher):
    """A watcher that misses every change (as if inotify sent nothing and the safety-net
    poll had not come round): the plugin believes it is still registered."""

    async def wait_for_change(self, baseline: Mapping[str, Identity]) -> dict[str, Identity]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_check_looks_now_and_names_all_a_plugin_that_missed_a_kubelet_restart_lacks(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource,
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
) -> None:
    monkeypatch.setattr(_runtime, "PathWatcher", SeesNothing)
    plugin = await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    assert await plugin.check(GPU) == []

    # The restarted kubelet deleted our socket and serves a new kubelet.sock.
    await fake_kubelet.restart()
    with trio.fail_after(HANG_GUARD):
        while plugin.services[GPU].watchers:
            await trio.sleep(0.001)
    path = plugin_socket(fake_kubelet)
    problems = await plugin.check(GPU)
    assert [p.text for p in problems] == [
        f"socket {path} does not answer: UNAVAILABLE: cannot connect to {path}: "
        "[Errno 2] No such file or directory",
        f"no ListAndWatch stream from the kubelet for 0 s: the kubelet is not watching {path}, "
        f"so it has no devices of {GPU} to allocate",
        f"registered with a kubelet that is gone: {fake_kubelet.kubelet_socket} was replaced "
        "(the kubelet restarted) and the plugin has not registered again yet",
    ]
    # The socket is for liveness to fail at once; the rest the runtime repairs itself.
    assert [p.since is None for p in problems] == [True, False, False]

    plugin.restart("test")
    await fake_kubelet.wait_registered(GPU, count=2)
    with trio.fail_after(HANG_GUARD):
        while await plugin.check(GPU):
            await trio.sleep(0.001)


async def test_check_says_why_a_resource_is_not_registered_and_for_how_long(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource,
    autojump_clock: trio.testing.MockClock,
) -> None:
    plugin = await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    await fake_kubelet.stop()  # kubelet.sock removed
    waiting = (f"waiting for the kubelet: {fake_kubelet.kubelet_socket} does not exist")
    with trio.fail_after(HANG_GUARD):
        while [p.text for p in await plugin.check(GPU)] != [
                f"not registered with the kubelet for 0 s: {waiting}"]:
            await trio.sleep(0.001)
    await trio.sleep(42)
    [problem] = await plugin.check(GPU)
    assert problem.text == f"not registered with the kubelet for 42 s: {waiting}"
    assert problem.since is not None and trio.current_time() - problem.since >= 42

    await fake_kubelet.restart()
    await fake_kubelet.wait_registered(GPU, count=2)
    with trio.fail_after(HANG_GUARD):
        while await plugin.check(GPU):
            await trio.sleep(0.001)
    with pytest.raises(KeyError):
        await plugin.check("example.com/other")


class RefusingKubelet(FakeKubelet):
    """Refuses the first ``refusals`` Register calls, as a kubelet with a problem would."""

    def __init__(self, socket_dir: pathlib.Path, refusals: int) -> None:
        super().__init__(socket_dir)
        self.refusals = refusals

    async def _register(self, generation: Any, request: v1beta1.RegisterRequest) -> v1beta1.Empty:
        if self.refusals:
            self.refusals -= 1
            raise RpcError(StatusCode.UNKNOWN, "device manager is not ready")
        return await super()._register(generation, request)


async def test_register_refused_then_accepted_logs_the_reason_once(
    nursery: trio.Nursery, simulated_node: SimulatedDeviceSource, socket_dir: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kubelet = RefusingKubelet(socket_dir, refusals=4)
    await nursery.start(kubelet.run)
    with caplog.at_level(logging.DEBUG, "trio_gpu_plugin.runtime"):
        await start_plugin(nursery, kubelet, simulated_node)
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and "device manager is not ready" in r.getMessage()]
    assert len(warnings) == 1
    assert sum("registration failed again" in r.getMessage() for r in caplog.records) == 3
    await kubelet.wait_registered(GPU)


async def test_restart_ends_every_old_stream_before_registering_again(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    # fake_kubelet reproduces kubernetes#121994: had an old stream outlived the new
    # Register, its end would tear the new registration down.
    assert fake_kubelet.stale_stream_teardown
    plugin = await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    plugin.restart("test")
    second = await fake_kubelet.wait_registered(GPU, count=2)
    await trio.sleep(0.1)
    assert [end.at < second.at for end in fake_kubelet.stream_ends] == [True]
    view = fake_kubelet.resources[GPU]
    assert view.connected and view.allocatable == 8


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
async def test_a_hundred_kubelet_restarts_each_end_registered_and_leak_nothing(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    plugin = await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    await trio.testing.wait_all_tasks_blocked()
    baseline = (open_fds(), count_tasks())
    threads = threading.active_count()
    for restart in range(100):
        await fake_kubelet.restart()
        await fake_kubelet.wait_registered(GPU, count=restart + 2)
    await trio.testing.wait_all_tasks_blocked()
    assert (open_fds(), count_tasks()) == baseline
    # Not equal: an idle worker thread an earlier test left in trio's cache may time out
    # and exit meanwhile; a leak would show as more.
    assert threading.active_count() <= threads
    assert plugin.registrations[GPU] == 101
    accepted = [r for r in fake_kubelet.registrations if r.accepted]
    assert len(accepted) == 101
    assert fake_kubelet.resources[GPU].connected and fake_kubelet.resources[GPU].allocatable == 8


async def test_cancelling_the_plugin_removes_its_socket(
    fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource
) -> None:
    async with trio.open_nursery() as nursery:
        await start_plugin(nursery, fake_kubelet, simulated_node)
        assert plugin_socket(fake_kubelet).exists()
        nursery.cancel_scope.cancel()
    assert not plugin_socket(fake_kubelet).exists()


def test_resource_names_and_socket_names_are_checked() -> None:
    source = SimulatedDeviceSource.preset("single-t4")
    with pytest.raises(ValueError, match="kubernetes.io"):
        Resource("kubernetes.io/gpu", source, "a.sock")
    with pytest.raises(ValueError, match="domain prefix"):
        Resource("gpu", source, "a.sock")
    with pytest.raises(ValueError, match="plain file name"):
        Resource(GPU, source, "../a.sock")
    with pytest.raises(ValueError, match="share a socket_name"):
        DevicePlugin([Resource(GPU, source, "a.sock"), Resource("nvidia.com/mig", source, "a.sock")])


# --- operator edges (issue 14) ----------------------------------------------------------


async def until_logged(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    with trio.fail_after(HANG_GUARD):
        while True:
            for record in caplog.records:
                if text in record.getMessage():
                    return record
            await trio.sleep(0.01)


def runtime_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "trio_gpu_plugin.runtime" and r.levelno >= logging.WARNING]


async def test_a_refusal_from_a_crashed_kubelets_socket_before_its_successor_is_not_a_warning(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    with caplog.at_level(logging.INFO, "trio_gpu_plugin.runtime"):
        # The kubelet crashes (kubelet.sock stays behind, refusing connections); its
        # successor deletes our socket first, and replaces kubelet.sock only after.
        await fake_kubelet.kill()
        plugin_socket(fake_kubelet).unlink()
        refused = await until_logged(caplog, "Connection refused")
        await fake_kubelet.restart()
        await fake_kubelet.wait_registered(GPU, count=2)
    assert refused.levelno == logging.INFO
    assert "does not answer" in refused.getMessage()
    assert f"a warning follows if it does not within {_runtime.KUBELET_GONE_GRACE:g} s" in \
        refused.getMessage()
    assert runtime_warnings(caplog) == []


async def test_a_kubelet_socket_that_keeps_refusing_past_the_bound_is_warned_about_once(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource,
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock,
) -> None:
    plugin = await start_plugin(nursery, fake_kubelet, simulated_node)
    await fake_kubelet.wait_registered(GPU)
    with caplog.at_level(logging.INFO, "trio_gpu_plugin.runtime"):
        await fake_kubelet.kill()  # and no kubelet ever comes back
        plugin_socket(fake_kubelet).unlink()
        await trio.sleep(_runtime.KUBELET_GONE_GRACE / 2)
        assert runtime_warnings(caplog) == []  # within the bound: a restart, probably
        await trio.sleep(_runtime.KUBELET_GONE_GRACE + 120)
    [warning] = runtime_warnings(caplog)
    assert f"{GPU}: registration with the kubelet failed for " in warning
    assert f"cannot connect to {fake_kubelet.kubelet_socket}: [Errno 111] Connection refused" \
        in warning
    [problem] = await plugin.check(GPU)
    assert problem.text.endswith(
        f"registration failed (retrying): UNAVAILABLE: cannot connect to "
        f"{fake_kubelet.kubelet_socket}: [Errno 111] Connection refused")


async def test_a_kubelet_socket_that_is_a_directory_is_refused_at_start_naming_the_flag(
    simulated_node: SimulatedDeviceSource, socket_dir: pathlib.Path,
) -> None:
    # The kubelet's socket directory given for its socket: the plugin would serve in the
    # directory above and be refused by a directory on every Register.
    plugin = DevicePlugin([Resource(GPU, simulated_node, "nvidia-gpu.sock")],
                          kubelet_socket=socket_dir)
    with pytest.raises(ConfigError) as refused:
        await plugin.run()
    assert str(refused.value).startswith(
        f"--kubelet-socket {socket_dir}: is a directory, not a socket path; give the "
        f"kubelet's registration socket, such as {socket_dir / 'kubelet.sock'}")
    assert os.listdir(socket_dir) == []  # nothing served in it
