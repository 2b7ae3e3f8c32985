"""The command line and the whole plugin as a process: signals, the demo, bad flags, and
a grpcio kubelet in another process checking the wire."""

from __future__ import annotations

import functools
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
from trio_gpu_plugin._cli import PRESET_NAMES, watch_config_file
from trio_gpu_plugin._demo import run_demo
from trio_gpu_plugin.testing import FakeKubelet, SimulatedDeviceSource

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
HANG_GUARD = 20.0
# Far beyond the hang guard: a change seen in time was seen through inotify, not a poll.
NEVER = 3600.0


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
            while b"NVML unavailable" not in output:  # one WARNING; the retries are at debug level
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
        lines: list[str] = []
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


# --- config file changes and reloads -------------------------------------------------

async def watch_reloads(nursery: trio.Nursery, path: pathlib.Path
                        ) -> trio.MemoryReceiveChannel[tuple[str, bool]]:
    """watch_config_file on ``path`` with the safety-net poll pushed out past the hang
    guard; each reload it asks for arrives as ``(reason, always)``."""
    send, receive = trio.open_memory_channel[tuple[str, bool]](16)

    async def reload(reason: str, *, always: bool = True) -> None:
        await send.send((reason, always))

    await nursery.start(functools.partial(watch_config_file, str(path), reload,
                                          poll_interval=NEVER, use_inotify=True))
    return receive


async def next_reload(reloads: trio.MemoryReceiveChannel[tuple[str, bool]]) -> tuple[str, bool]:
    with trio.fail_after(HANG_GUARD):
        return await reloads.receive()


async def test_a_config_file_edited_in_place_reloads_without_waiting_for_the_poll(
        nursery: trio.Nursery, tmp_path: pathlib.Path) -> None:
    live = tmp_path / "live" / "config.yaml"
    live.parent.mkdir()
    live.write_text("version: v1\n")
    new = tmp_path / "new.yaml"  # not in the watched directory: only the copy can wake it
    new.write_text("version: v1\nflags:\n  migStrategy: single\n")
    inode = live.stat().st_ino
    await trio.sleep(0.05)  # ctime's clock may tick only every few ms; edits come later
    reloads = await watch_reloads(nursery, live)
    with open(live, "a") as stream:  # echo ... >> live.yaml
        stream.write("flags:\n  migStrategy: mixed\n")
    # A file change asks for a reload that skips an unchanged configuration.
    assert await next_reload(reloads) == (f"config file {live} changed", False)
    shutil.copyfile(new, live)  # cp new.yaml live.yaml
    assert await next_reload(reloads) == (f"config file {live} changed", False)
    assert live.stat().st_ino == inode, "both edits were in place"


async def test_a_configmap_update_reloads_before_the_old_files_are_removed(
        nursery: trio.Nursery, tmp_path: pathlib.Path) -> None:
    # The kubelet's AtomicWriter: a new timestamped directory, the ..data symlink swapped
    # by rename, the old directory removed afterwards (here: never), while config.yaml
    # stays a symlink to ..data/config.yaml throughout.
    mount = tmp_path / "etc-config"
    mount.mkdir()

    def publish(version: str, text: str) -> None:
        files = mount / f"..{version}"
        files.mkdir()
        (files / "config.yaml").write_text(text)
        (mount / "..data_tmp").symlink_to(files.name)
        (mount / "..data_tmp").rename(mount / "..data")

    publish("2024_01", "version: v1\n")
    (mount / "config.yaml").symlink_to("..data/config.yaml")
    reloads = await watch_reloads(nursery, mount / "config.yaml")
    publish("2024_02", "version: v1\nflags:\n  migStrategy: mixed\n")
    assert await next_reload(reloads) == (f"config file {mount / 'config.yaml'} changed", False)
    assert (mount / "..2024_01" / "config.yaml").exists()


async def read_stderr_until(process: trio.Process, output: bytearray, text: bytes) -> None:
    """Read the process's stderr into ``output`` until ``text`` is in it."""
    assert process.stderr is not None
    with trio.fail_after(HANG_GUARD):
        while text not in output:
            chunk = await process.stderr.receive_some()
            assert chunk, f"stderr closed before {text!r}: {output.decode()}"
            output += chunk


async def test_sighup_then_the_same_content_written_reloads_once(
        fake_kubelet: FakeKubelet, socket_dir: pathlib.Path) -> None:
    # A config-manager writes the file and signals; the file event that follows finds
    # what SIGHUP already loaded and reloads nothing.
    config = socket_dir / "config.yaml"
    content = "version: v1\nflags:\n  migStrategy: none\n"
    config.write_text(content)
    process = await start_cli(fake_kubelet, "--simulate", "pcie-4", "--config-file", str(config))
    output = bytearray()
    try:
        await fake_kubelet.wait_registered(GPU, timeout=HANG_GUARD)
        process.send_signal(signal.SIGHUP)
        await read_stderr_until(process, output, b"SIGHUP: configuration reloaded")
        await fake_kubelet.wait_registered(GPU, count=2, timeout=HANG_GUARD)
        config.write_text(content)
        await read_stderr_until(process, output, b"configuration unchanged")
        process.send_signal(signal.SIGTERM)
        assert await wait_exit(process) == 0
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some():
            output += chunk
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()
    text = output.decode()
    assert text.count("configuration reloaded") == 1, text
    assert f"config file {config} changed: configuration unchanged; nothing to reload" in text
    assert len([r for r in fake_kubelet.registrations if r.resource_name == GPU]) == 2


# --- the program's names, and its help ------------------------------------------------

def run_as(name: str, directory: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI from a console script called ``name``, as pip installs one."""
    script = directory / name
    script.write_text("import sys\nfrom trio_gpu_plugin._cli import main\nsys.exit(main())\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("SIMULATE", "LOG_LEVEL")}
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=clean)


def test_as_nvidia_device_plugin_it_takes_the_same_flags_and_says_its_name(
        tmp_path: pathlib.Path) -> None:
    # NVIDIA's Helm chart runs command: ["nvidia-device-plugin"].
    ours = run_as("trio-gpu-plugin", tmp_path, "--help")
    theirs = run_as("nvidia-device-plugin", tmp_path, "--help")
    assert ours.returncode == theirs.returncode == 0
    assert theirs.stdout.startswith("usage: nvidia-device-plugin ")
    # The usage block wraps differently for a longer name; everything after it is equal.
    assert theirs.stdout.split("\n\n", 1)[1] == ours.stdout.split("\n\n", 1)[1]
    assert re.findall(r"--[\w-]+", theirs.stdout) == re.findall(r"--[\w-]+", ours.stdout)
    result = run_as("nvidia-device-plugin", tmp_path, "--simulate", "pcie-4",
                    "--mig-strategy=none", "--fail-on-init-error=true",
                    "--device-list-strategy", "envvar", "inspect", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["resources"][0]["devices"]) == 4
    result = run_as("nvidia-device-plugin", tmp_path, "--mig-strategy", "sideways")
    assert result.returncode == 2
    assert "nvidia-device-plugin: error: argument --mig-strategy" in result.stderr
    result = run_as("nvidia-device-plugin", tmp_path, "--simulate", "pcie-4",
                    "--config-file", str(tmp_path / "absent.yaml"))
    assert result.returncode == 1
    assert result.stderr.startswith("nvidia-device-plugin: error: config file ")


def test_help_lists_the_simulate_presets() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    # argparse wraps help text; the names are what matter.
    simulate_help = " ".join(result.stdout.split("\n  --simulate PRESET|FILE", 1)[1]
                             .split("\n  --simulate-control", 1)[0].split())
    assert f"presets: {', '.join(PRESET_NAMES)}" in simulate_help


def test_serving_flags_work_on_either_side_of_inspect() -> None:
    after = run_cli("inspect", "--simulate", "a100-mig", "--mig-strategy", "mixed", "--json")
    before = run_cli("--simulate", "a100-mig", "--mig-strategy", "mixed", "inspect", "--json")
    assert after.returncode == before.returncode == 0, (after.stderr, before.stderr)
    assert json.loads(after.stdout) == json.loads(before.stdout)
    assert any("mig-" in r["name"] for r in json.loads(after.stdout)["resources"])
    # Given on both sides, the later one counts, as a repeated flag does.
    both = run_cli("--simulate", "dgx-1", "inspect", "--simulate", "pcie-4", "--json")
    assert both.returncode == 0 and len(json.loads(both.stdout)["gpus"]) == 4
