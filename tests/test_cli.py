"""The command line and the whole plugin as a process: signals, the demo, bad flags, and
a grpcio kubelet in another process checking the wire."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from trio_gpu_plugin import DevicePlugin, Resource
from trio_gpu_plugin._demo import run_demo
from trio_gpu_plugin.testing import FakeKubelet, SimulatedDeviceSource

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
HANG_GUARD = 20.0


async def start_cli(kubelet: FakeKubelet, *args: str) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_gpu_plugin", "--kubelet-socket", str(kubelet.kubelet_socket),
         *args],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


async def wait_exit(process: trio.Process) -> int:
    with trio.fail_after(HANG_GUARD):
        return await process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_sigterm_or_sigint_stops_the_plugin_removes_its_socket_and_exits_0(
    fake_kubelet: FakeKubelet, signum: int
) -> None:
    process = await start_cli(fake_kubelet, "--simulate", "dgx-a100")
    try:
        await fake_kubelet.wait_registered(GPU, timeout=HANG_GUARD)
        assert (fake_kubelet.socket_dir / "nvidia-gpu.sock").exists()
        process.send_signal(signum)
        assert await wait_exit(process) == 0
        assert not (fake_kubelet.socket_dir / "nvidia-gpu.sock").exists()
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


async def inject_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: run_cli("inject", *args))


async def test_an_injected_xid_shows_at_the_kubelet_and_survives_sighup(
        fake_kubelet: FakeKubelet, socket_dir: pathlib.Path) -> None:
    control = str(socket_dir / "control.sock")
    process = await start_cli(fake_kubelet, "--simulate", "pcie-4", "--simulate-control", control,
                              "--health-recovery-window", "0")
    try:
        await fake_kubelet.wait_registered(GPU, timeout=HANG_GUARD)
        view = fake_kubelet.resources[GPU]
        assert view.capacity == 4 and view.allocatable == 4
        listed = await inject_cli("--control", control, "list")
        assert listed.returncode == 0, listed.stderr
        gpus = json.loads(listed.stdout)["gpus"]
        victim = gpus[2]["uuid"]
        result = await inject_cli("--control", control, "xid", "--gpu", "2", "--xid", "79")
        assert (result.returncode, result.stdout.strip()) == (0, '{"ok": true}'), result.stderr
        await fake_kubelet.wait_until(lambda: fake_kubelet.resources[GPU].unhealthy == {victim})
        # NVIDIA's plugin forgets health when it re-registers (#111); ours does not.
        process.send_signal(signal.SIGHUP)
        await fake_kubelet.wait_registered(GPU, count=2, timeout=HANG_GUARD)
        await trio.sleep(0.2)
        assert fake_kubelet.resources[GPU].unhealthy == {victim}
        process.send_signal(signal.SIGTERM)
        assert await wait_exit(process) == 0
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


async def test_inject_says_what_was_wrong(fake_kubelet: FakeKubelet, socket_dir: pathlib.Path) -> None:
    control = str(socket_dir / "control.sock")
    process = await start_cli(fake_kubelet, "--simulate", "pcie-4", "--simulate-control", control)
    try:
        await fake_kubelet.wait_registered(GPU, timeout=HANG_GUARD)
        result = await inject_cli("--control", control, "xid", "--gpu", "9", "--xid", "79")
        assert result.returncode == 1
        answer = json.loads(result.stdout)
        assert answer["ok"] is False and "9" in answer["error"]
        result = await inject_cli("--control", control, "lost")
        assert result.returncode == 2 and "op lost needs --gpu" in result.stderr
        result = await inject_cli("--control", control, "fail", "--gpu", "1",
                                  "--calls", "nvmlDeviceGetMinor", "--code", "gpu_is_lost")
        assert result.returncode == 1 and "nvmlDeviceGetMinorNumber" in result.stdout
        for args in (("fail", "--gpu", "1", "--calls", "nvmlDeviceGetMinorNumber, nvmlDeviceGetName",
                      "--code", "15"), ("unfail", "--gpu", "1")):
            result = await inject_cli("--control", control, *args)
            assert (result.returncode, result.stdout.strip()) == (0, '{"ok": true}'), result
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()
    result = await inject_cli("--control", str(socket_dir / "nobody.sock"), "list")
    assert result.returncode == 1
    assert "nobody.sock" in result.stderr and "--simulate-control" in result.stderr


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("SIMULATE", "KUBELET_SOCKET", "FAIL_ON_INIT_ERROR", "SIMULATE_CONTROL")}
    return subprocess.run([sys.executable, "-m", "trio_gpu_plugin", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=clean | (env or {}))


NO_GPU = pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                            reason="this machine has an NVIDIA driver")


@NO_GPU
def test_without_nvml_start_up_fails_with_exit_1_and_what_to_check(socket_dir: pathlib.Path) -> None:
    result = run_cli("--kubelet-socket", str(socket_dir / "kubelet.sock"))
    assert result.returncode == 1
    assert "NVML could not start: NVML Shared Library Not Found" in result.stderr
    assert "nvidia-smi" in result.stderr and "--fail-on-init-error=false" in result.stderr


@NO_GPU
async def test_with_fail_on_init_error_false_it_keeps_trying_and_stops_cleanly(
        fake_kubelet: FakeKubelet) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_gpu_plugin", "--kubelet-socket", str(fake_kubelet.kubelet_socket)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "SIMULATE"} | {"FAIL_ON_INIT_ERROR": "false"})
    assert process.stderr is not None
    try:
        output = b""
        with trio.fail_after(HANG_GUARD):
            while output.count(b"NVML unavailable") < 2:
                output += await process.stderr.receive_some()
        assert not fake_kubelet.registrations
        process.send_signal(signal.SIGTERM)
        assert await wait_exit(process) == 0
    finally:
        process.kill()
        await process.wait()
        await process.stderr.aclose()


def test_a_bad_simulate_value_names_it() -> None:
    result = run_cli("--simulate", "no-such-preset")
    assert result.returncode == 2
    assert "'no-such-preset' is neither a preset" in result.stderr


def test_a_bad_simulate_file_names_the_key(socket_dir: pathlib.Path) -> None:
    node = socket_dir / "node.yaml"
    node.write_text("gpus:\n  - model: Tesla T4\n    numa_node: zero\n")
    result = run_cli("--simulate", str(node))
    assert result.returncode == 2
    assert "gpus[0].numa_node" in result.stderr and "'zero'" in result.stderr


@pytest.mark.parametrize(("args", "env", "code", "expected"), [
    # A malformed command line is a usage error (2); a bad value from the environment or
    # the config file stops start-up with 1, as NVIDIA's plugin.
    ((), {"FAIL_ON_INIT_ERROR": "maybe"}, 1,
     "environment variable FAIL_ON_INIT_ERROR: 'maybe' is not a boolean"),
    (("--fail-on-init-error=maybe",), {}, 2, "argument --fail-on-init-error: 'maybe' is not a boolean"),
    (("--health-recovery-window", "-1"), {}, 2, "'-1' must be a finite number of seconds >= 0"),
    (("--health-probe-interval", "0"), {}, 2, "'0' must be more than 0 seconds"),
    ((), {"HEALTH_PROBE_INTERVAL": "soon"}, 1, "HEALTH_PROBE_INTERVAL: 'soon' is not a number"),
    ((), {"MIG_STRATEGY": "sideways"}, 1, "unknown MIG strategy: sideways"),
    (("--device-discovery-strategy", "tegra"), {}, 1, "Tegra (integrated GPU) systems are not supported"),
    (("--simulate-control", "/tmp/x.sock"), {}, 2, "--simulate-control needs --simulate"),
])
def test_bad_flags_and_environment_stop_start_up_naming_them(
        args: tuple[str, ...], env: dict[str, str], code: int, expected: str) -> None:
    result = run_cli(*args, env=env)
    assert result.returncode == code, result.stderr
    assert expected in result.stderr


def test_a_bad_config_file_stops_start_up_naming_the_key(socket_dir: pathlib.Path) -> None:
    config = socket_dir / "config.yaml"
    config.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                      "    - name: nvidia.com/gpu\n      replicas: 1\n")
    result = run_cli("--simulate", "pcie-4", "--config-file", str(config))
    assert result.returncode == 1
    assert "sharing.timeSlicing.resources[0].replicas" in result.stderr
    assert "number of replicas must be >= 2" in result.stderr


def test_a_config_that_does_not_fit_the_node_stops_start_up_with_nvidias_text(
        socket_dir: pathlib.Path) -> None:
    result = run_cli("--simulate", "a100-mig", "--mig-strategy", "single",
                     "--kubelet-socket", str(socket_dir / "kubelet.sock"))
    assert result.returncode == 1
    assert "more than one MIG device type present on node" in result.stderr


def test_demo_runs_with_no_gpu_and_no_kubelet() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    steps = [line[:2] for line in result.stdout.splitlines() if re.match(r"\d\. ", line)]
    assert steps == ["1.", "2.", "3.", "4.", "5.", "6."]
    assert "NVIDIA_VISIBLE_DEVICES=GPU-" in result.stdout
    assert "registered again" in result.stdout


async def test_demo_narrates_each_step() -> None:
    lines: list[str] = []
    assert await run_demo("dgx-a100", lines.append) == 0
    text = "\n".join(lines)
    for expected in ("registration", "device table: 8 devices, 8 healthy", "admission of a 2-GPU pod",
                     "NVML reported XID 79", "7 allocatable of 8", "kubelet restart",
                     "Healthy again", "8 of 8 allocatable"):
        assert expected in text


def test_readme_library_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"<!-- example: library -->\n```python\n(.*?)\n```", readme, flags=re.S)
    result = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "registered: 2 devices, 1 healthy" in result.stdout


def test_readme_nvml_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"<!-- example: nvml -->\n```python\n(.*?)\n```", readme, flags=re.S)
    result = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Tesla V100-SXM2-16GB NUMA 1 NVLinks [1, 1, 2, 2]",
        "XID 79: 7 of 8 allocatable",
        "recovered: 8 of 8 allocatable",
    ]


GRPC_KUBELET = textwrap.dedent("""
    import json, sys, threading
    from concurrent import futures
    import grpc
    from tests import peers

    pb2, pb2_grpc = peers.load()
    directory = sys.argv[1]
    done = threading.Event()
    result = {}

    def admit(endpoint):
        with grpc.insecure_channel("unix://" + directory + "/" + endpoint) as channel:
            stub = pb2_grpc.DevicePluginStub(channel)
            stream = stub.ListAndWatch(pb2.Empty())
            first = next(stream)
            result["devices"] = [[d.ID, d.health, [n.ID for n in d.topology.nodes]] for d in first.devices]
            preferred = stub.GetPreferredAllocation(pb2.PreferredAllocationRequest(container_requests=[
                pb2.ContainerPreferredAllocationRequest(
                    available_deviceIDs=[d.ID for d in first.devices], allocation_size=2)]), timeout=5)
            ids = list(preferred.container_responses[0].deviceIDs)
            allocated = stub.Allocate(pb2.AllocateRequest(container_requests=[
                pb2.ContainerAllocateRequest(devices_ids=ids)]), timeout=5)
            result["allocate"] = {"ids": ids, "envs": dict(allocated.container_responses[0].envs)}
            stream.cancel()
        print(json.dumps(result), flush=True)
        done.set()

    class Registration(pb2_grpc.RegistrationServicer):
        def Register(self, request, context):
            result["register"] = [request.version, request.endpoint, request.resource_name]
            with grpc.insecure_channel("unix://" + directory + "/" + request.endpoint) as channel:
                options = pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(pb2.Empty(), timeout=5)
            result["options"] = [options.pre_start_required, options.get_preferred_allocation_available]
            threading.Thread(target=admit, args=(request.endpoint,), daemon=True).start()
            return pb2.Empty()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb2_grpc.add_RegistrationServicer_to_server(Registration(), server)
    server.add_insecure_port("unix://" + directory + "/kubelet.sock")
    server.start()
    print("ready", flush=True)
    done.wait(30)
    server.stop(0)
""")


async def test_a_grpcio_kubelet_in_another_process_registers_watches_and_allocates(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    kubelet = await trio.lowlevel.open_process(
        [sys.executable, "-c", GRPC_KUBELET, str(socket_dir)], cwd=ROOT, stdout=subprocess.PIPE)
    assert kubelet.stdout is not None
    try:
        output = b""
        with trio.fail_after(HANG_GUARD):
            while b"ready\n" not in output:
                output += await kubelet.stdout.receive_some()
            source = SimulatedDeviceSource.preset("dgx-a100")
            plugin = DevicePlugin([Resource(GPU, source, "nvidia-gpu.sock")],
                                  kubelet_socket=socket_dir / "kubelet.sock")
            await nursery.start(plugin.run)
            while output.count(b"\n") < 2:
                output += await kubelet.stdout.receive_some()
        result = json.loads(output.splitlines()[1])
    finally:
        kubelet.kill()
        await kubelet.wait()
        await kubelet.stdout.aclose()
    assert result["register"] == ["v1beta1", "nvidia-gpu.sock", GPU]
    assert result["options"] == [False, True]
    assert result["devices"] == [[g.uuid, "Healthy", [g.numa_node]] for g in source.gpus]
    assert len(result["allocate"]["ids"]) == 2
    assert result["allocate"]["envs"] == {"NVIDIA_VISIBLE_DEVICES": ",".join(result["allocate"]["ids"])}


def test_json_logs_are_one_object_per_line(socket_dir: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SIMULATE"} | {"LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [sys.executable, "-m", "trio_gpu_plugin", "--simulate", "pcie-4", "--kubelet-socket",
         str(socket_dir / "kubelet.sock")], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        assert process.stderr is not None
        while len(lines) < 5:
            lines.append(process.stderr.readline())
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
    records = [json.loads(line) for line in lines]
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    assert records[0]["message"].startswith("Running with config: {")
    assert any("waiting for the kubelet" in r["message"] for r in records)
