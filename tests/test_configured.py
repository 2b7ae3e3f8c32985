"""The configured plugin end to end: NVIDIA's config file and flags drive what the fake
kubelet sees and what Allocate answers; SIGHUP and file changes reload safely."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest
import trio

from trio_gpu_plugin._config import resolve_config
from trio_gpu_plugin._configured import NodeSetup
from trio_gpu_plugin._health import HealthChecks
from trio_gpu_plugin._nvml_sim import SimulatedNVML, node_from
from trio_gpu_plugin._nvml_source import NvmlNode
from trio_gpu_plugin._runtime import DevicePlugin
from trio_gpu_plugin.testing import FakeKubelet

ROOT = pathlib.Path(__file__).resolve().parent.parent
HANG_GUARD = 20.0
TIME_SLICING_10 = """\
version: v1
sharing:
  timeSlicing:
    renameByDefault: true
    resources:
    - name: nvidia.com/gpu
      replicas: 10
"""


async def serve_in_process(nursery: trio.Nursery, kubelet: FakeKubelet, root: pathlib.Path,
                           preset: str, cli: dict[str, object], document: object = None
                           ) -> tuple[SimulatedNVML, NvmlNode, NodeSetup]:
    nvml = SimulatedNVML(node_from(preset))
    nvml.write_driver_root(root)
    config, _ = resolve_config(cli, {}, document)
    node = NvmlNode(nvml, root=root, checks=HealthChecks())
    await nursery.start(node.run)
    setup = NodeSetup.read(config, root)
    result = setup.plan(await node.wait_model())
    plugin = DevicePlugin(setup.resources(node, result), kubelet_socket=kubelet.kubelet_socket)
    await nursery.start(plugin.run)
    return nvml, node, setup


async def test_time_slicing_with_rename_by_default_advertises_80_shared_gpus(
        nursery: trio.Nursery, fake_kubelet: FakeKubelet, tmp_path: pathlib.Path) -> None:
    import yaml

    nvml, node, _ = await serve_in_process(nursery, fake_kubelet, tmp_path, "dgx-a100", {},
                                           yaml.safe_load(TIME_SLICING_10))
    assert set(fake_kubelet.resources) == {"nvidia.com/gpu.shared"}
    view = fake_kubelet.resources["nvidia.com/gpu.shared"]
    assert pathlib.Path(view.endpoint).name == "nvidia-gpu.shared.sock"
    assert view.capacity == 80 and view.allocatable == 80
    gpu = node.model.gpus[2]  # type: ignore[union-attr]
    admission = await fake_kubelet.admit("nvidia.com/gpu.shared", 1)
    (one,) = admission.device_ids
    assert one.split("::")[0] in {g.uuid for g in node.model.gpus}  # type: ignore[union-attr]
    assert admission.response.envs == {"NVIDIA_VISIBLE_DEVICES": one.split("::")[0]}
    nvml.xid(2, 79)  # one XID: all ten replicas of that GPU go
    await fake_kubelet.wait_until(lambda: view.unhealthy == {f"{gpu.uuid}::{n}" for n in range(10)})
    assert view.allocatable == 70


async def test_mixed_mig_registers_one_resource_per_profile(
        nursery: trio.Nursery, fake_kubelet: FakeKubelet, tmp_path: pathlib.Path) -> None:
    _, node, _ = await serve_in_process(nursery, fake_kubelet, tmp_path, "a100-mig",
                                        {"mig_strategy": "mixed", "pass_device_specs": True})
    counts = {name: state.capacity for name, state in fake_kubelet.resources.items()}
    assert counts == {"nvidia.com/mig-1g.5gb": 9, "nvidia.com/mig-2g.10gb": 2,
                      "nvidia.com/mig-3g.20gb": 1, "nvidia.com/mig-4g.20gb": 1,
                      "nvidia.com/mig-7g.40gb": 1, "nvidia.com/mig-1g.5gb.me": 1}
    assert pathlib.Path(fake_kubelet.resources["nvidia.com/mig-7g.40gb"].endpoint).name == "nvidia-mig-7g.40gb.sock"
    admission = await fake_kubelet.admit("nvidia.com/mig-7g.40gb", 1)
    mig = node.model.gpus[1].mig_devices[0]  # type: ignore[union-attr]
    assert admission.device_ids == [mig.uuid]
    response = admission.response
    assert response.envs == {"NVIDIA_VISIBLE_DEVICES": mig.uuid}
    paths = [d.container_path for d in response.devices]
    # The control nodes the simulated driver root has, then the parent GPU's node and the
    # GI and CI access capabilities named by mig-minors.
    assert paths[:4] == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                         "/dev/nvidia-modeset"]
    assert paths[4] == "/dev/nvidia1"
    assert all(p.startswith("/dev/nvidia-caps/nvidia-cap") for p in paths[5:]) and len(paths) == 7
    assert all(d.permissions == "rw" and d.host_path == d.container_path for d in response.devices)


async def test_index_ids_and_volume_mounts(nursery: trio.Nursery, fake_kubelet: FakeKubelet,
                                           tmp_path: pathlib.Path) -> None:
    await serve_in_process(nursery, fake_kubelet, tmp_path, "pcie-4",
                           {"device_id_strategy": "index", "device_list_strategy": "volume-mounts"})
    view = fake_kubelet.resources["nvidia.com/gpu"]
    assert view.healthy == {"0", "1", "2", "3"}
    admission = await fake_kubelet.admit("nvidia.com/gpu", 2)
    ids = admission.device_ids
    assert admission.response.envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert [(m.container_path, m.host_path) for m in admission.response.mounts] == [
        (f"/var/run/nvidia-container-devices/{i}", "/dev/null") for i in ids]


# --- as a process: SIGHUP, file changes ------------------------------------------------

async def start_cli(kubelet: FakeKubelet, *args: str) -> trio.Process:
    env = {k: v for k, v in os.environ.items() if k not in ("SIMULATE", "KUBELET_SOCKET")}
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_gpu_plugin", "--kubelet-socket", str(kubelet.kubelet_socket),
         *args], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env=env)


async def stop(process: trio.Process) -> bytes:
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(HANG_GUARD):
        code = await process.wait()
    assert process.stderr is not None
    err = b""
    while chunk := await process.stderr.receive_some():
        err += chunk
    await process.stderr.aclose()
    assert code == 0, err.decode()
    return err


@pytest.mark.parametrize("trigger", ["SIGHUP", "file change"])
async def test_a_reload_drops_capacity_of_resources_that_go_and_keeps_a_bad_file_out(
        fake_kubelet: FakeKubelet, socket_dir: pathlib.Path, trigger: str) -> None:
    config = socket_dir / "config.yaml"
    config.write_text(TIME_SLICING_10)
    process = await start_cli(fake_kubelet, "--simulate", "pcie-4", "--config-file", str(config))
    try:
        await fake_kubelet.wait_registered("nvidia.com/gpu.shared", timeout=HANG_GUARD)
        assert fake_kubelet.resources["nvidia.com/gpu.shared"].capacity == 40

        async def change(text: str) -> None:
            tmp = config.with_suffix(".new")
            tmp.write_text(text)
            tmp.replace(config)  # as an editor or a ConfigMap update: a new file
            if trigger == "SIGHUP":
                process.send_signal(signal.SIGHUP)

        await change("version: v1\nflags:\n  migStrategy: sideways\n")  # bad: ignored
        await trio.sleep(1.0)
        assert fake_kubelet.resources["nvidia.com/gpu.shared"].capacity == 40
        await change("version: v1\n")  # no sharing: back to whole GPUs
        await fake_kubelet.wait_registered("nvidia.com/gpu", timeout=HANG_GUARD)
        await fake_kubelet.wait_until(
            lambda: fake_kubelet.resources["nvidia.com/gpu.shared"].capacity == 0)
        assert fake_kubelet.resources["nvidia.com/gpu"].capacity == 4
    finally:
        err = await stop(process) if process.returncode is None else b""
        process.kill()
    text = err.decode()
    assert "keeping the running configuration" in text and "unknown MIG strategy: sideways" in text
    assert "nvidia.com/gpu.shared: no longer configured; advertising no devices" in text
    assert text.count("Running with config") >= 2


def test_one_plan_per_model_serves_every_resource(tmp_path: pathlib.Path) -> None:
    # Each resource's source asks for the plan of the node's model; a shared resource
    # can hold 100,000 devices (#14 item 1), so they share one plan, not one each.
    from trio_gpu_plugin._discovery import discover

    nvml = SimulatedNVML(node_from("a100-mig"))
    nvml.nvmlInit()
    nvml.write_driver_root(tmp_path)
    model = discover(nvml, tmp_path).model
    config, _ = resolve_config({"mig_strategy": "mixed"}, {}, None)
    setup = NodeSetup.read(config, tmp_path)
    first = setup.plan(model)
    assert len(first.resources) == 6
    assert setup.plan(model) is first
    # A rediscovered node is a new model, planned afresh even when it reads the same.
    rediscovered = discover(nvml, tmp_path).model
    assert rediscovered == model and setup.plan(rediscovered) is not first
    # A reload builds a new NodeSetup, which plans for itself.
    assert NodeSetup.read(config, tmp_path).plan(model) is not first


def test_imex_channels_must_exist_when_required(tmp_path: pathlib.Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from trio_gpu_plugin._config import ConfigError

    config, _ = resolve_config({"imex_channel_ids": "0", "imex_required": "true"}, {}, None)
    with pytest.raises(ConfigError, match="requested IMEX channel channel0 does not exist"):
        NodeSetup.read(config, tmp_path)
    config, _ = resolve_config({"imex_channel_ids": "0"}, {}, None)
    assert NodeSetup.read(config, tmp_path).context.imex_channels == ()
    assert "IMEX channel channel0 does not exist" in caplog.text
    channel = tmp_path / "dev/nvidia-caps-imex-channels/channel0"
    channel.parent.mkdir(parents=True)
    channel.touch()
    assert NodeSetup.read(config, tmp_path).context.imex_channels == (0,)


async def test_cdi_names_without_a_spec_are_warned_about_at_start(
        nursery: trio.Nursery, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    from trio_gpu_plugin._cli import check_cdi

    nvml = SimulatedNVML(node_from("pcie-4"))
    nvml.write_driver_root(tmp_path)
    node = NvmlNode(nvml, root=tmp_path, checks=HealthChecks())
    await nursery.start(node.run)
    config, _ = resolve_config({"device_list_strategy": "cdi-cri",
                                "driver_root_ctr_path": str(tmp_path / "none")}, {}, None)
    setup = NodeSetup.read(config, tmp_path)
    result = setup.plan(await node.wait_model())
    check_cdi(setup, result)
    assert "nvidia.com/gpu" in caplog.text and "var/run/cdi" in caplog.text
    assert "nvidia-ctk cdi generate" in caplog.text
    caplog.clear()
    spec = tmp_path / "var/run/cdi/nvidia.yaml"
    spec.parent.mkdir(parents=True)
    names = "".join(f"  - name: {g.uuid}\n" for g in node.model.gpus)  # type: ignore[union-attr]
    spec.write_text(f"cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n{names}")
    check_cdi(setup, result)
    assert caplog.text == ""


def test_readme_sharing_example_gives_what_it_says(tmp_path: pathlib.Path) -> None:
    import re

    import yaml

    from trio_gpu_plugin._discovery import discover
    from trio_gpu_plugin._resources import plan

    readme = (ROOT / "README.md").read_text()
    (text,) = re.findall(r"<!-- example: sharing -->\n```yaml\n(.*?)\n```", readme, flags=re.S)
    config, warnings = resolve_config({}, {}, yaml.safe_load(text))
    assert warnings == []
    nvml = SimulatedNVML(node_from("dgx-a100"))
    nvml.nvmlInit()
    model = discover(nvml, tmp_path).model
    result = plan(model, config)
    assert {r.name: (len(r.devices), r.sharing) for r in result.resources} == {
        "nvidia.com/a100.small": (32, "time-slicing"),
        "nvidia.com/a100.medium": (4, "time-slicing"),
        "nvidia.com/a100": (2, "none"),
    }
    whole = next(r for r in result.resources if r.name == "nvidia.com/a100")
    assert [d.id for d in whole.devices] == [model.gpus[6].uuid, model.gpus[7].uuid]


def test_readme_migration_table_covers_every_flag() -> None:
    from trio_gpu_plugin._config import FLAGS

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Migrating from NVIDIA's plugin"):readme.index("### Sharing")]
    for spec in FLAGS:
        for name in (spec.name, *spec.aliases):
            assert f"`{name}`" in table, name
        for env in spec.envs:
            assert f"`{env}`" in table, env


@pytest.mark.parametrize("strategies", [
    "envvar", "volume-mounts", "envvar,volume-mounts", "cdi-annotations", "cdi-cri",
    "cdi-annotations,cdi-cri", "envvar,cdi-cri",
])
@pytest.mark.parametrize("id_strategy", ["uuid", "index"])
async def test_allocate_contents_on_a_preset_per_strategy(
        nursery: trio.Nursery, fake_kubelet: FakeKubelet, tmp_path: pathlib.Path,
        strategies: str, id_strategy: str) -> None:
    import re

    _, node, _ = await serve_in_process(
        nursery, fake_kubelet, tmp_path, "pcie-4",
        {"device_list_strategy": strategies, "device_id_strategy": id_strategy,
         "cdi_annotation_prefix": "cdi.example.com/"})
    admission = await fake_kubelet.admit("nvidia.com/gpu", 2)
    ids = admission.device_ids  # as advertised: UUIDs or "0".."3"
    gpus = {g.uuid: g for g in node.model.gpus}  # type: ignore[union-attr]
    assert all((i in gpus) if id_strategy == "uuid" else i in {"0", "1", "2", "3"} for i in ids)
    response = admission.response
    chosen = set(strategies.split(","))
    cdi_only = chosen <= {"cdi-annotations", "cdi-cri"}
    # Reference section 4.3, written out: volume-mounts' env value wins over envvar's.
    expected_env = {}
    if not cdi_only and "envvar" in chosen:
        expected_env["NVIDIA_VISIBLE_DEVICES"] = ",".join(ids)
    if "volume-mounts" in chosen:
        expected_env["NVIDIA_VISIBLE_DEVICES"] = "/var/run/nvidia-container-devices"
    assert dict(response.envs) == expected_env
    assert [(m.container_path, m.host_path) for m in response.mounts] == (
        [(f"/var/run/nvidia-container-devices/{i}", "/dev/null") for i in ids]
        if "volume-mounts" in chosen else [])
    names = [f"nvidia.com/gpu={i}" for i in ids]
    assert [d.name for d in response.cdi_devices] == (names if "cdi-cri" in chosen else [])
    if "cdi-annotations" in chosen:
        ((key, value),) = response.annotations.items()
        assert re.fullmatch(r"cdi\.example\.com/nvidia-device-plugin_[0-9a-f-]{36}", key)
        assert value == ",".join(names)
    else:
        assert dict(response.annotations) == {}
    assert list(response.devices) == []


async def test_mps_sharing_hands_out_pipes_and_refuses_two_replicas(
        nursery: trio.Nursery, fake_kubelet: FakeKubelet, tmp_path: pathlib.Path) -> None:
    from trio_gpu_plugin._grpc import RpcError
    from trio_gpu_plugin._transport import open_unix_channel
    from trio_gpu_plugin.proto import v1beta1

    document = {"version": "v1", "sharing": {"mps": {"resources": [
        {"name": "nvidia.com/gpu", "replicas": 4}]}}}
    _, node, _ = await serve_in_process(nursery, fake_kubelet, tmp_path, "pcie-4",
                                        {"mps_root": "/run/nvidia/mps"}, document)
    view = fake_kubelet.resources["nvidia.com/gpu"]  # MPS without renameByDefault: same name
    assert view.capacity == 16
    admission = await fake_kubelet.admit("nvidia.com/gpu", 1)
    response = admission.response
    assert response.envs["CUDA_MPS_PIPE_DIRECTORY"] == "/mps/nvidia.com/gpu/pipe"
    assert [(m.container_path, m.host_path) for m in response.mounts] == [
        ("/mps/nvidia.com/gpu/pipe", "/run/nvidia/mps/nvidia.com/gpu/pipe"),
        ("/dev/shm", "/run/nvidia/mps/shm")]
    uuid = node.model.gpus[0].uuid  # type: ignore[union-attr]
    async with open_unix_channel(fake_kubelet.socket_dir / "nvidia-gpu.sock") as channel:
        with pytest.raises(RpcError) as caught:
            await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate", v1beta1.AllocateRequest(
                container_requests=[v1beta1.ContainerAllocateRequest(
                    devices_ids=[f"{uuid}::0", f"{uuid}::1"])]))
    assert caught.value.message == ('invalid allocation request for "nvidia.com/gpu": invalid '
                                    "request: maximum request size for shared resources is 1; found 2")
