"""Allocate contents, golden: expected messages written from NVIDIA's behaviour
(NVIDIA's k8s-device-plugin: its Allocate
response builders and device-list strategies), compared whole."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import pytest

from trio_gpu_plugin._allocate import (
    AllocateContext,
    allocate,
    cdi_annotation_key,
    cdi_qualified_name,
    cdi_spec_declares,
    cdi_warning,
    container_response,
    default_annotation_key,
    existing_control_nodes,
    find_missing_cdi_devices,
    required_cdi_devices,
    runtime_ids,
    validate_cdi_kind,
    validate_request,
)
from trio_gpu_plugin._config import Config, Flags, PluginFlags
from trio_gpu_plugin._grpc import RpcError, StatusCode
from trio_gpu_plugin._plan_model import PlannedDevice, PlannedResource
from trio_gpu_plugin.proto.v1beta1 import (
    AllocateResponse,
    CDIDevice,
    ContainerAllocateResponse,
    DeviceSpec,
    Mount,
)

GPU0 = "GPU-8f6b2c1e-0d4a-4b7e-9c3f-1a2b3c4d5e6f"
GPU1 = "GPU-8f0e9d8c-7b6a-4f5e-8d4c-3b2a1f0e9d8c"
MIG_A = "MIG-5c1d2e3f-4a5b-5c6d-8e7f-901a2b3c4d5e"
MIG_B = "MIG-6d2e3f4a-5b6c-5d7e-9f80-a12b3c4d5e6f"
KEY = "nvidia-device-plugin_0b7e5c3a-2f1d-4e6b-9a8c-7d6e5f4a3b2c"
VM = "/var/run/nvidia-container-devices"


def gpu(uuid: str, index: int, replica: int | None = None) -> PlannedDevice:
    return PlannedDevice(
        id=uuid if replica is None else f"{uuid}::{replica}",
        uuid=uuid, index=str(index), replica=replica, units=(uuid,), numa_nodes=(0,),
        paths=(f"/dev/nvidia{index}",),
    )


def mig(uuid: str, index: str, caps: tuple[int, int]) -> PlannedDevice:
    return PlannedDevice(
        id=uuid, uuid=uuid, index=index, replica=None, units=(uuid,), numa_nodes=(0,),
        paths=("/dev/nvidia2", f"/dev/nvidia-caps/nvidia-cap{caps[0]}",
               f"/dev/nvidia-caps/nvidia-cap{caps[1]}"),
    )


GPUS = PlannedResource("nvidia.com/gpu", "nvidia-gpu.sock", (gpu(GPU0, 0), gpu(GPU1, 1)))
MIGS = PlannedResource("nvidia.com/mig-1g.5gb", "nvidia-mig-1g.5gb.sock",
                       (mig(MIG_A, "2:0", (21, 22)), mig(MIG_B, "2:1", (30, 31))))
SHARED = PlannedResource(
    "nvidia.com/gpu.shared", "nvidia-gpu.shared.sock",
    tuple(gpu(u, i, r) for u, i in ((GPU0, 0), (GPU1, 1)) for r in (0, 1)),
    sharing="time-slicing",
)
MPS = PlannedResource("nvidia.com/gpu", "nvidia-gpu.sock",
                      tuple(gpu(GPU0, 0, r) for r in range(4)),
                      sharing="mps", fail_requests_greater_than_one=True)


def context(
    strategies: tuple[str, ...] = ("envvar",),
    id_strategy: str = "uuid",
    *,
    pass_device_specs: bool = False,
    prefix: str = "cdi.k8s.io/",
    cdi_kind: str = "nvidia.com/gpu",
    driver_root: str = "/",
    dev_root: str | None = None,
    mps_root: str | None = None,
    gdrcopy: bool = False,
    gds: bool = False,
    mofed: bool = False,
    control_nodes: tuple[str, ...] = (),
    imex_channels: tuple[int, ...] = (),
) -> AllocateContext:
    plugin = PluginFlags(pass_device_specs=pass_device_specs, device_list_strategy=strategies,
                         device_id_strategy=id_strategy, cdi_annotation_prefix=prefix,
                         cdi_kind=cdi_kind)
    flags = Flags(nvidia_driver_root=driver_root, nvidia_dev_root=dev_root, mps_root=mps_root,
                  gdrcopy_enabled=gdrcopy, gds_enabled=gds, mofed_enabled=mofed, plugin=plugin)
    return AllocateContext(config=Config(flags=flags), control_nodes=control_nodes,
                           imex_channels=imex_channels, annotation_key=lambda: KEY)


def spec(path: str, root: str = "") -> DeviceSpec:
    return DeviceSpec(container_path=path, host_path=root + path, permissions="rw")


def vm_mount(name: str) -> Mount:
    return Mount(container_path=f"{VM}/{name}", host_path="/dev/null")


# --- NVIDIA's own unit test and the envvar strategy ------------------------------------


def test_nvidia_server_test_replicated_ids_give_only_the_env() -> None:
    resource = PlannedResource("nvidia.com/gpu", "nvidia-gpu.sock",
                               (gpu("foo", 0), gpu("bar", 1)))
    response = container_response(resource, ["foo", "bar", "foo"], context())
    assert response == ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": "foo,bar"})


def test_envvar_uuid_keeps_request_order() -> None:
    assert container_response(GPUS, [GPU1, GPU0], context()) == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": f"{GPU1},{GPU0}"})


def test_envvar_index_strategy_gives_indexes() -> None:
    assert container_response(GPUS, [GPU1, GPU0], context(id_strategy="index")) == (
        ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": "1,0"}))


def test_envvar_index_strategy_for_mig_devices() -> None:
    assert container_response(MIGS, [MIG_A, MIG_B], context(id_strategy="index")) == (
        ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": "2:0,2:1"}))


# --- volume-mounts --------------------------------------------------------------------


def test_volume_mounts() -> None:
    response = container_response(GPUS, [GPU0, GPU1], context(("volume-mounts",)))
    assert response == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": VM},
        mounts=[vm_mount(GPU0), vm_mount(GPU1)],
    )


def test_volume_mounts_index_strategy_mig() -> None:
    response = container_response(MIGS, [MIG_B], context(("volume-mounts",), "index"))
    assert response == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": VM}, mounts=[vm_mount("2:1")])


@pytest.mark.parametrize("strategies", [("envvar", "volume-mounts"), ("volume-mounts", "envvar")])
def test_envvar_and_volume_mounts_env_comes_from_volume_mounts(strategies: tuple[str, ...]) -> None:
    # NVIDIA writes envvar first, volume-mounts second, whatever the flag order.
    response = container_response(GPUS, [GPU0], context(strategies))
    assert response == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": VM}, mounts=[vm_mount(GPU0)])


# --- CDI ------------------------------------------------------------------------------


def test_cdi_annotations_default_prefix_uuid() -> None:
    response = container_response(GPUS, [GPU0, GPU1], context(("cdi-annotations",)))
    assert response == ContainerAllocateResponse(annotations={
        f"cdi.k8s.io/{KEY}": f"nvidia.com/gpu={GPU0},nvidia.com/gpu={GPU1}",
    })


def test_cdi_annotations_custom_prefix_index_strategy() -> None:
    ctx = context(("cdi-annotations",), "index", prefix="nvidia.cdi.k8s.io/")
    assert container_response(GPUS, [GPU1, GPU0], ctx) == ContainerAllocateResponse(
        annotations={f"nvidia.cdi.k8s.io/{KEY}": "nvidia.com/gpu=1,nvidia.com/gpu=0"})


def test_cdi_kind_override_and_mig_index_names() -> None:
    ctx = context(("cdi-annotations",), "index", cdi_kind="example.com/accel")
    assert container_response(MIGS, [MIG_A, MIG_B], ctx) == ContainerAllocateResponse(
        annotations={f"cdi.k8s.io/{KEY}": "example.com/accel=2:0,example.com/accel=2:1"})


def test_cdi_cri() -> None:
    response = container_response(GPUS, [GPU0, GPU1], context(("cdi-cri",)))
    assert response == ContainerAllocateResponse(cdi_devices=[
        CDIDevice(name=f"nvidia.com/gpu={GPU0}"), CDIDevice(name=f"nvidia.com/gpu={GPU1}")])


def test_cdi_annotations_and_cdi_cri() -> None:
    response = container_response(GPUS, [GPU1], context(("cdi-annotations", "cdi-cri"), "index"))
    assert response == ContainerAllocateResponse(
        annotations={f"cdi.k8s.io/{KEY}": "nvidia.com/gpu=1"},
        cdi_devices=[CDIDevice(name="nvidia.com/gpu=1")],
    )


def test_envvar_and_cdi_annotations_set_both_and_device_specs() -> None:
    ctx = context(("envvar", "cdi-annotations"), pass_device_specs=True)
    assert container_response(GPUS, [GPU0], ctx) == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": GPU0},
        annotations={f"cdi.k8s.io/{KEY}": f"nvidia.com/gpu={GPU0}"},
        devices=[spec("/dev/nvidia0")],
    )


def test_only_cdi_strategies_pass_no_device_specs_but_keep_gds_env() -> None:
    ctx = context(("cdi-cri",), pass_device_specs=True, gds=True,
                  control_nodes=("/dev/nvidiactl",), imex_channels=(0,))
    assert container_response(GPUS, [GPU0], ctx) == ContainerAllocateResponse(
        envs={"NVIDIA_GDS": "enabled"},
        cdi_devices=[CDIDevice(name=f"nvidia.com/gpu={GPU0}"),
                     CDIDevice(name="nvidia.com/imex-channel=0")],
    )


def test_cdi_replicas_name_the_gpu_once() -> None:
    response = container_response(SHARED, [f"{GPU0}::0", f"{GPU0}::1"], context(("cdi-cri",)))
    assert response == ContainerAllocateResponse(
        cdi_devices=[CDIDevice(name=f"nvidia.com/gpu={GPU0}")])


def test_default_annotation_key_is_nvidias_and_fresh_each_time() -> None:
    ctx = dataclasses.replace(context(("cdi-annotations",)), annotation_key=default_annotation_key)
    keys = [next(iter(container_response(GPUS, [GPU0], ctx).annotations)) for _ in range(2)]
    for key in keys:
        assert re.fullmatch(r"cdi\.k8s\.io/nvidia-device-plugin_[0-9a-f]{8}(-[0-9a-f]{4}){3}"
                            r"-[0-9a-f]{12}", key)
    assert keys[0] != keys[1]


def test_bad_annotation_key_fails_with_cdis_wording() -> None:
    ctx = dataclasses.replace(context(("cdi-annotations",)), annotation_key=lambda: "x" * 64)
    with pytest.raises(ValueError, match="too long"):
        container_response(GPUS, [GPU0], ctx)
    assert cdi_annotation_key("p/", "a" * 63) == "p/" + "a" * 63
    for bad, what in (("-a", "first '-'"), ("a/b", "invalid character '/'"),
                      ("ab_", "last '_'"), ("", "empty")):
        with pytest.raises(ValueError, match=what):
            cdi_annotation_key("cdi.k8s.io/", bad)


def test_cdi_names_are_checked_as_cdi_parses_them() -> None:
    assert cdi_qualified_name("nvidia.com/gpu", "0:1") == "nvidia.com/gpu=0:1"
    assert cdi_qualified_name("a/b", "x") == "a/b=x"
    for kind in ("nvidia.com", "/gpu", "nvidia.com/", "1nvidia.com/gpu", "nvidia.com/gpu-",
                 "nvidia.com/g/pu"):
        with pytest.raises(ValueError):
            validate_cdi_kind(kind)
    for name in ("", "-0", "0-", "MIG-GPU-8f/1/0", "ü"):
        with pytest.raises(ValueError):
            cdi_qualified_name("nvidia.com/gpu", name)
    ctx = context(("cdi-cri",), cdi_kind="nvidia.com")
    with pytest.raises(ValueError, match="does not contain a /"):
        container_response(GPUS, [GPU0], ctx)


# --- passDeviceSpecs ------------------------------------------------------------------


def test_device_specs_existing_control_nodes_then_gpus_default_root() -> None:
    ctx = context(pass_device_specs=True, control_nodes=("/dev/nvidiactl", "/dev/nvidia-uvm"))
    assert container_response(GPUS, [GPU1, GPU0], ctx) == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": f"{GPU1},{GPU0}"},
        devices=[spec("/dev/nvidiactl"), spec("/dev/nvidia-uvm"), spec("/dev/nvidia1"),
                 spec("/dev/nvidia0")],
    )


def test_device_specs_host_paths_under_the_driver_root() -> None:
    ctx = context(pass_device_specs=True, driver_root="/run/nvidia/driver",
                  control_nodes=("/dev/nvidia-uvm-tools",))
    assert container_response(GPUS, [GPU0], ctx) == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": GPU0},
        devices=[spec("/dev/nvidia-uvm-tools", "/run/nvidia/driver"),
                 spec("/dev/nvidia0", "/run/nvidia/driver")],
    )


def test_device_specs_dev_root_overrides_the_driver_root() -> None:
    ctx = context(pass_device_specs=True, driver_root="/run/nvidia/driver", dev_root="/host/",
                  control_nodes=("/dev/nvidiactl",))
    assert container_response(GPUS, [GPU0], ctx).devices == [
        spec("/dev/nvidiactl", "/host"), spec("/dev/nvidia0", "/host")]


def test_device_specs_mig_parent_and_caps_once() -> None:
    ctx = context(pass_device_specs=True, control_nodes=("/dev/nvidiactl",))
    assert container_response(MIGS, [MIG_A, MIG_B], ctx) == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": f"{MIG_A},{MIG_B}"},
        devices=[spec("/dev/nvidiactl"), spec("/dev/nvidia2"),
                 spec("/dev/nvidia-caps/nvidia-cap21"), spec("/dev/nvidia-caps/nvidia-cap22"),
                 spec("/dev/nvidia-caps/nvidia-cap30"), spec("/dev/nvidia-caps/nvidia-cap31")],
    )


def test_replicas_of_one_gpu_are_named_once_everywhere() -> None:
    ids = [f"{GPU0}::0", f"{GPU1}::1", f"{GPU0}::1"]
    ctx = context(("envvar", "volume-mounts"), pass_device_specs=True)
    assert container_response(SHARED, ids, ctx) == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": VM},
        mounts=[vm_mount(GPU0), vm_mount(GPU1)],
        devices=[spec("/dev/nvidia0"), spec("/dev/nvidia1")],
    )
    assert container_response(SHARED, ids, context(id_strategy="index")) == (
        ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": "0,1"}))


# --- MPS, GDRCOPY/GDS/MOFED, IMEX -----------------------------------------------------


def test_mps_env_and_mounts() -> None:
    ctx = context(mps_root="/run/nvidia/mps")
    assert container_response(MPS, [f"{GPU0}::2"], ctx) == ContainerAllocateResponse(
        envs={"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe",
              "NVIDIA_VISIBLE_DEVICES": GPU0},
        mounts=[Mount(container_path="/mps/nvidia.com/gpu/pipe",
                      host_path="/run/nvidia/mps/nvidia.com/gpu/pipe"),
                Mount(container_path="/dev/shm", host_path="/run/nvidia/mps/shm")],
    )


def test_mps_mounts_come_before_volume_mounts() -> None:
    ctx = context(("volume-mounts",), mps_root="/run/nvidia/mps")
    assert container_response(MPS, [f"{GPU0}::0"], ctx).mounts == [
        Mount(container_path="/mps/nvidia.com/gpu/pipe",
              host_path="/run/nvidia/mps/nvidia.com/gpu/pipe"),
        Mount(container_path="/dev/shm", host_path="/run/nvidia/mps/shm"),
        vm_mount(GPU0),
    ]


def test_mps_with_cdi_only_still_gets_mps_parts() -> None:
    ctx = context(("cdi-cri",), mps_root="/run/nvidia/mps")
    response = container_response(MPS, [f"{GPU0}::0"], ctx)
    assert response.envs == {"CUDA_MPS_PIPE_DIRECTORY": "/mps/nvidia.com/gpu/pipe"}
    assert len(response.mounts) == 2


def test_mps_without_root_fails() -> None:
    with pytest.raises(ValueError, match="using MPS requires --mps-root to be specified"):
        container_response(MPS, [f"{GPU0}::0"], context())


def test_gdrcopy_gds_mofed_envs() -> None:
    ctx = context(gdrcopy=True, gds=True, mofed=True)
    assert container_response(GPUS, [GPU0], ctx) == ContainerAllocateResponse(envs={
        "NVIDIA_VISIBLE_DEVICES": GPU0, "NVIDIA_GDRCOPY": "enabled", "NVIDIA_GDS": "enabled",
        "NVIDIA_MOFED": "enabled"})
    only_mofed = context(("cdi-annotations",), mofed=True)
    assert container_response(GPUS, [GPU0], only_mofed) == ContainerAllocateResponse(
        envs={"NVIDIA_MOFED": "enabled"},
        annotations={f"cdi.k8s.io/{KEY}": f"nvidia.com/gpu={GPU0}"})


def test_imex_envvar_volume_mounts_and_device_specs() -> None:
    ctx = context(imex_channels=(0,))
    assert container_response(GPUS, [GPU0], ctx) == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": GPU0, "NVIDIA_IMEX_CHANNELS": "0"})
    ctx = context(("volume-mounts",), imex_channels=(0,), pass_device_specs=True,
                  driver_root="/run/nvidia/driver")
    assert container_response(GPUS, [GPU0], ctx) == ContainerAllocateResponse(
        envs={"NVIDIA_VISIBLE_DEVICES": VM},
        mounts=[vm_mount(GPU0), vm_mount("imex/0")],
        devices=[spec("/dev/nvidia0", "/run/nvidia/driver"),
                 spec("/dev/nvidia-caps-imex-channels/channel0", "/run/nvidia/driver")],
    )


def test_imex_cdi_annotation() -> None:
    ctx = context(("cdi-annotations",), "index", imex_channels=(0,))
    assert container_response(GPUS, [GPU0], ctx) == ContainerAllocateResponse(
        annotations={f"cdi.k8s.io/{KEY}": "nvidia.com/gpu=0,nvidia.com/imex-channel=0"})


# --- validation and the whole call ----------------------------------------------------


def test_unknown_device_is_refused_with_nvidias_wording() -> None:
    with pytest.raises(RpcError) as caught:
        validate_request(GPUS, [GPU0, "GPU-nope"])
    assert caught.value.code == StatusCode.INVALID_ARGUMENT
    assert caught.value.message == (
        'invalid allocation request for "nvidia.com/gpu": invalid request: '
        "unknown device: GPU-nope")


def test_more_than_one_replica_when_forbidden() -> None:
    with pytest.raises(RpcError) as caught:
        validate_request(MPS, [f"{GPU0}::0", f"{GPU0}::1", f"{GPU0}::2"])
    assert caught.value.code == StatusCode.INVALID_ARGUMENT
    assert caught.value.message == (
        'invalid allocation request for "nvidia.com/gpu": invalid request: '
        "maximum request size for shared resources is 1; found 3")


def test_unknown_device_is_reported_before_the_size_limit() -> None:
    with pytest.raises(RpcError, match="unknown device: x"):
        validate_request(MPS, [f"{GPU0}::0", "x"])


def test_replica_requests_that_are_allowed() -> None:
    validate_request(MPS, [f"{GPU0}::0"])
    validate_request(SHARED, [f"{GPU0}::0", f"{GPU1}::0"])  # time-slicing, flag false
    strict = dataclasses.replace(SHARED, fail_requests_greater_than_one=True)
    with pytest.raises(RpcError, match="found 2"):
        validate_request(strict, [f"{GPU0}::0", f"{GPU1}::0"])
    unshared = dataclasses.replace(strict, sharing="none")
    validate_request(unshared, [f"{GPU0}::0", f"{GPU1}::0"])
    validate_request(GPUS, [GPU0, GPU1])


def test_allocate_answers_each_container_and_fails_whole() -> None:
    ctx = context()
    assert allocate(GPUS, [[GPU0], [GPU1]], ctx) == AllocateResponse(container_responses=[
        ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": GPU0}),
        ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": GPU1}),
    ])
    with pytest.raises(RpcError, match="unknown device: bad"):
        allocate(GPUS, [[GPU0], ["bad"]], ctx)


def test_runtime_ids() -> None:
    ids = [f"{GPU1}::0", f"{GPU0}::1", f"{GPU1}::1"]
    assert runtime_ids(SHARED, ids, "uuid") == [GPU1, GPU0]
    assert runtime_ids(SHARED, ids, "index") == ["1", "0"]
    with pytest.raises(ValueError, match="invalid --device-id-strategy option: serial"):
        runtime_ids(SHARED, ids, "serial")
    with pytest.raises(ValueError):
        runtime_ids(SHARED, ["nope"], "index")


# --- start-up facts: control nodes and CDI specs --------------------------------------


def test_existing_control_nodes(tmp_path: pathlib.Path) -> None:
    assert existing_control_nodes(str(tmp_path)) == ()
    (tmp_path / "dev").mkdir()
    for name in ("nvidia-modeset", "nvidiactl", "nvidia0"):
        (tmp_path / "dev" / name).touch()
    assert existing_control_nodes(str(tmp_path)) == ("/dev/nvidiactl", "/dev/nvidia-modeset")
    assert existing_control_nodes(str(tmp_path) + "/") == ("/dev/nvidiactl", "/dev/nvidia-modeset")


def test_cdi_spec_declares() -> None:
    document = {"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
                "devices": [{"name": "0"}, {"name": GPU0}, {"name": "all"}, {"x": 1}, "junk",
                            {"name": ["unhashable"]}]}
    assert cdi_spec_declares(document, "nvidia.com/gpu", ["0", "1", GPU0, GPU1]) == {"0", GPU0}
    assert cdi_spec_declares(document, "example.com/gpu", ["0"]) == set()
    assert cdi_spec_declares(None, "nvidia.com/gpu", ["0"]) == set()
    assert cdi_spec_declares([document], "nvidia.com/gpu", ["0"]) == set()
    assert cdi_spec_declares({"kind": "nvidia.com/gpu", "devices": "0"}, "nvidia.com/gpu",
                             ["0"]) == set()


NVIDIA_CTK_YAML = f"""\
---
cdiVersion: 0.5.0
containerEdits:
  deviceNodes:
  - path: /dev/nvidiactl
devices:
- containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
  name: "0"
- containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
  name: {GPU0}
- containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
  name: all
kind: nvidia.com/gpu
"""


def test_find_missing_cdi_devices_reads_yaml_and_json_specs(tmp_path: pathlib.Path) -> None:
    etc = tmp_path / "etc" / "cdi"
    run = tmp_path / "var" / "run" / "cdi"
    etc.mkdir(parents=True)
    run.mkdir(parents=True)
    (etc / "nvidia.yaml").write_text(NVIDIA_CTK_YAML)
    (run / "other.json").write_text(json.dumps(
        {"cdiVersion": "0.6.0", "kind": "nvidia.com/gpu", "devices": [{"name": GPU1}]}))
    (run / "broken.yaml").write_text("kind: [unclosed\n")
    (run / "broken.json").write_text("{")
    (run / "ignored.txt").write_text(json.dumps(
        {"kind": "nvidia.com/gpu", "devices": [{"name": "1"}]}))
    searched, missing = find_missing_cdi_devices(str(tmp_path), "nvidia.com/gpu",
                                                 ["0", "1", GPU0, GPU1, "all", "1"])
    assert searched == [str(etc), str(run)]
    assert missing == ["1"]
    _, missing = find_missing_cdi_devices(str(tmp_path), "example.com/gpu", ["0"])
    assert missing == ["0"]


def test_find_missing_cdi_devices_with_no_directories(tmp_path: pathlib.Path) -> None:
    searched, missing = find_missing_cdi_devices(str(tmp_path), "nvidia.com/gpu", [GPU0, GPU1])
    assert searched == [f"{tmp_path}/etc/cdi", f"{tmp_path}/var/run/cdi"]
    assert missing == [GPU0, GPU1]
    searched, _ = find_missing_cdi_devices("/", "nvidia.com/gpu", [])
    assert searched == ["/etc/cdi", "/var/run/cdi"]


def test_cdi_warning() -> None:
    assert cdi_warning("nvidia.com/gpu", [], ["/etc/cdi", "/var/run/cdi"]) is None
    text = cdi_warning("nvidia.com/gpu", ["0", "1", "2", "3", "4"],
                       ["/driver/etc/cdi", "/driver/var/run/cdi"])
    assert text is not None
    for part in ("nvidia.com/gpu=0, nvidia.com/gpu=1, nvidia.com/gpu=2 and 2 more",
                 "/driver/etc/cdi", "/driver/var/run/cdi",
                 "nvidia-ctk cdi generate --output=/var/run/cdi/nvidia.yaml", "--cdi-kind"):
        assert part in text
    one = cdi_warning("example.com/gpu", [GPU0], ["/etc/cdi", "/var/run/cdi"])
    assert one is not None and f"example.com/gpu={GPU0};" in one and "more" not in one


def test_required_cdi_devices() -> None:
    assert required_cdi_devices(GPUS, context()) == {}
    assert required_cdi_devices(SHARED, context(("envvar", "cdi-cri"))) == {
        "nvidia.com/gpu": [GPU0, GPU1]}
    ctx = context(("cdi-annotations",), "index", imex_channels=(0,))
    assert required_cdi_devices(MIGS, ctx) == {
        "nvidia.com/gpu": ["2:0", "2:1"], "nvidia.com/imex-channel": ["0"]}
