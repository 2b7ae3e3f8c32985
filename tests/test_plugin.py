"""GpuPlugin: NVIDIA's plugin as one object in the caller's nursery (configuration,
planning, registration, reload, state), and the README example that embeds it."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import trio

from trio_gpu_plugin import (
    Config,
    ConfigError,
    GpuPlugin,
    NvmlNode,
    PlannedResource,
    load_config,
)
from trio_gpu_plugin.testing import PRESETS, FakeKubelet, SimulatedNVML

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"
HANG_GUARD = 20.0


def time_slicing(replicas: int, *, rename: bool = False) -> dict[str, object]:
    """NVIDIA's config file as Python data: every GPU shared ``replicas`` ways."""
    return {"version": "v1", "sharing": {"timeSlicing": {
        "renameByDefault": rename, "resources": [{"name": GPU, "replicas": replicas}]}}}


@pytest.fixture
def nvml(tmp_path: pathlib.Path) -> SimulatedNVML:
    """A simulated 4-GPU PCIe node; its driver root is ``tmp_path / "root"``."""
    simulated = SimulatedNVML(PRESETS["pcie-4"])
    simulated.write_driver_root(tmp_path / "root")
    return simulated


def configured(kubelet: FakeKubelet, document: object = None, **flags: object) -> Config:
    config, warnings = load_config(
        document=document, flags={"--kubelet-socket": str(kubelet.kubelet_socket), **flags})
    assert warnings == []
    return config


def build(config: Config, nvml: SimulatedNVML, tmp_path: pathlib.Path,
          **options: object) -> GpuPlugin:
    return GpuPlugin(config, nvml, root=tmp_path / "root", **options)  # type: ignore[arg-type]


@pytest.fixture
async def running(nursery: trio.Nursery, fake_kubelet: FakeKubelet, nvml: SimulatedNVML,
                  tmp_path: pathlib.Path) -> AsyncIterator[GpuPlugin]:
    """A GpuPlugin serving whole GPUs (no sharing) to ``fake_kubelet``, registered."""
    plugin = build(configured(fake_kubelet, health_recovery_window=0,
                              health_probe_interval=0.05), nvml, tmp_path)
    with trio.fail_after(HANG_GUARD):
        await nursery.start(plugin.run)
    yield plugin


# --- the README example -----------------------------------------------------------------


def test_readme_plugin_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"<!-- example: plugin -->\n```python\n(.*?)\n```", readme, flags=re.S)
    # Public imports only: an embedder's code, not ours.
    imports = re.findall(r"^(?:from|import) (\S+)", example, flags=re.M)
    assert all(not part.startswith("_") for name in imports for part in name.split(".")), imports
    result = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"nvidia\.com/gpu: 8 devices, GPU-[0-9a-f-]+::0", lines[0]), lines
    assert lines[1:4] == ["kubelet capacity: 8", "reloaded: time-slicing 16",
                          lines[3]]
    assert lines[3].startswith("refused: requested IMEX channel channel0 does not exist")
    assert lines[4:] == ["still serving: 16", "unhealthy: ['GPU 1']"]


# --- construction -----------------------------------------------------------------------


def test_load_config_takes_flag_over_environment_over_document() -> None:
    document = {"version": "v1", "flags": {"migStrategy": "mixed", "failOnInitError": False}}
    config, _ = load_config(document=document)
    assert (config.flags.mig_strategy, config.flags.fail_on_init_error) == ("mixed", False)
    config, _ = load_config(document=document, env={"MIG_STRATEGY": "single"})
    assert config.flags.mig_strategy == "single"
    config, _ = load_config(document=document, env={"MIG_STRATEGY": "single"},
                            flags={"mig_strategy": "none"})
    assert config.flags.mig_strategy == "none"
    assert load_config()[0] == Config()  # nothing given: NVIDIA's defaults
    with pytest.raises(ConfigError, match="sideways"):
        load_config(flags={"--mig-strategy": "sideways"})


def test_load_config_reads_a_file_naming_it_in_errors(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                    "    - name: nvidia.com/gpu\n      replicas: 3\n")
    config, _ = load_config(path)
    assert config.sharing.strategy == "time-slicing"
    path.write_text("version: v1\nflags:\n  migStrategy: sideways\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}")):
        load_config(path)
    with pytest.raises(ValueError, match="not both"):
        load_config(path, document={})


def test_what_cannot_be_served_is_refused_when_built(
        nvml: SimulatedNVML, tmp_path: pathlib.Path) -> None:
    imex = load_config(document={"imex": {"channelIDs": [0], "required": True}})[0]
    with pytest.raises(ConfigError, match="IMEX channel channel0 does not exist"):
        build(imex, nvml, tmp_path)
    tegra = load_config(flags={"--device-discovery-strategy": "tegra"})[0]
    with pytest.raises(ConfigError, match="Tegra"):
        build(tegra, nvml, tmp_path)
    with pytest.raises(ConfigError, match="--metrics-address"):
        build(Config(), nvml, tmp_path, metrics_address="no-port-here")
    with pytest.raises(ValueError, match="SimulatedNVML"):
        GpuPlugin(Config(), object(), control_socket="/tmp/x.sock")  # type: ignore[arg-type]


def test_state_before_run(nvml: SimulatedNVML, tmp_path: pathlib.Path) -> None:
    config = Config(flags=dataclasses.replace(Config().flags, health_recovery_window=7.0))
    plugin = build(config, nvml, tmp_path)
    assert plugin.config is config
    assert plugin.model is None and plugin.resources == () and plugin.unhealthy() == {}
    assert isinstance(plugin.node, NvmlNode) and plugin.node.recovery_window == 7.0


# --- running ----------------------------------------------------------------------------


async def test_run_returns_once_every_resource_is_registered(
        nursery: trio.Nursery, fake_kubelet: FakeKubelet, nvml: SimulatedNVML,
        tmp_path: pathlib.Path) -> None:
    # MIG GPUs under the mixed strategy: several resources, each its own registration.
    a100 = SimulatedNVML(PRESETS["a100-mig"])
    a100.write_driver_root(tmp_path / "root")
    plugin = build(configured(fake_kubelet, {"flags": {"migStrategy": "mixed"}}), a100, tmp_path)
    with trio.fail_after(HANG_GUARD):
        await nursery.start(plugin.run)
    names = [r.name for r in plugin.resources]
    assert len(names) > 1 and all(isinstance(r, PlannedResource) for r in plugin.resources)
    for name in names:
        assert fake_kubelet.registration_count(name) == 1, name
    await fake_kubelet.wait_registered(names[-1], timeout=HANG_GUARD)
    for resource in plugin.resources:
        view = fake_kubelet.resources[resource.name]
        assert sorted(view.healthy) == sorted(d.id for d in resource.devices)
    assert plugin.model is not None and len(plugin.model.gpus) == len(a100.node.gpus)


async def test_state_is_readable_while_serving(
        running: GpuPlugin, fake_kubelet: FakeKubelet, nvml: SimulatedNVML) -> None:
    (resource,) = plugin_resources = running.resources
    assert resource.name == GPU and plugin_resources == running.resources
    assert running.model is not None
    uuids = [gpu.uuid for gpu in running.model.gpus]
    assert [d.id for d in resource.devices] == uuids
    assert all(running.healthy(u) for u in uuids)
    nvml.xid(2, 79)
    await fake_kubelet.wait_until(lambda: fake_kubelet.resources[GPU].unhealthy == {uuids[2]},
                                  timeout=HANG_GUARD)
    assert list(running.unhealthy()) == [uuids[2]]
    assert "XID 79" in running.unhealthy()[uuids[2]]
    assert not running.healthy(uuids[2]) and running.healthy(uuids[0], GPU)
    with pytest.raises(KeyError):
        running.healthy("GPU-nope")


async def test_a_reload_with_a_new_config_changes_the_advertised_devices(
        running: GpuPlugin, fake_kubelet: FakeKubelet, nvml: SimulatedNVML) -> None:
    nvml.xid(1, 79)  # health outlives the reload (NVIDIA's plugin forgets it, #111)
    await fake_kubelet.wait_until(lambda: fake_kubelet.resources[GPU].allocatable == 3,
                                  timeout=HANG_GUARD)
    new = configured(fake_kubelet, time_slicing(3, rename=True))
    with trio.fail_after(HANG_GUARD):
        await running.reload(new, reason="test")  # returns once registered again
    assert running.config is new
    assert [r.name for r in running.resources] == [SHARED]
    assert fake_kubelet.registration_count(SHARED) == 1
    await fake_kubelet.wait_registered(SHARED, timeout=HANG_GUARD)
    shared = fake_kubelet.resources[SHARED]
    assert (shared.capacity, shared.allocatable) == (12, 9)
    # The resource that went away was advertised empty first: the kubelet dropped it.
    await fake_kubelet.wait_until(lambda: fake_kubelet.resources[GPU].capacity == 0,
                                  timeout=HANG_GUARD)
    assert sorted(shared.healthy | shared.unhealthy) == sorted(
        d.id for d in running.resources[0].devices)


async def test_a_bad_config_raises_and_the_old_devices_keep_serving(
        running: GpuPlugin, fake_kubelet: FakeKubelet, tmp_path: pathlib.Path) -> None:
    before = running.config
    devices = fake_kubelet.resources[GPU].healthy.copy()
    mark = fake_kubelet.registration_count(GPU)
    imex = configured(fake_kubelet, {"imex": {"channelIDs": [0], "required": True}})
    with pytest.raises(ConfigError, match="IMEX channel channel0 does not exist"):
        await running.reload(imex)
    long_socket = str(tmp_path / ("k" * 120) / "kubelet.sock")
    with pytest.raises(ConfigError, match="longer than"):
        await running.reload(configured(fake_kubelet, **{"--kubelet-socket": long_socket}))
    await trio.sleep(0.3)
    assert running.config is before
    assert fake_kubelet.registration_count(GPU) == mark  # nothing torn down
    assert fake_kubelet.resources[GPU].healthy == devices
    admission = await fake_kubelet.admit(GPU, 1)
    assert admission.device_ids[0] in devices


async def test_reload_without_a_config_reads_the_file_and_skips_an_unchanged_one(
        nursery: trio.Nursery, fake_kubelet: FakeKubelet, nvml: SimulatedNVML,
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trio_gpu_plugin")
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\n")
    flags = {"--kubelet-socket": str(fake_kubelet.kubelet_socket)}

    def loader() -> tuple[Config, list[str]]:
        return load_config(path, flags=flags)

    plugin = build(loader()[0], nvml, tmp_path, config_file=path, loader=loader)
    with trio.fail_after(HANG_GUARD):
        await nursery.start(plugin.run)
        assert [r.name for r in plugin.resources] == [GPU]
        # Rewritten with the same settings: the watch sees it and reloads nothing.
        os.utime(path)
        path.write_text("version: v1\n")
        while "nothing to reload" not in caplog.text:
            await trio.sleep(0.05)
        assert fake_kubelet.registration_count(GPU) == 1
        # A real change through the file: re-planned and registered, as SIGHUP does.
        path.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                        "    - name: nvidia.com/gpu\n      replicas: 2\n")
        await fake_kubelet.wait_until(lambda: fake_kubelet.resources[GPU].capacity == 8)
        assert plugin.config.sharing.strategy == "time-slicing"
        # reload() without a config reads the loader's, and always reloads.
        mark = fake_kubelet.registration_count(GPU)
        await plugin.reload(reason="operator")
        assert fake_kubelet.registration_count(GPU) > mark
    assert "operator: configuration reloaded; serving and registering again" in caplog.text


async def test_a_bad_config_file_change_is_logged_and_keeps_serving(
        nursery: trio.Nursery, fake_kubelet: FakeKubelet, nvml: SimulatedNVML,
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trio_gpu_plugin")
    path = tmp_path / "config.yaml"
    path.write_text("version: v1\n")
    config, _ = load_config(path, flags={"--kubelet-socket": str(fake_kubelet.kubelet_socket)})
    plugin = build(config, nvml, tmp_path, config_file=path)
    with trio.fail_after(HANG_GUARD):
        await nursery.start(plugin.run)
        path.write_text("version: v1\nflags:\n  migStrategy: sideways\n")
        while "keeping the running configuration" not in caplog.text:
            await trio.sleep(0.05)
        assert plugin.config is config
        assert fake_kubelet.resources[GPU].capacity == 4
        # The default loader reads the file under the flag-only settings the plugin was
        # built with: the same kubelet socket.
        path.write_text("version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
                        "    - name: nvidia.com/gpu\n      replicas: 2\n")
        await fake_kubelet.wait_until(lambda: fake_kubelet.resources[GPU].capacity == 8)
    assert plugin.config.flags.kubelet_socket == str(fake_kubelet.kubelet_socket)
    assert f"config file {path} changed: keeping the running configuration: " in caplog.text


@pytest.mark.parametrize(("flags", "plugin", "named"), [
    ({"mig_strategy": "sideways"}, {}, "flags.migStrategy: 'sideways' is not one of none"),
    ({"fail_on_init_error": "false"}, {}, "flags.failOnInitError: 'false' is not a boolean"),
    ({"health_probe_interval": 0}, {}, "flags.healthProbeInterval: 0 is not a positive"),
    ({}, {"device_list_strategy": ("envvar", "floppy")}, "deviceListStrategy: 'floppy'"),
    ({}, {"device_id_strategy": "serial"}, "flags.plugin.deviceIDStrategy: 'serial'"),
])
def test_a_config_built_in_python_is_checked_as_a_loaded_one_is(
        nvml: SimulatedNVML, tmp_path: pathlib.Path, flags: dict[str, object],
        plugin: dict[str, object], named: str) -> None:
    from trio_gpu_plugin import Flags, PluginFlags

    config = Config(flags=Flags(**flags, plugin=PluginFlags(**plugin)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=re.escape(named)):
        build(config, nvml, tmp_path)


def test_every_loaded_config_passes_the_check_for_built_ones() -> None:
    from trio_gpu_plugin._config import validate_config

    validate_config(Config())
    for document in ({"flags": {"migStrategy": "mixed", "plugin": {"deviceIDStrategy": "index",
                                "deviceListStrategy": ["cdi-cri", "volume-mounts"]}}},
                     {"imex": {"channelIDs": [0]}}):
        validate_config(load_config(document={"version": "v1", **document})[0])
