"""trio-gpu-plugin inspect: the resources a node would advertise, their health and the
GPU topology, for people and for machines."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import trio

from trio_gpu_plugin._config import resolve_config
from trio_gpu_plugin._configured import NodeSetup
from trio_gpu_plugin._health import HealthChecks
from trio_gpu_plugin._inspect import render_text, report
from trio_gpu_plugin._nvml_sim import PRESETS, SimulatedNVML
from trio_gpu_plugin._nvml_source import NvmlNode
from trio_gpu_plugin._topology import Topology

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SIMULATE", "LOG_FORMAT")}
    return subprocess.run([sys.executable, "-m", "trio_gpu_plugin", "--log-level", "error", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def test_inspect_json_shows_resources_devices_and_the_nvlink_matrix() -> None:
    result = run_cli("--simulate", "dgx-1", "inspect", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    ((resource),) = data["resources"]
    assert resource["name"] == "nvidia.com/gpu" and len(resource["devices"]) == 8
    assert all(d["healthy"] for d in resource["devices"])
    assert data["topology"][0][:5] == ["X", "NV1", "NV1", "NV2", "NV2"]
    assert data["topology"][0][5] == "SYS"
    assert data["unhealthy"] == 0


def test_inspect_text_for_mig_names_profiles() -> None:
    result = run_cli("--simulate", "a100-mig", "--mig-strategy", "mixed", "inspect")
    assert result.returncode == 0, result.stderr
    assert "nvidia.com/mig-7g.40gb (nvidia-mig-7g.40gb.sock; sharing none): 1 device(s), 1 healthy" \
        in result.stdout
    assert "MIG 1g.5gb+me" in result.stdout


async def test_a_lost_gpu_shows_unhealthy_with_its_reason(tmp_path: pathlib.Path) -> None:
    nvml = SimulatedNVML(PRESETS["pcie-4"])
    nvml.write_driver_root(tmp_path)
    node = NvmlNode(nvml, root=tmp_path, checks=HealthChecks(), probe_interval=0.02)
    config, _ = resolve_config({"device_list_strategy": "envvar"}, {}, None)
    setup = NodeSetup.read(config, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        nvml.lose(2)
        with trio.fail_after(5):
            while node.tracker.healthy(node.model.gpus[2].uuid):  # type: ignore[union-attr]
                await trio.sleep(0.01)
        model = node.model
        assert model is not None
        data = report(model, setup.plan(model), node.healthy, node.tracker.unhealthy_units(),
                      Topology.from_model(model))
        nursery.cancel_scope.cancel()
    assert data["unhealthy"] == 1
    text = render_text(data)
    assert "3 healthy" in text and "Unhealthy (XID 79 (GPU has fallen off the bus))" in text


def test_inspect_piped_into_head_exits_cleanly() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SIMULATE"}
    result = subprocess.run(
        f"{sys.executable} -m trio_gpu_plugin --log-level error --simulate dgx-1 inspect | head -1",
        shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert result.stdout.startswith("driver ")
    assert "Traceback" not in result.stderr


def test_numa_is_a_list_for_every_gpu_and_device_known_or_not(tmp_path: pathlib.Path) -> None:
    # One GPU without a NUMA node, one MIG GPU: the same type everywhere, as the
    # kubelet's TopologyInfo holds a list.
    node = tmp_path / "node.yaml"
    node.write_text("gpus:\n"
                    "  - model: NVIDIA A100-SXM4-40GB\n    numa_node: 1\n"
                    "    mig: [3g.20gb, 1g.5gb]\n"
                    "  - model: Tesla T4\n    numa_node: null\n")
    result = run_cli("--simulate", str(node), "--mig-strategy", "mixed", "inspect", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [g["numa"] for g in data["gpus"]] == [[1], []]
    devices = {d["index"]: d["numa"] for r in data["resources"] for d in r["devices"]}
    assert devices == {"0:0": [1], "0:1": [1], "1": []}
    text = run_cli("--simulate", str(node), "inspect").stdout
    assert "NUMA 1  MIG" in text and "NUMA -  Healthy" in text


def run_cli_default_logging(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SIMULATE", "LOG_LEVEL", "LOG_FORMAT")}
    return subprocess.run([sys.executable, "-m", "trio_gpu_plugin", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def test_inspect_logs_only_warnings_unless_asked_for_more() -> None:
    result = run_cli_default_logging("--simulate", "pcie-4", "inspect")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("driver 550.54.15, 4 GPU(s)")
    assert result.stderr == ""  # no "Running with config", no NVML session lines
    # A warning still shows: a flag that has no effect.
    result = run_cli_default_logging("--simulate", "pcie-4", "--cdi-feature-flags", "x", "inspect")
    assert "WARNING" in result.stderr and "INFO" not in result.stderr
    result = run_cli_default_logging("--simulate", "pcie-4", "--log-level", "info", "inspect")
    assert "INFO trio_gpu_plugin.cli: Running with config" in result.stderr


def test_inspect_warns_that_envvar_alone_cannot_serve_two_mig_types_to_one_container() -> None:
    result = run_cli("--simulate", "a100-mig", "--mig-strategy", "mixed", "inspect", "--json")
    assert result.returncode == 0, result.stderr
    (warning,) = [w for w in json.loads(result.stdout)["warnings"] if "envvar" in w]
    assert "nvidia.com/mig-1g.5gb" in warning and "nvidia.com/mig-7g.40gb" in warning
    assert "NVIDIA_VISIBLE_DEVICES" in warning and "conflict" in warning
    assert "volume-mounts, cdi-annotations or cdi-cri" in warning
    text = run_cli("--simulate", "a100-mig", "--mig-strategy", "mixed", "inspect").stdout
    assert "\nwarning: --mig-strategy mixed with --device-list-strategy envvar alone" in text
    # A strategy whose devices add up across resources, or one resource type: no warning.
    for args in (("--mig-strategy", "mixed", "--device-list-strategy", "envvar,volume-mounts"),
                 ("--mig-strategy", "mixed", "--device-list-strategy", "cdi-cri"),
                 ("--mig-strategy", "none")):
        result = run_cli("--simulate", "a100-mig", *args, "inspect", "--json")
        assert result.returncode == 0, result.stderr
        assert not [w for w in json.loads(result.stdout)["warnings"] if "envvar" in w], args
