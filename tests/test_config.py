"""Flags, environment twins and the config file, against NVIDIA's documented behaviour
(reference §1 flags and precedence, §2 config schema, validation and error texts).

Expected values are written from the reference, never copied from the parser's output.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gpu_plugin._config import (
    DEVICE_LIST_STRATEGIES,
    FLAG_GROUPS,
    FLAGS,
    Config,
    ConfigError,
    FlagSpec,
    ReplicatedDevices,
    ResourcePattern,
    add_flags,
    check_platform,
    config_to_document,
    effective_config_json,
    flag_value,
    load_config_file,
    new_resource_name,
    parse_seconds,
    resolve_config,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
GPU_UUID = "GPU-b1028956-cfa2-0990-bf4a-5da9abb51763"
MIG_UUID = "MIG-8d6c3c0e-3a7f-5b7e-9f5d-0c9f6d1e2a3b"


def parser() -> argparse.ArgumentParser:
    # Wide help so that textwrap does not split "(env X; default Y)" across lines.
    result = argparse.ArgumentParser(
        prog="trio-gpu-plugin",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=10_000))
    add_flags(result)
    return result


def cli(*argv: str) -> dict[str, Any]:
    return vars(parser().parse_args(list(argv)))


def resolve(argv: Sequence[str] = (), env: Mapping[str, str] | None = None,
            document: Any | None = None) -> Config:
    config, _warnings = resolve_config(cli(*argv), env or {}, document)
    return config


def error_of(document: Any, argv: Sequence[str] = (),
             env: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(argv, env, document)
    return str(info.value)


def spec(name: str) -> FlagSpec:
    return next(s for s in FLAGS if s.name == name)


# --------------------------------------------------------------------------------------
# The table


def test_every_reference_flag_is_in_the_table() -> None:
    reference = {
        "--mig-strategy": ("MIG_STRATEGY",), "--fail-on-init-error": ("FAIL_ON_INIT_ERROR",),
        "--driver-root": ("NVIDIA_DRIVER_ROOT",), "--dev-root": ("NVIDIA_DEV_ROOT",),
        "--pass-device-specs": ("PASS_DEVICE_SPECS",),
        "--device-list-strategy": ("DEVICE_LIST_STRATEGY",),
        "--device-id-strategy": ("DEVICE_ID_STRATEGY",),
        "--gdrcopy-enabled": ("GDRCOPY_ENABLED",), "--gds-enabled": ("GDS_ENABLED",),
        "--mofed-enabled": ("MOFED_ENABLED",),
        "--cdi-annotation-prefix": ("CDI_ANNOTATION_PREFIX",),
        "--nvidia-cdi-hook-path": ("NVIDIA_CDI_HOOK_PATH", "NVIDIA_CTK_PATH"),
        "--driver-root-ctr-path": ("DRIVER_ROOT_CTR_PATH", "CONTAINER_DRIVER_ROOT"),
        "--mps-root": ("MPS_ROOT",),
        "--shared-devices-allocation-policy": ("SHARED_DEVICES_ALLOCATION_POLICY",),
        "--device-discovery-strategy": ("DEVICE_DISCOVERY_STRATEGY",),
        "--imex-channel-ids": ("IMEX_CHANNEL_IDS",), "--imex-required": ("IMEX_REQUIRED",),
        "--kubelet-socket": ("KUBELET_SOCKET",), "--config-file": ("CONFIG_FILE",),
        "--cdi-feature-flags": ("CDI_FEATURE_FLAGS",),
        "--cdi-disable-hooks": ("CDI_DISABLE_HOOKS",),
        # Ours
        "--cdi-kind": ("CDI_KIND",), "--health-recovery-window": ("HEALTH_RECOVERY_WINDOW",),
        "--health-probe-interval": ("HEALTH_PROBE_INTERVAL",), "--simulate": ("SIMULATE",),
        "--simulate-control": ("SIMULATE_CONTROL",), "--log-level": ("LOG_LEVEL",), "--log-format": ("LOG_FORMAT",),
        "--metrics-address": ("METRICS_ADDRESS",),
    }
    assert {s.name: s.envs for s in FLAGS} == reference
    aliases = {s.name: s.aliases for s in FLAGS if s.aliases}
    assert aliases == {
        "--driver-root": ("--nvidia-driver-root",), "--dev-root": ("--nvidia-dev-root",),
        "--nvidia-cdi-hook-path": ("--nvidia-ctk-path",),
        "--driver-root-ctr-path": ("--container-driver-root",),
    }
    assert {s.group for s in FLAGS} <= set(FLAG_GROUPS)
    assert len({s.dest for s in FLAGS}) == len(FLAGS)


def test_config_keys_are_nvidias() -> None:
    keys = {s.name: s.config_key for s in FLAGS if s.config_key}
    assert keys == {
        "--mig-strategy": "flags.migStrategy", "--fail-on-init-error": "flags.failOnInitError",
        "--driver-root": "flags.nvidiaDriverRoot", "--dev-root": "flags.nvidiaDevRoot",
        "--pass-device-specs": "flags.plugin.passDeviceSpecs",
        "--device-list-strategy": "flags.plugin.deviceListStrategy",
        "--device-id-strategy": "flags.plugin.deviceIDStrategy",
        "--gdrcopy-enabled": "flags.gdrcopyEnabled", "--gds-enabled": "flags.gdsEnabled",
        "--mofed-enabled": "flags.mofedEnabled",
        "--cdi-annotation-prefix": "flags.plugin.cdiAnnotationPrefix",
        "--nvidia-cdi-hook-path": "flags.plugin.nvidiaCTKPath",
        "--driver-root-ctr-path": "flags.plugin.containerDriverRoot",
        "--mps-root": "flags.mpsRoot",
        "--shared-devices-allocation-policy": "flags.plugin.sharedDevicesAllocationPolicy",
        "--device-discovery-strategy": "flags.deviceDiscoveryStrategy",
        "--imex-channel-ids": "imex.channelIDs", "--imex-required": "imex.required",
        "--cdi-kind": "flags.plugin.cdiKind",
        "--health-recovery-window": "flags.healthRecoveryWindow",
        "--health-probe-interval": "flags.healthProbeInterval",
    }
    assert {s.name for s in FLAGS if s.attr is None} == {
        "--simulate", "--simulate-control", "--log-level", "--log-format", "--metrics-address"}


def test_display_defaults_match_the_dataclasses() -> None:
    defaults = Config()
    for s in FLAGS:
        if s.attr is None or s.kind not in ("str", "bool", "choice", "seconds",
                                             "positive-seconds"):
            continue
        value: Any = defaults
        for part in s.attr.split("."):
            value = getattr(value, part)
        if isinstance(value, bool):
            shown = str(value).lower()
        elif isinstance(value, float):
            shown = f"{value:g}"
        else:
            shown = value or "none"
        assert s.default == shown, s.name
    assert defaults.flags.plugin.device_list_strategy == (spec("--device-list-strategy").default,)


# --------------------------------------------------------------------------------------
# argparse


def test_help_is_grouped_and_shows_every_env_twin_and_default() -> None:
    text = parser().format_help()
    for title in FLAG_GROUPS:
        assert f"\n{title}:\n" in text
    for s in FLAGS:
        envs = " or ".join(s.envs)
        assert f"(env {envs}; default {s.default})" in text, s.name
        for name in (s.name, *s.aliases):
            assert name in text
    # Flags sit in their group: --mig-strategy after the "Sharing and MIG" title, before CDI.
    sharing = text.index("\nSharing and MIG:\n")
    assert sharing < text.index("  --mig-strategy") < text.index("\nCDI:\n")


def test_nothing_given_means_none_everywhere() -> None:
    values = cli()
    assert values == {s.dest: None for s in FLAGS}


def test_bool_flags_alone_mean_true_and_take_a_value() -> None:
    assert cli("--pass-device-specs")["pass_device_specs"] is True
    assert cli("--pass-device-specs=false")["pass_device_specs"] is False
    assert cli("--fail-on-init-error=F")["fail_on_init_error"] is False
    assert cli("--gds-enabled", "1")["gds_enabled"] is True


def test_list_flags_split_on_commas_and_add_up() -> None:
    values = cli("--device-list-strategy=envvar,cdi-cri", "--device-list-strategy",
                 "volume-mounts", "--cdi-feature-flags=a", "--cdi-feature-flags=b,c",
                 "--imex-channel-ids=0")
    assert values["device_list_strategy"] == ("envvar", "cdi-cri", "volume-mounts")
    assert values["cdi_feature_flags"] == ("a", "b", "c")
    assert values["imex_channel_ids"] == (0,)


@pytest.mark.parametrize(("argv", "message"), [
    (["--pass-device-specs=maybe"],
     "argument --pass-device-specs: 'maybe' is not a boolean (true or false)"),
    (["--mig-strategy=sideways"],
     ("argument --mig-strategy: 'sideways' is not one of none, single, mixed "
     "(unknown MIG strategy: sideways)")),
    (["--device-list-strategy=envvar,bogus"],
     ("argument --device-list-strategy: 'bogus' is not one of envvar, volume-mounts, "
     "cdi-annotations, cdi-cri (invalid --device-list-strategy option: invalid strategy: "
     "bogus)")),
    (["--health-probe-interval=0"],
     "argument --health-probe-interval: '0' must be more than 0 seconds"),
    (["--health-recovery-window=soon"],
     "argument --health-recovery-window: 'soon' is not a number of seconds or a duration"),
    (["--imex-channel-ids=x"],
     "argument --imex-channel-ids: 'x' is not a comma-separated list of integers"),
    (["--imex-channel-ids=1"],
     ("argument --imex-channel-ids: invalid IMEX channel IDs: invalid IMEX config: "
     "channelIDs must be [] or [0]; found [1]")),
])
def test_argparse_errors_name_the_flag(argv: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_aliases_reach_the_same_setting() -> None:
    config = resolve(["--nvidia-driver-root=/run/nvidia/driver", "--nvidia-dev-root=/host",
                      "--nvidia-ctk-path=/opt/hook", "--container-driver-root=/drv"])
    assert config.flags.nvidia_driver_root == "/run/nvidia/driver"
    assert config.flags.dev_root == "/host"
    assert config.flags.plugin.nvidia_cdi_hook_path == "/opt/hook"
    assert config.flags.plugin.container_driver_root == "/drv"


# --------------------------------------------------------------------------------------
# Precedence: default < file < env < CLI


PRECEDENCE = [
    # flag, env var, config key, file value, env value, CLI value, attr, expected each step
    ("--mig-strategy", "MIG_STRATEGY", "flags.migStrategy", "single", "mixed", "none",
     "flags.mig_strategy", ("none", "single", "mixed", "none")),
    ("--pass-device-specs", "PASS_DEVICE_SPECS", "flags.plugin.passDeviceSpecs", True, "false",
     "true", "flags.plugin.pass_device_specs", (False, True, False, True)),
    ("--fail-on-init-error", "FAIL_ON_INIT_ERROR", "flags.failOnInitError", False, "TRUE",
     "0", "flags.fail_on_init_error", (True, False, True, False)),
    ("--device-list-strategy", "DEVICE_LIST_STRATEGY", "flags.plugin.deviceListStrategy",
     ["cdi-cri", "envvar"], "volume-mounts,cdi-annotations", "envvar",
     "flags.plugin.device_list_strategy",
     (("envvar",), ("cdi-cri", "envvar"), ("volume-mounts", "cdi-annotations"), ("envvar",))),
    ("--driver-root", "NVIDIA_DRIVER_ROOT", "flags.nvidiaDriverRoot", "/file", "/env", "/cli",
     "flags.nvidia_driver_root", ("/", "/file", "/env", "/cli")),
    ("--health-recovery-window", "HEALTH_RECOVERY_WINDOW", "flags.healthRecoveryWindow", "2m",
     "90", "1.5", "flags.health_recovery_window", (60.0, 120.0, 90.0, 1.5)),
    ("--imex-channel-ids", "IMEX_CHANNEL_IDS", "imex.channelIDs", [0], "", "0",
     "imex.channel_ids", ((), (0,), (0,), (0,))),
    ("--dev-root", "NVIDIA_DEV_ROOT", "flags.nvidiaDevRoot", "/file", "/env", "/cli",
     "flags.nvidia_dev_root", (None, "/file", "/env", "/cli")),
]


def document_with(key: str, value: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"version": "v1"}
    node = document
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return document


def attribute(config: Config, attr: str) -> Any:
    value: Any = config
    for part in attr.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("flag", "env_var", "key", "file_value", "env_value", "cli_value",
                          "attr", "expected"), PRECEDENCE)
def test_precedence(flag: str, env_var: str, key: str, file_value: Any, env_value: str,
                    cli_value: str, attr: str, expected: tuple[Any, ...]) -> None:
    default, from_file, from_env, from_cli = expected
    document = document_with(key, file_value)
    env = {env_var: env_value}
    argv = [f"{flag}={cli_value}"]
    assert attribute(resolve(), attr) == default
    assert attribute(resolve(document=document), attr) == from_file
    if env_value:
        assert attribute(resolve(env=env, document=document), attr) == from_env
    assert attribute(resolve(argv, env, document), attr) == from_cli


def test_cli_mapping_takes_names_dests_and_text() -> None:
    config, warnings = resolve_config(
        {"--mig-strategy": "single", "pass_device_specs": "true", "device_list_strategy":
         ["envvar", "cdi-cri"], "--health-probe-interval": 2, "command": "demo",
         "kubelet_socket": None},
        {}, None)
    assert config.flags.mig_strategy == "single"
    assert config.flags.plugin.pass_device_specs is True
    assert config.flags.plugin.device_list_strategy == ("envvar", "cdi-cri")
    assert config.flags.health_probe_interval == 2.0
    assert config.flags.kubelet_socket == "/var/lib/kubelet/device-plugins/kubelet.sock"
    assert warnings == []
    with pytest.raises(ConfigError, match=r"^--pass-device-specs: 'maybe' is not a boolean"):
        resolve_config({"--pass-device-specs": "maybe"}, {}, None)
    with pytest.raises(ConfigError, match=r"^--mig-strategy: 'up' is not one of"):
        resolve_config({"mig_strategy": "up"}, {}, None)


# --------------------------------------------------------------------------------------
# Environment twins


@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True"])
def test_env_bools_read_as_go_parsebool_true(value: str) -> None:
    assert resolve(env={"PASS_DEVICE_SPECS": value}).flags.plugin.pass_device_specs is True


@pytest.mark.parametrize("value", ["0", "f", "F", "FALSE", "false", "False"])
def test_env_bools_read_as_go_parsebool_false(value: str) -> None:
    assert resolve(env={"FAIL_ON_INIT_ERROR": value}).flags.fail_on_init_error is False


@pytest.mark.parametrize(("env", "message"), [
    ({"FAIL_ON_INIT_ERROR": "yes"},
     "environment variable FAIL_ON_INIT_ERROR: 'yes' is not a boolean (true or false)"),
    ({"MIG_STRATEGY": "sideways"},
     ("environment variable MIG_STRATEGY: 'sideways' is not one of none, single, mixed "
     "(unknown MIG strategy: sideways)")),
    ({"DEVICE_ID_STRATEGY": "serial"},
     ("environment variable DEVICE_ID_STRATEGY: 'serial' is not one of uuid, index "
     "(invalid --device-id-strategy option: serial)")),
    ({"HEALTH_PROBE_INTERVAL": "-1"},
     "environment variable HEALTH_PROBE_INTERVAL: '-1' must be a finite number of seconds"),
    ({"IMEX_CHANNEL_IDS": "0,1"},
     ("environment variable IMEX_CHANNEL_IDS: invalid IMEX channel IDs: invalid IMEX config: "
     "channelIDs must be [] or [0]; found [0 1]")),
])
def test_bad_env_values_name_the_variable(env: dict[str, str], message: str) -> None:
    assert error_of(None, env=env).startswith(message)


def test_two_env_twins_first_set_wins() -> None:
    config, warnings = resolve_config(
        {}, {"NVIDIA_CDI_HOOK_PATH": "/hook", "NVIDIA_CTK_PATH": "/ctk",
             "CONTAINER_DRIVER_ROOT": "/legacy"}, None)
    assert config.flags.plugin.nvidia_cdi_hook_path == "/hook"
    assert config.flags.plugin.container_driver_root == "/legacy"
    assert warnings == [("environment variable NVIDIA_CTK_PATH ignored: NVIDIA_CDI_HOOK_PATH is "
                        "set and wins")]
    config, _ = resolve_config({}, {"NVIDIA_CTK_PATH": "/ctk", "DRIVER_ROOT_CTR_PATH": "/new",
                                    "CONTAINER_DRIVER_ROOT": "/new"}, None)
    assert config.flags.plugin.nvidia_cdi_hook_path == "/ctk"
    assert config.flags.plugin.container_driver_root == "/new"


def test_empty_env_values() -> None:
    # Empty means unset, except for plain strings (urfave keeps an empty string).
    config = resolve(env={"PASS_DEVICE_SPECS": "", "MPS_ROOT": "", "DEVICE_LIST_STRATEGY": "",
                          "KUBELET_SOCKET": ""})
    assert config.flags.plugin.pass_device_specs is False
    assert config.flags.mps_root is None
    assert config.flags.plugin.device_list_strategy == ("envvar",)
    assert config.flags.kubelet_socket == ""


def test_cli_only_flags_come_from_command_line_then_env() -> None:
    env = {"SIMULATE": "dgx-a100", "LOG_LEVEL": "debug", "CONFIG_FILE": "/etc/plugin.yaml"}
    assert flag_value("--simulate", cli(), env) == "dgx-a100"
    assert flag_value("simulate", cli("--simulate=pcie-4"), env) == "pcie-4"
    assert flag_value("--simulate-control", cli(), env) is None
    assert flag_value("--log-level", cli(), env) == "debug"
    assert flag_value("--config-file", cli(), env) == "/etc/plugin.yaml"
    assert flag_value("--nvidia-ctk-path", cli(), {"NVIDIA_CTK_PATH": "/x"}) == "/x"
    with pytest.raises(ConfigError, match="environment variable LOG_LEVEL: 'loud' is not one"):
        flag_value("--log-level", cli(), {"LOG_LEVEL": "loud"})
    # And they are not part of the Config.
    assert resolve(["--simulate=pcie-4"], env) == resolve(env={"CONFIG_FILE": "/etc/plugin.yaml"})


# --------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("1.5", 1.5), ("0", 0.0), ("90s", 90.0), ("2m", 120.0), ("500ms", 0.5),
    ("1h30m", 5400.0), ("1.5h", 5400.0), ("250us", 0.00025), ("100ns", 1e-7),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "-5s", "5 m", "5d", "inf", "nan", "-1"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_seconds(text)


def test_file_durations_are_seconds_or_go_durations() -> None:
    config = resolve(document={"flags": {"healthRecoveryWindow": 90,
                                         "healthProbeInterval": "500ms"}})
    assert config.flags.health_recovery_window == 90.0
    assert config.flags.health_probe_interval == 0.5
    assert "config file: flags.healthProbeInterval: '0s' must be more than 0 seconds" in \
        error_of({"flags": {"healthProbeInterval": "0s"}})
    assert "config file: flags.healthRecoveryWindow: true is not a number of seconds" in \
        error_of({"flags": {"healthRecoveryWindow": True}})


# --------------------------------------------------------------------------------------
# The reference's examples (§2.2)


def load_yaml(tmp_path: pathlib.Path, text: str, name: str = "config.yaml") -> Any:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_config_file(str(path))


def test_example_flags_block(tmp_path: pathlib.Path) -> None:
    document = load_yaml(tmp_path, """\
        version: v1
        flags:
          migStrategy: "none"
          failOnInitError: true
          nvidiaDriverRoot: "/"
          plugin:
            passDeviceSpecs: false
            deviceListStrategy: "envvar"
            deviceIDStrategy: "uuid"
        """)
    config, warnings = resolve_config({}, {}, document)
    assert warnings == []
    assert config == Config()


def test_example_time_slicing(tmp_path: pathlib.Path) -> None:
    document = load_yaml(tmp_path, """\
        version: v1
        sharing:
          timeSlicing:
            renameByDefault: true
            resources:
            - name: nvidia.com/gpu
              replicas: 10
        """)
    config, warnings = resolve_config({}, {}, document)
    assert warnings == []
    assert config.sharing.strategy == "time-slicing"
    strategy = config.sharing.time_slicing
    assert strategy is not None and config.sharing.mps is None
    assert strategy.rename_by_default is True
    assert strategy.fail_requests_greater_than_one is None
    assert config.sharing.fail_requests_greater_than_one is False
    (resource,) = strategy.resources
    assert resource.name == "nvidia.com/gpu"
    assert resource.replicas == 10
    assert resource.rename == "nvidia.com/gpu.shared"
    assert resource.devices == ReplicatedDevices(all=True)


def test_example_mps(tmp_path: pathlib.Path) -> None:
    document = load_yaml(tmp_path, """\
        version: v1
        sharing:
          mps:
            renameByDefault: false
            resources:
            - name: nvidia.com/gpu
              replicas: 4
        """)
    config = resolve(["--mps-root=/run/nvidia/mps"], document=document)
    assert config.sharing.strategy == "mps"
    assert config.flags.mps_root == "/run/nvidia/mps"
    mps = config.sharing.mps
    assert mps is not None
    assert mps.fail_requests_greater_than_one is None
    assert config.sharing.fail_requests_greater_than_one is True
    (resource,) = mps.resources
    assert (resource.name, resource.replicas, resource.rename) == ("nvidia.com/gpu", 4, None)


def test_example_combined_document(tmp_path: pathlib.Path) -> None:
    document = load_yaml(tmp_path, """\
        version: v1
        flags:
          migStrategy: mixed
          failOnInitError: true
          nvidiaDriverRoot: /run/nvidia/driver
          mpsRoot: /run/nvidia/mps
          plugin:
            passDeviceSpecs: false
            deviceListStrategy: [envvar, cdi-annotations]
            deviceIDStrategy: uuid
            sharedDevicesAllocationPolicy: distributed
        sharing:
          timeSlicing:
            renameByDefault: false
            failRequestsGreaterThanOne: true
            resources:
            - name: nvidia.com/gpu
              replicas: 4
            - name: nvidia.com/mig-1g.5gb
              replicas: 2
        imex:
          channelIDs: [0]
          required: false
        """)
    config, warnings = resolve_config({}, {}, document)
    assert warnings == []
    flags = config.flags
    assert flags.mig_strategy == "mixed"
    assert flags.fail_on_init_error is True
    assert flags.nvidia_driver_root == "/run/nvidia/driver"
    assert flags.dev_root == "/run/nvidia/driver"
    assert flags.mps_root == "/run/nvidia/mps"
    assert flags.plugin.pass_device_specs is False
    assert flags.plugin.device_list_strategy == ("envvar", "cdi-annotations")
    assert flags.plugin.device_id_strategy == "uuid"
    assert flags.plugin.shared_devices_allocation_policy == "distributed"
    assert config.sharing.strategy == "time-slicing"
    assert config.sharing.fail_requests_greater_than_one is True
    strategy = config.sharing.time_slicing
    assert strategy is not None
    assert [(r.name, r.replicas, r.rename) for r in strategy.resources] == [
        ("nvidia.com/gpu", 4, None), ("nvidia.com/mig-1g.5gb", 2, None)]
    assert config.imex.channel_ids == (0,)
    assert config.imex.required is False


# --------------------------------------------------------------------------------------
# Honoured where NVIDIA strips: rename, devices, resources


def sharing_document(**entry: Any) -> dict[str, Any]:
    return {"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 2,
                                                        **entry}]}}}


def only_resource(document: Any) -> Any:
    strategy = resolve(document=document).sharing.time_slicing
    assert strategy is not None
    (resource,) = strategy.resources
    return resource


def test_rename_is_honoured_and_normalised() -> None:
    resource = only_resource(sharing_document(rename="gpu-fast"))
    assert resource.name == "nvidia.com/gpu"
    assert resource.rename == "nvidia.com/gpu-fast"
    document = sharing_document(rename="nvidia.com/mine")
    document["sharing"]["timeSlicing"]["renameByDefault"] = True
    assert only_resource(document).rename == "nvidia.com/mine"


@pytest.mark.parametrize(("devices", "expected"), [
    ("all", ReplicatedDevices()),
    (3, ReplicatedDevices(all=False, count=3)),
    ([0, "1", "2:0", GPU_UUID, MIG_UUID, f"MIG-{GPU_UUID}/3/0"],
     ReplicatedDevices(all=False, ids=("0", "1", "2:0", GPU_UUID, MIG_UUID,
                                       f"MIG-{GPU_UUID}/3/0"))),
])
def test_devices_are_honoured(devices: Any, expected: ReplicatedDevices) -> None:
    assert only_resource(sharing_document(devices=devices)).devices == expected


def test_resources_are_honoured_and_normalised() -> None:
    config = resolve(document={"resources": {
        "gpus": [{"pattern": "*A100*", "name": "a100"}],
        "mig": [{"pattern": "1g.5gb", "name": "nvidia.com/mig-small"}]}})
    assert config.resources.gpus == (ResourcePattern("*A100*", "nvidia.com/a100"),)
    assert config.resources.mig == (ResourcePattern("1g.5gb", "nvidia.com/mig-small"),)


def test_new_resource_name() -> None:
    assert new_resource_name("gpu") == "nvidia.com/gpu"
    assert new_resource_name("nvidia.com/mig-1g.5gb") == "nvidia.com/mig-1g.5gb"
    longest = "nvidia.com/" + "a" * 52
    assert new_resource_name(longest) == longest
    with pytest.raises(ConfigError, match="63 characters or less"):
        new_resource_name(longest + "a")
    with pytest.raises(ConfigError, match=re.escape(
            "incorrect format for resource name 'nvidia.com/example.com/gpu': [a lowercase "
            "RFC 1123 subdomain")):
        new_resource_name("example.com/gpu")


# --------------------------------------------------------------------------------------
# Validation: every error with its text and where it came from


TS = "config file: sharing.timeSlicing"
LONG = "x" * 60

INVALID = [
    ({"version": "v2"}, "config file: version: unknown version: v2"),
    ({"flags": {"migStrategy": "sideways"}},
     ("config file: flags.migStrategy: 'sideways' is not one of none, single, mixed "
     "(unknown MIG strategy: sideways)")),
    ({"flags": {"plugin": {"deviceListStrategy": ["envvar", "bogus"]}}},
     ("config file: flags.plugin.deviceListStrategy: 'bogus' is not one of envvar, "
     "volume-mounts, cdi-annotations, cdi-cri (invalid --device-list-strategy option: "
     "invalid strategy: bogus)")),
    ({"flags": {"plugin": {"deviceListStrategy": "envvar,cdi-cri"}}},
     "invalid --device-list-strategy option: invalid strategy: envvar,cdi-cri"),
    ({"flags": {"plugin": {"deviceListStrategy": []}}},
     ("config file: flags.plugin.deviceListStrategy: invalid --device-list-strategy option: "
     "no device list strategy specified")),
    ({"flags": {"plugin": {"deviceListStrategy": 5}}},
     "config file: flags.plugin.deviceListStrategy: invalid deviceListStrategy: 5"),
    ({"flags": {"plugin": {"deviceListStrategy": [1]}}},
     "config file: flags.plugin.deviceListStrategy: invalid deviceListStrategy: [1]"),
    ({"flags": {"plugin": {"deviceIDStrategy": "serial"}}},
     ("config file: flags.plugin.deviceIDStrategy: 'serial' is not one of uuid, index "
     "(invalid --device-id-strategy option: serial)")),
    ({"flags": {"plugin": {"sharedDevicesAllocationPolicy": "random"}}},
     "(invalid --shared-devices-allocation-policy option: random)"),
    ({"flags": {"deviceDiscoveryStrategy": "wsl"}},
     ("config file: flags.deviceDiscoveryStrategy: 'wsl' is not one of auto, nvml, tegra "
     "(invalid --device-discovery-strategy option wsl)")),
    ({"imex": {"channelIDs": [1]}},
     ("config file: imex.channelIDs: invalid IMEX channel IDs: invalid IMEX config: "
     "channelIDs must be [] or [0]; found [1]")),
    ({"imex": {"channelIDs": [0, 1]}}, "channelIDs must be [] or [0]; found [0 1]"),
    ({"imex": {"channelIDs": 0}}, "config file: imex.channelIDs: 0 is not a list"),
    ({"imex": {"channelIDs": ["0"]}}, ("config file: imex.channelIDs[0]: \"0\" is not an "
                                      "integer")),
    ({"flags": {"failOnInitError": "true"}},
     "config file: flags.failOnInitError: \"true\" is not a boolean (true or false)"),
    ({"flags": {"nvidiaDriverRoot": 5}}, ("config file: flags.nvidiaDriverRoot: 5 is not a "
                                         "string")),
    ({"flags": ["migStrategy"]}, "config file: flags: [\"migStrategy\"] is not a mapping"),
    (["version"], "config file: the document must be a mapping"),
    # MPS
    ({"flags": {"migStrategy": "mixed", "mpsRoot": "/mps"},
      "sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 2}]}}},
     "using --mig-strategy=mixed is not supported with MPS"),
    ({"sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 2}]}}},
     "using MPS requires --mps-root to be specified"),
    ({"flags": {"mpsRoot": ""}, "sharing": {"mps": {"resources": [{"name": "gpu",
                                                                    "replicas": 2}]}}},
     "using MPS requires --mps-root to be specified"),
    ({"flags": {"mpsRoot": "/mps"},
      "sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 2}]},
                  "timeSlicing": {"resources": [{"name": "gpu", "replicas": 2}]}}},
     "config file: sharing: Time-slicing and MPS are mutually exclusive"),
    # Sharing
    ({"sharing": {"timeSlicing": {"renameByDefault": True}}}, f"{TS}: no resources specified"),
    ({"sharing": {"timeSlicing": {"resources": []}}},
     f"{TS}.resources: no resources specified"),
    ({"sharing": {"timeSlicing": {"resources": [{"replicas": 2}]}}},
     f"{TS}.resources[0]: no resource name specified"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "gpu"}]}}},
     f"{TS}.resources[0]: no replicas specified"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": 1}]}}},
     f"{TS}.resources[0].replicas: number of replicas must be >= 2; found 1"),
    ({"sharing": {"timeSlicing": {"resources": [{"name": "gpu", "replicas": "4"}]}}},
     f"{TS}.resources[0].replicas: \"4\" is not an integer"),
    ({"sharing": {"timeSlicing": {"renameByDefault": "yes", "resources": []}}},
     f"{TS}.renameByDefault: \"yes\" is not a boolean"),
    # Devices
    (sharing_document(devices="some"),
     (f"{TS}.resources[0].devices: devices set as 'some' but the only valid string input "
     "is 'all'")),
    (sharing_document(devices=0),
     f"{TS}.resources[0].devices: devices set as '0' but a count of devices must be > 0"),
    (sharing_document(devices=-2), "devices set as '-2' but a count of devices must be > 0"),
    (sharing_document(devices=[0, "bogus"]),
     f"{TS}.resources[0].devices[1]: unsupported type for device in devices list: \"bogus\""),
    (sharing_document(devices=["GPU-1234"]), "unsupported type for device in devices list"),
    (sharing_document(devices=[-1]), "unsupported type for device in devices list: -1"),
    (sharing_document(devices={"count": 2}),
     f"{TS}.resources[0].devices: unrecognized type for devices spec: {{\"count\": 2}}"),
    (sharing_document(devices=True), "unrecognized type for devices spec: true"),
    (sharing_document(devices=[]), (f"{TS}.resources[0].devices: an empty list selects no "
                                   "devices")),
    # Resource names
    ({"sharing": {"timeSlicing": {"resources": [{"name": LONG, "replicas": 2}]}}},
     (f"{TS}.resources[0].name: fully-qualified resource name must be 63 characters or less: "
     f"nvidia.com/{LONG}")),
    (sharing_document(rename="Not_Valid"),
     (f"{TS}.resources[0].rename: incorrect format for resource name 'nvidia.com/Not_Valid': "
     "[a lowercase RFC 1123 subdomain must consist of")),
    ({"resources": {"gpus": [{"name": "gpu"}]}},
     "config file: resources.gpus[0]: resources must have a 'pattern' field set"),
    ({"resources": {"mig": [{"pattern": "1g.5gb"}]}},
     "config file: resources.mig[0]: resources must have a 'name' field set"),
    ({"resources": {"gpus": [{"pattern": "*", "name": "bad name"}]}},
     ("config file: resources.gpus[0].name: incorrect format for resource name "
     "'nvidia.com/bad name'")),
    # Tegra has no CDI
    ({"flags": {"deviceDiscoveryStrategy": "tegra",
                "plugin": {"deviceListStrategy": ["envvar", "cdi-cri"]}}},
     "CDI --device-list-strategy options are only supported on NVML-based systems"),
]


@pytest.mark.parametrize(("document", "message"), INVALID)
def test_invalid_documents(document: Any, message: str) -> None:
    assert message in error_of(document)


def test_errors_name_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^config file /etc/x.yaml: flags.migStrategy: "):
        resolve_config({}, {}, {"flags": {"migStrategy": "up"}}, source="config file /etc/x.yaml")


def test_only_the_value_in_force_is_checked_against_its_choices() -> None:
    # As NVIDIA: validateFlags runs on the merged values.
    document = {"flags": {"migStrategy": "sideways"}}
    assert resolve(["--mig-strategy=single"], document=document).flags.mig_strategy == "single"
    assert resolve(env={"MIG_STRATEGY": "mixed"}, document=document).flags.mig_strategy == \
        "mixed"
    # A wrong type is the file's own error, whatever overrides it (NVIDIA's unmarshal fails).
    assert "is not a boolean" in error_of({"flags": {"gdsEnabled": 1}}, ["--gds-enabled"])


def test_mps_root_from_the_command_line_or_env_satisfies_mps() -> None:
    document = {"sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 2}]}}}
    assert resolve(env={"MPS_ROOT": "/run/nvidia/mps"}, document=document).sharing.strategy == \
        "mps"
    assert "not supported with MPS" in error_of(
        document, ["--mig-strategy=mixed"], {"MPS_ROOT": "/m"})


def test_cdi_on_tegra_is_refused_and_check_platform_covers_auto() -> None:
    message = error_of(None, ["--device-discovery-strategy=tegra",
                              "--device-list-strategy=cdi-annotations"])
    assert message.startswith("CDI --device-list-strategy options are only supported on "
                              "NVML-based systems")
    config = resolve(["--device-list-strategy=envvar,cdi-cri"])
    check_platform(config, "nvml")
    with pytest.raises(ConfigError, match="only supported on NVML-based systems"):
        check_platform(config, "tegra")
    check_platform(resolve(), "tegra")


# --------------------------------------------------------------------------------------
# Unknown keys are warnings


def test_unknown_keys_are_warned_by_path_and_ignored() -> None:
    document = {
        "version": "v1",
        "flagz": {},
        "flags": {
            "migStrategy": "single",
            "plugin": {"deviceListStrategyy": "cdi-cri"},
            "gfd": {"oneshot": True, "sleepInterval": "60s"},
            "useNodeFeatureAPI": True,
        },
        "sharing": {"timeSlicing": {"strategy": "round-robin", "resources": [
            {"name": "gpu", "replicas": 2, "replica": 3}]}},
        "resources": {"gpus": [{"pattern": "*", "name": "gpu", "extra": 1}], "cpus": []},
        "imex": {"channelIds": [0]},
    }
    config, warnings = resolve_config({}, {}, document)
    assert warnings == [
        "config file: unknown key 'flagz' (ignored); did you mean 'flags'?",
        "config file: unknown key 'flags.plugin.deviceListStrategyy' (ignored); did you mean "
        "'flags.plugin.deviceListStrategy'?",
        "config file: unknown key 'imex.channelIds' (ignored); did you mean 'imex.channelIDs'?",
        "config file: unknown key 'resources.cpus' (ignored); did you mean 'resources.gpus'?",
        "config file: unknown key 'resources.gpus[0].extra' (ignored)",
        "config file: unknown key 'sharing.timeSlicing.strategy' (ignored)",
        "config file: unknown key 'sharing.timeSlicing.resources[0].replica' (ignored); did "
        "you mean 'sharing.timeSlicing.resources[0].replicas'?",
    ]
    assert config.flags.mig_strategy == "single"
    assert config.flags.use_node_feature_api is True
    assert config.flags.plugin.device_list_strategy == ("envvar",)
    assert config.imex.channel_ids == ()


def test_nulls_read_as_unset() -> None:
    document = {"version": None, "flags": {"migStrategy": None, "plugin": None},
                "sharing": {"timeSlicing": None, "mps": None}, "imex": None}
    assert resolve_config({}, {}, document) == (Config(), [])


# --------------------------------------------------------------------------------------
# Loading files


def test_json_config_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n\t"version": "v1",\n\t"flags": {"migStrategy": "single",\n\t\t'
                    '"plugin": {"deviceListStrategy": ["volume-mounts"]}}\n}\n')
    config = resolve(document=load_config_file(str(path)))
    assert config.flags.mig_strategy == "single"
    assert config.flags.plugin.device_list_strategy == ("volume-mounts",)


def test_bad_yaml_names_file_and_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: v1\nflags:\n  migStrategy: [none\n  plugin: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(str(path))
    message = str(info.value)
    assert message.startswith(f"config file {path}: invalid YAML at line ")
    assert re.search(r"line \d+, column \d+: ", message)
    path.write_text("version: v1\nflags:\n\tmigStrategy: none\n")
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: invalid YAML at line "
                                                    "3, column 1")):
        load_config_file(str(path))


def test_bad_json_names_file_and_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n\t"version": "v1"\n\t"flags": {}\n}\n')
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: invalid JSON at line "
                                                    "3, column 2: Expecting ',' delimiter")):
        load_config_file(str(path))


def test_empty_and_missing_files(tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert load_config_file(str(empty)) == {}
    config, warnings = resolve_config({}, {}, load_config_file(str(empty)),
                                      source=f"config file {empty}")
    assert config == Config()
    assert len(warnings) == 1 and warnings[0].startswith(f"config file {empty} is empty")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"config file {missing}: cannot read it")):
        load_config_file(str(missing))


@pytest.mark.parametrize("text", ["", "   \n\t\n", "# all commented out\n# migStrategy: mixed\n",
                                  "---\n", "null\n"])
def test_an_empty_config_file_warns_that_defaults_are_used(tmp_path: pathlib.Path,
                                                           text: str) -> None:
    # #14 item 6: a ConfigMap whose data key is empty (or all comments) is almost always
    # a mistake; the plugin still starts, on defaults, but says so.
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config, warnings = resolve_config({}, {}, load_config_file(str(path)),
                                      source=f"config file {path}")
    assert config == Config()
    assert warnings == [f"config file {path} is empty (or holds only comments): it configures "
                        "nothing; flags, environment variables and built-in defaults apply"]


def test_an_explicit_empty_mapping_is_not_an_empty_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{}\n")
    assert resolve_config({}, {}, load_config_file(str(path))) == (Config(), [])


def test_json_with_trailing_commas_is_read_as_nvidia_reads_it_and_warned_about(
        tmp_path: pathlib.Path) -> None:
    # NVIDIA's plugin reads the file with sigs.k8s.io/yaml (go-yaml), which takes a
    # trailing comma in a flow sequence or mapping, as YAML allows; so do we, but not
    # silently: json.loads refuses the file, and JSON tools would too (#14 item 6).
    path = tmp_path / "config.json"
    path.write_text('{\n'
                    '  "version": "v1",\n'
                    '  "flags": {"migStrategy": "single", "mpsRoot": "/run/a,]"},\n'
                    '  "sharing": {"timeSlicing": {"resources": [\n'
                    '    {"name": "gpu", "replicas": 2},\n'
                    '  ],},},\n'
                    '}\n')
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())
    config, warnings = resolve_config({}, {}, load_config_file(str(path)),
                                      source=f"config file {path}")
    assert config.flags.mig_strategy == "single"
    # The comma inside a string is the string's.
    assert config.flags.mps_root == "/run/a,]"
    assert config.sharing.time_slicing is not None
    assert config.sharing.time_slicing.resources[0].replicas == 2
    assert warnings == [f"config file {path}: trailing commas on lines 5, 6, which JSON does "
                        "not allow; read as YAML, which allows them (as NVIDIA's plugin reads "
                        "the file); remove them so that JSON tools can read it too"]
    path.write_text('{"version": "v1", "flags": {"migStrategy": "single"}}\n')
    assert resolve_config({}, {}, load_config_file(str(path)))[1] == []


@pytest.mark.parametrize(("document", "warning"), [
    # A typo at the right level: the closest valid key there.
    ({"flags": {"migStratgy": "single"}},
     "unknown key 'flags.migStratgy' (ignored); did you mean 'flags.migStrategy'?"),
    # camelCase with the wrong case.
    ({"flags": {"plugin": {"deviceIdStrategy": "index"}}},
     "unknown key 'flags.plugin.deviceIdStrategy' (ignored); did you mean "
     "'flags.plugin.deviceIDStrategy'?"),
    ({"sharing": {"timeslicing": {}}},
     "unknown key 'sharing.timeslicing' (ignored); did you mean 'sharing.timeSlicing'?"),
    ({"verison": "v1"}, "unknown key 'verison' (ignored); did you mean 'version'?"),
    # A valid key in the wrong section: where it belongs.
    ({"migStrategy": "mixed"},
     "unknown key 'migStrategy' (ignored); did you mean 'flags.migStrategy'? (that key "
     "belongs in 'flags')"),
    ({"flags": {"deviceListStrategy": "cdi-cri"}},
     "unknown key 'flags.deviceListStrategy' (ignored); did you mean "
     "'flags.plugin.deviceListStrategy'? (that key belongs in 'flags.plugin')"),
    # Nothing close: no guess.
    ({"flags": {"colour": "blue"}}, "unknown key 'flags.colour' (ignored)"),
])
def test_unknown_keys_suggest_the_key_that_was_meant(document: dict[str, Any],
                                                     warning: str) -> None:
    assert resolve_config({}, {}, document)[1] == [f"config file: {warning}"]


def test_pyyaml_is_imported_only_to_load_a_file() -> None:
    code = ("import sys, trio_gpu_plugin._config as c\n"
            "assert 'yaml' not in sys.modules\n"
            "c.resolve_config({}, {}, {'version': 'v1'})\n"
            "assert 'yaml' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------------------
# The effective configuration


def test_effective_config_json_uses_nvidias_key_names() -> None:
    document = json.loads(effective_config_json(Config()))
    assert list(document) == ["version", "flags", "resources", "sharing", "imex"]
    assert set(document["flags"]) == {
        "migStrategy", "failOnInitError", "nvidiaDriverRoot", "gdrcopyEnabled", "gdsEnabled",
        "mofedEnabled", "useNodeFeatureAPI", "deviceDiscoveryStrategy", "plugin",
        "healthRecoveryWindow", "healthProbeInterval"}
    assert set(document["flags"]["plugin"]) == {
        "passDeviceSpecs", "deviceListStrategy", "deviceIDStrategy", "cdiAnnotationPrefix",
        "nvidiaCTKPath", "containerDriverRoot", "sharedDevicesAllocationPolicy", "cdiKind"}
    assert document["flags"]["plugin"]["deviceListStrategy"] == ["envvar"]
    assert document["imex"] == {"channelIDs": [], "required": False}
    assert "\n" not in effective_config_json(Config())
    assert "\n" in effective_config_json(Config(), indent=2)


def test_effective_config_round_trips() -> None:
    document = {
        "flags": {"migStrategy": "single", "nvidiaDevRoot": "/host", "mpsRoot": "/mps",
                  "healthProbeInterval": "250ms",
                  "plugin": {"deviceListStrategy": ["cdi-cri", "envvar"], "cdiKind": "x.com/y"}},
        "resources": {"gpus": [{"pattern": "*", "name": "gpu"}]},
        "sharing": {"mps": {"renameByDefault": True, "resources": [
            {"name": "gpu", "replicas": 3, "devices": [0, "1"]},
            {"name": "gpu", "replicas": 5, "devices": 1, "rename": "gpu-big"}]}},
        "imex": {"channelIDs": [0], "required": True},
    }
    config, _ = resolve_config({}, {}, document)
    text = effective_config_json(config)
    again, warnings = resolve_config({}, {}, json.loads(text))
    assert warnings == []
    assert again == config
    shown = json.loads(text)
    assert shown["sharing"]["mps"]["resources"][0] == {
        "name": "nvidia.com/gpu", "rename": "nvidia.com/gpu.shared", "devices": ["0", "1"],
        "replicas": 3}
    assert shown["sharing"]["mps"]["resources"][1]["devices"] == 1
    assert "failRequestsGreaterThanOne" not in shown["sharing"]["mps"]
    assert config_to_document(config) == shown


# --------------------------------------------------------------------------------------
# Property: a list of strategies reads the same from every source


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(DEVICE_LIST_STRATEGIES), min_size=1, max_size=6))
def test_strategy_lists_read_the_same_everywhere(strategies: list[str]) -> None:
    expected = tuple(dict.fromkeys(strategies))
    joined = ",".join(strategies)
    from_file = resolve(document={"flags": {"plugin": {"deviceListStrategy": strategies}}})
    from_env = resolve(env={"DEVICE_LIST_STRATEGY": joined})
    from_cli = resolve([f"--device-list-strategy={joined}"])
    from_repeats = resolve([f"--device-list-strategy={s}" for s in strategies])
    for config in (from_file, from_env, from_cli, from_repeats):
        assert config.flags.plugin.device_list_strategy == expected
    shown = json.loads(effective_config_json(from_cli))
    assert shown["flags"]["plugin"]["deviceListStrategy"] == list(expected)
