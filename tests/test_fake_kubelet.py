"""The fake kubelet behaves like kubelet 1.25–1.36 (pkg/kubelet/cm/devicemanager/).

Every test drives :class:`~trio_gpu_plugin.testing.FakeKubelet` with :class:`Plugin`, a
minimal device plugin written directly on ``serve_unix`` and ``open_unix_channel`` (no
plugin runtime), so what is pinned here is the fake's side of the protocol: what it
accepts, the exact texts it answers with, and what it does to the plugin's streams.

Time bounds are hang guards, never timing asserts.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

import pytest
import trio

from trio_gpu_plugin import RpcError, Service, StatusCode, open_unix_channel, serve_unix
from trio_gpu_plugin.proto import v1beta1
from trio_gpu_plugin.testing import (
    AdmissionError,
    FakeKubelet,
    PreStartError,
    RegistrationRecord,
)

HANG_GUARD = 10.0
GPU = "nvidia.com/gpu"


def gpus(n: int, health: str = v1beta1.HEALTHY) -> list[v1beta1.Device]:
    return [
        v1beta1.Device(ID=f"GPU-{i}", health=health,
                       topology=v1beta1.TopologyInfo(nodes=[v1beta1.NUMANode(ID=i % 2)]))
        for i in range(n)
    ]


class Plugin:
    """A minimal device plugin: serves the DevicePlugin service, registers, records calls.

    Tests set the answers (``preferred``, ``allocate_error``, ...) before the calls come.
    """

    def __init__(
        self,
        path: pathlib.Path,
        devices: list[v1beta1.Device] | None = None,
        *,
        options: v1beta1.DevicePluginOptions | None = None,
        implement_options: bool = True,
    ) -> None:
        self.path = path
        self.devices = gpus(4) if devices is None else devices
        self.options = options or v1beta1.DevicePluginOptions()
        self.implement_options = implement_options
        self.options_error: RpcError | None = None
        self.options_gate: trio.Event | None = None  # GetDevicePluginOptions waits for it
        self.calls: list[str] = []
        self.registering = False  # a Register call of ours is in flight
        self.options_during_register: list[bool] = []
        self.watch_during_register: list[bool] = []
        self.watch_error: RpcError | None = None
        self.streams_cancelled = 0
        self.stream_cancelled = trio.Event()
        self.preferred: list[str] | None = None  # None: answer no container response
        self.preferred_error: RpcError | None = None
        self.preferred_requests: list[v1beta1.PreferredAllocationRequest] = []
        self.allocate_requests: list[v1beta1.AllocateRequest] = []
        self.allocate_error: RpcError | None = None
        self.allocate_empty = False
        self.pre_start_requests: list[v1beta1.PreStartContainerRequest] = []
        self.pre_start_error: RpcError | None = None
        self._version = 0
        self._ends = 0
        self._changed = trio.Event()

    # --- the plugin's side of the API -------------------------------------------------

    def service(self) -> Service:
        handlers: dict[str, Any] = {
            "ListAndWatch": self._list_and_watch,
            "GetPreferredAllocation": self._get_preferred_allocation,
            "Allocate": self._allocate,
            "PreStartContainer": self._pre_start_container,
        }
        if self.implement_options:
            handlers["GetDevicePluginOptions"] = self._get_options
        return Service(v1beta1.DEVICE_PLUGIN, handlers)

    async def serve(self, nursery: trio.Nursery) -> None:
        """Serve the socket (again, after a kubelet restart removed it)."""
        await nursery.start(serve_unix, self.path, [self.service()])

    async def register(
        self, kubelet: FakeKubelet, resource: str = GPU, *, version: str = v1beta1.VERSION,
        endpoint: str | None = None, timeout: float = HANG_GUARD,
    ) -> None:
        request = v1beta1.RegisterRequest(
            version=version, endpoint=self.path.name if endpoint is None else endpoint,
            resource_name=resource, options=self.options)
        self.registering = True
        try:
            async with open_unix_channel(kubelet.kubelet_socket, connect_timeout=HANG_GUARD) as ch:
                await ch.unary(v1beta1.REGISTRATION, "Register", request, timeout=timeout)
        finally:
            self.registering = False

    def publish(self, devices: list[v1beta1.Device]) -> None:
        """Send a new device list on every open stream."""
        self.devices = devices
        self._version += 1
        self._wake()

    def end_streams(self) -> None:
        """End every open ListAndWatch stream with status OK."""
        self._ends += 1
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _get_options(self, request: v1beta1.Empty) -> v1beta1.DevicePluginOptions:
        self.calls.append("GetDevicePluginOptions")
        self.options_during_register.append(self.registering)
        if self.options_gate is not None:
            await self.options_gate.wait()
        if self.options_error is not None:
            raise self.options_error
        return self.options

    async def _list_and_watch(
        self, request: v1beta1.Empty, send: Callable[[Any], Awaitable[None]]
    ) -> None:
        self.calls.append("ListAndWatch")
        self.watch_during_register.append(self.registering)
        ends = self._ends
        try:
            while True:
                version = self._version
                await send(v1beta1.ListAndWatchResponse(devices=list(self.devices)))
                if self.watch_error is not None:
                    raise self.watch_error
                while self._version == version and self._ends == ends:
                    await self._changed.wait()
                if self._ends != ends:
                    return
        except trio.Cancelled:
            self.streams_cancelled += 1
            self.stream_cancelled.set()
            raise

    async def _get_preferred_allocation(
        self, request: v1beta1.PreferredAllocationRequest
    ) -> v1beta1.PreferredAllocationResponse:
        self.calls.append("GetPreferredAllocation")
        self.preferred_requests.append(request)
        if self.preferred_error is not None:
            raise self.preferred_error
        if self.preferred is None:
            return v1beta1.PreferredAllocationResponse()
        return v1beta1.PreferredAllocationResponse(container_responses=[
            v1beta1.ContainerPreferredAllocationResponse(deviceIDs=list(self.preferred))])

    async def _allocate(self, request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        self.calls.append("Allocate")
        self.allocate_requests.append(request)
        if self.allocate_error is not None:
            raise self.allocate_error
        if self.allocate_empty:
            return v1beta1.AllocateResponse()
        ids = request.container_requests[0].devices_ids
        return v1beta1.AllocateResponse(container_responses=[
            v1beta1.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": ",".join(ids)})])

    async def _pre_start_container(
        self, request: v1beta1.PreStartContainerRequest
    ) -> v1beta1.PreStartContainerResponse:
        self.calls.append("PreStartContainer")
        self.pre_start_requests.append(request)
        if self.pre_start_error is not None:
            raise self.pre_start_error
        return v1beta1.PreStartContainerResponse()


class StartKubelet(Protocol):
    async def __call__(self, *, dial_timeout: float = ..., stale_stream_teardown: bool = ...
                       ) -> FakeKubelet: ...


@pytest.fixture
def start_kubelet(nursery: trio.Nursery, socket_dir: pathlib.Path) -> StartKubelet:
    async def start(*, dial_timeout: float = 10.0, stale_stream_teardown: bool = True
                    ) -> FakeKubelet:
        kubelet = FakeKubelet(socket_dir, dial_timeout=dial_timeout,
                              stale_stream_teardown=stale_stream_teardown)
        await nursery.start(kubelet.run)
        return kubelet

    return start


@pytest.fixture
async def kubelet(start_kubelet: StartKubelet) -> AsyncIterator[FakeKubelet]:
    yield await start_kubelet()


@pytest.fixture
def other_dir() -> Iterator[pathlib.Path]:
    path = pathlib.Path(tempfile.mkdtemp(prefix="tgp-o-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def served(
    nursery: trio.Nursery, kubelet: FakeKubelet, name: str = "p.sock", **kwargs: Any
) -> Plugin:
    plugin = Plugin(kubelet.socket_dir / name, **kwargs)
    await plugin.serve(nursery)
    return plugin


async def registered(
    nursery: trio.Nursery, kubelet: FakeKubelet, name: str = "p.sock",
    resource: str = GPU, **kwargs: Any,
) -> Plugin:
    plugin = await served(nursery, kubelet, name, **kwargs)
    mark = kubelet.registration_count(resource)
    await plugin.register(kubelet, resource)
    await kubelet.wait_registered(resource, after=mark)
    return plugin


async def register_error(plugin: Plugin, kubelet: FakeKubelet, resource: str = GPU,
                         **kwargs: Any) -> str:
    """Register, expecting the kubelet to refuse; the message, checked to be UNKNOWN."""
    with pytest.raises(RpcError) as caught:
        await plugin.register(kubelet, resource, **kwargs)
    assert caught.value.code is StatusCode.UNKNOWN
    return caught.value.message


def is_socket(path: pathlib.Path) -> bool:
    return path.exists() and stat.S_ISSOCK(path.lstat().st_mode)


# --- registration ----------------------------------------------------------------------


async def test_registration_fills_the_device_table(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await served(
        nursery, kubelet,
        options=v1beta1.DevicePluginOptions(get_preferred_allocation_available=True))
    await plugin.register(kubelet)
    record = await kubelet.wait_registered(GPU)

    assert record == RegistrationRecord(
        resource_name=GPU, endpoint="p.sock", version="v1beta1",
        options=plugin.options, accepted=True, error=None, at=record.at)
    state = kubelet.resources[GPU]
    assert state.healthy == {"GPU-0", "GPU-1", "GPU-2", "GPU-3"} and state.unhealthy == set()
    assert state.topology == {"GPU-0": [0], "GPU-1": [1], "GPU-2": [0], "GPU-3": [1]}
    assert state.options == plugin.options
    assert state.connected and state.endpoint == str(plugin.path)
    assert (state.capacity, state.allocatable, state.updates) == (4, 4, 1)
    assert plugin.calls == ["GetDevicePluginOptions", "ListAndWatch"]

    # Each message replaces the table: GPU-3 is gone, GPU-1 turned unhealthy.
    plugin.publish([*gpus(1), v1beta1.Device(ID="GPU-1", health=v1beta1.UNHEALTHY),
                    v1beta1.Device(ID="GPU-2", health=v1beta1.HEALTHY)])
    await kubelet.wait_until(lambda: state.updates == 2)
    assert (state.healthy, state.unhealthy) == ({"GPU-0", "GPU-2"}, {"GPU-1"})
    assert state.topology == {"GPU-0": [0], "GPU-1": [], "GPU-2": []}
    assert (state.capacity, state.allocatable) == (3, 2)


async def test_options_come_from_get_device_plugin_options_not_the_register_request(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await served(nursery, kubelet)
    answered = v1beta1.DevicePluginOptions(pre_start_required=True)
    sent = v1beta1.DevicePluginOptions(get_preferred_allocation_available=True)

    async def get_options(request: v1beta1.Empty) -> v1beta1.DevicePluginOptions:
        return answered

    other = kubelet.socket_dir / "o.sock"
    services = plugin.service()
    await nursery.start(serve_unix, other, [Service(v1beta1.DEVICE_PLUGIN, {
        **services.handlers, "GetDevicePluginOptions": get_options})])
    plugin.options = sent
    await plugin.register(kubelet, endpoint=other.name)
    record = await kubelet.wait_registered(GPU)
    assert record.options == sent
    assert kubelet.resources[GPU].options == answered


@pytest.mark.parametrize(("version", "quoted"), [
    ("v1alpha", '"v1alpha"'),
    ("", '""'),
    ("V1beta1", '"V1beta1"'),
    ("v1beta1 ", '"v1beta1 "'),
    ('v1"beta1\n', r'"v1\"beta1\n"'),
])
async def test_register_rejects_other_api_versions(
    nursery: trio.Nursery, kubelet: FakeKubelet, version: str, quoted: str
) -> None:
    plugin = await served(nursery, kubelet)
    # The version is checked before the name.
    message = await register_error(plugin, kubelet, "bad name", version=version)
    expected = (f"requested API version {quoted} is not supported by kubelet. "
                'Supported version is ["v1beta1"]')
    assert message == expected
    assert kubelet.registrations[-1].accepted is False
    assert kubelet.registrations[-1].error == expected
    assert kubelet.registrations[-1].version == version
    assert plugin.calls == []


VALID_NAMES = [
    "nvidia.com/gpu",
    "example.com/Foo_1",
    "foo/bar",
    "a.com/x.y-z_w",
    "a.com/" + "x" * 63,
    "a" * 244 + "/x",  # "requests." + prefix is exactly 253 characters
]
INVALID_NAMES = [
    "gpu",
    "kubernetes.io/gpu",
    "foo.kubernetes.io/x",
    "Example.com/gpu",
    "a.com/b/c",
    "a.com/",
    "/x",
    "requests.a.com/x",
    "a_b.com/x",
    "a.com/-x",
    "a.com/x_",
    "a.com/x y",
    "a.com/" + "x" * 64,
    "a" * 245 + "/x",
]


@pytest.mark.parametrize("resource", VALID_NAMES)
async def test_register_accepts_extended_resource_names(
    nursery: trio.Nursery, kubelet: FakeKubelet, resource: str
) -> None:
    await registered(nursery, kubelet, resource=resource)
    assert kubelet.resources[resource].allocatable == 4


@pytest.mark.parametrize("resource", INVALID_NAMES)
async def test_register_rejects_other_resource_names(
    nursery: trio.Nursery, kubelet: FakeKubelet, resource: str
) -> None:
    plugin = await served(nursery, kubelet)
    message = await register_error(plugin, kubelet, resource)
    assert message == f'the ResourceName "{resource}" is invalid'
    assert kubelet.registrations[-1].error == message
    assert plugin.calls == [] and kubelet.resources == {}


@pytest.mark.parametrize("endpoint", ["nobody.sock", "", "DEPRECATION", "x" * 120 + ".sock"])
async def test_register_fails_when_the_plugin_socket_is_not_served(
    start_kubelet: StartKubelet, endpoint: str
) -> None:
    kubelet = await start_kubelet(dial_timeout=0.3)
    (kubelet.socket_dir / "DEPRECATION").write_text("")
    plugin = Plugin(kubelet.socket_dir / "p.sock")
    message = await register_error(plugin, kubelet, endpoint=endpoint)
    assert message == "failed to dial device plugin: context deadline exceeded"
    record = kubelet.registrations[-1]
    assert (record.accepted, record.error, record.endpoint) == (False, message, endpoint)
    assert GPU not in kubelet.resources


async def test_register_dials_until_the_plugin_socket_appears(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = Plugin(kubelet.socket_dir / "late.sock")
    registered_event = trio.Event()

    async def register() -> None:
        await plugin.register(kubelet)
        registered_event.set()

    nursery.start_soon(register)
    await trio.sleep(0.3)  # the kubelet is dialing a socket that does not exist yet
    assert not registered_event.is_set() and kubelet.registrations == []
    await plugin.serve(nursery)
    with trio.fail_after(HANG_GUARD):
        await registered_event.wait()
    await kubelet.wait_registered(GPU)
    assert kubelet.resources[GPU].allocatable == 4


async def test_endpoint_is_joined_without_validation(
    nursery: trio.Nursery, kubelet: FakeKubelet, other_dir: pathlib.Path
) -> None:
    # "../<dir>/p.sock" escapes the device-plugin directory, and the kubelet follows it.
    plugin = Plugin(other_dir / "p.sock")
    await plugin.serve(nursery)
    await plugin.register(kubelet, endpoint=f"../{other_dir.name}/p.sock")
    await kubelet.wait_registered(GPU)
    assert kubelet.resources[GPU].endpoint == str(other_dir / "p.sock")


@pytest.mark.parametrize(("error", "expected"), [
    (None, ("failed to get device plugin options: rpc error: code = Unimplemented desc = "
            "method /v1beta1.DevicePlugin/GetDevicePluginOptions is not implemented")),
    (RpcError(StatusCode.FAILED_PRECONDITION, "NVML not loaded"),
     ("failed to get device plugin options: rpc error: code = FailedPrecondition "
      "desc = NVML not loaded")),
    (RpcError(StatusCode.CANCELLED, "bye"),
     "failed to get device plugin options: rpc error: code = Canceled desc = bye"),
])
async def test_register_fails_when_get_device_plugin_options_fails(
    nursery: trio.Nursery, kubelet: FakeKubelet, error: RpcError | None, expected: str
) -> None:
    plugin = await served(nursery, kubelet, implement_options=error is not None)
    plugin.options_error = error
    assert await register_error(plugin, kubelet) == expected
    assert kubelet.registrations[-1].error == expected
    assert "ListAndWatch" not in plugin.calls


async def test_options_and_list_and_watch_come_while_register_is_in_flight(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await served(nursery, kubelet)
    # GetDevicePluginOptions is part of Register.  ListAndWatch is started right after,
    # without waiting for Register's answer to reach the plugin: which of the two the
    # plugin sees first is a race, so try a few times and ask only that it can happen.
    for attempt in range(1, 6):
        await plugin.register(kubelet, f"example.com/r{attempt}")
        await kubelet.wait_registered(f"example.com/r{attempt}")
        if plugin.watch_during_register[-1]:
            break
    assert plugin.options_during_register == [True] * attempt
    assert True in plugin.watch_during_register


async def test_registration_completes_after_the_plugin_gave_up_on_register(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    # The kubelet's dial and GetDevicePluginOptions do not depend on the Register call's
    # context: a plugin with a short deadline fails, and is registered all the same.
    plugin = await served(nursery, kubelet)
    plugin.options_gate = trio.Event()
    with pytest.raises(RpcError) as caught:
        await plugin.register(kubelet, timeout=0.2)
    assert caught.value.code is StatusCode.DEADLINE_EXCEEDED
    assert kubelet.registrations == []
    plugin.options_gate.set()
    record = await kubelet.wait_registered(GPU)
    assert record.accepted and kubelet.resources[GPU].allocatable == 4


async def test_restart_during_register(nursery: trio.Nursery, kubelet: FakeKubelet) -> None:
    plugin = await served(nursery, kubelet)
    plugin.options_gate = trio.Event()
    failed: list[RpcError] = []

    async def register() -> None:
        with pytest.raises(RpcError) as caught:
            await plugin.register(kubelet)
        failed.append(caught.value)

    nursery.start_soon(register)
    with trio.fail_after(HANG_GUARD):
        while "GetDevicePluginOptions" not in plugin.calls:
            await trio.sleep(0.01)
    await kubelet.restart()
    await kubelet.wait_until(lambda: len(kubelet.registrations) == 1)
    record = kubelet.registrations[0]
    assert not record.accepted
    assert record.error == "the kubelet stopped while handling this registration"
    with trio.fail_after(HANG_GUARD):
        while not failed:
            await trio.sleep(0.01)
    assert failed[0].code is StatusCode.UNAVAILABLE
    assert GPU not in kubelet.resources


@pytest.mark.parametrize("health", ["healthy", "", "HEALTHY", "Unknown", v1beta1.UNHEALTHY])
async def test_only_the_exact_string_healthy_is_healthy(
    nursery: trio.Nursery, kubelet: FakeKubelet, health: str
) -> None:
    devices = [v1beta1.Device(ID="good", health=v1beta1.HEALTHY),
               v1beta1.Device(ID="odd", health=health)]
    await registered(nursery, kubelet, devices=devices)
    state = kubelet.resources[GPU]
    assert (state.healthy, state.unhealthy) == ({"good"}, {"odd"})
    assert (state.capacity, state.allocatable) == (2, 1)


# --- streams ending --------------------------------------------------------------------


@pytest.mark.parametrize(("watch_error", "reason"), [
    (None, "OK"),
    (RpcError(StatusCode.INTERNAL, "Xid 79"), "rpc error: code = Internal desc = Xid 79"),
])
async def test_a_stream_that_ends_disconnects_the_plugin(
    nursery: trio.Nursery, kubelet: FakeKubelet, watch_error: RpcError | None, reason: str
) -> None:
    plugin = await registered(nursery, kubelet)
    state = kubelet.resources[GPU]
    if watch_error is None:
        plugin.end_streams()
    else:
        plugin.watch_error = watch_error
        plugin.publish(gpus(4))
    await kubelet.wait_until(lambda: not state.connected)
    assert (state.healthy, state.capacity, state.allocatable) == (set(), 4, 0)
    assert [(e.resource_name, e.endpoint, e.reason) for e in kubelet.stream_ends] == [
        (GPU, str(plugin.path), reason)]

    # The kubelet never reconnects by itself; a new Register restores the resource.
    plugin.watch_error = None
    await plugin.register(kubelet)
    await kubelet.wait_registered(GPU, count=2)
    assert state.connected and state.allocatable == 4
    assert plugin.calls.count("ListAndWatch") == 2


async def test_kubelet_restart_wipes_sockets_and_ends_streams(
    nursery: trio.Nursery, start_kubelet: StartKubelet, socket_dir: pathlib.Path,
    other_dir: pathlib.Path,
) -> None:
    # What an earlier kubelet left behind: a stale socket, a checkpoint, DEPRECATION.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_dir / "stale.sock"))
    stale.close()
    (socket_dir / "DEPRECATION").write_text("")
    (socket_dir / "kubelet_internal_checkpoint").write_text("{}")
    (socket_dir / "subdir").mkdir()
    kubelet = await start_kubelet()
    assert not (socket_dir / "stale.sock").exists()
    assert is_socket(kubelet.kubelet_socket)

    plugin = await registered(nursery, kubelet)
    admission = await kubelet.admit(GPU, 1)
    # A link outside the directory keeps the old inode alive, so that the file system
    # cannot hand its number to the new kubelet.sock.
    os.link(kubelet.kubelet_socket, other_dir / "old-kubelet.sock")
    inode = kubelet.kubelet_socket.lstat().st_ino

    await kubelet.restart()
    assert is_socket(kubelet.kubelet_socket)
    assert kubelet.kubelet_socket.lstat().st_ino != inode
    assert sorted(os.listdir(socket_dir)) == [
        "DEPRECATION", "kubelet.sock", "kubelet_internal_checkpoint", "subdir"]
    with trio.fail_after(HANG_GUARD):
        await plugin.stream_cancelled.wait()
    state = kubelet.resources[GPU]
    assert not state.connected
    assert (state.capacity, state.allocatable) == (4, 0)
    assert state.allocated == set(admission.device_ids)  # the checkpoint survives
    assert kubelet.stream_ends == []  # the old kubelet died with its streams
    with pytest.raises(AdmissionError, match="no healthy devices present"):
        await kubelet.admit(GPU, 1)

    # The plugin serves again and re-registers: the resource is back.
    await plugin.serve(nursery)
    await plugin.register(kubelet)
    await kubelet.wait_registered(GPU, count=2)
    assert state.connected and state.allocatable == 4
    assert (await kubelet.admit(GPU, 3)).device_ids != []


async def test_kubelet_stop_leaves_plugin_sockets_until_restart(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await registered(nursery, kubelet)
    await kubelet.stop()
    assert not kubelet.kubelet_socket.exists()
    assert is_socket(plugin.path)
    with trio.fail_after(HANG_GUARD):
        await plugin.stream_cancelled.wait()
    assert kubelet.resources[GPU].allocatable == 0
    with pytest.raises(RpcError) as caught:
        await plugin.register(kubelet)
    assert caught.value.code is StatusCode.UNAVAILABLE

    await kubelet.restart()
    assert is_socket(kubelet.kubelet_socket) and not plugin.path.exists()


async def test_a_killed_kubelet_drops_every_connection_and_leaves_its_socket(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await registered(nursery, kubelet)
    identity = kubelet.kubelet_socket.lstat()
    await kubelet.kill()
    # Nothing cleaned up, as after SIGKILL: the same kubelet.sock, refusing connections.
    after = kubelet.kubelet_socket.lstat()
    assert (after.st_ino, after.st_ctime_ns) == (identity.st_ino, identity.st_ctime_ns)
    assert is_socket(plugin.path)
    with trio.fail_after(HANG_GUARD):
        await plugin.stream_cancelled.wait()
    with pytest.raises(RpcError) as caught:
        await plugin.register(kubelet)
    assert caught.value.code is StatusCode.UNAVAILABLE
    assert kubelet.resources[GPU].allocatable == 0
    # A new kubelet removes what the dead one left, then serves again.
    await kubelet.restart()
    assert kubelet.kubelet_socket.lstat().st_ctime_ns != identity.st_ctime_ns
    assert not plugin.path.exists()


async def test_a_kubelet_killed_during_register_never_answers_it(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await served(nursery, kubelet)
    kubelet.kill_during_next_register()
    with pytest.raises(RpcError) as caught:
        await plugin.register(kubelet)
    assert caught.value.code is StatusCode.UNAVAILABLE
    # The kubelet had dialled back and recorded the registration before it died.
    assert [r.accepted for r in kubelet.registrations] == [True]
    assert "GetDevicePluginOptions" in plugin.calls
    await kubelet.wait_until(lambda: not kubelet.resources[GPU].connected)
    assert kubelet.kubelet_socket.exists()
    await kubelet.restart()
    await plugin.serve(nursery)
    await plugin.register(kubelet)  # the next one is answered
    await kubelet.wait_registered(GPU, count=2)


async def test_run_exit_closes_plugin_connections_and_removes_kubelet_sock(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    kubelet = FakeKubelet(socket_dir / "made" / "here")  # created like MkdirAll
    async with trio.open_nursery() as inner:
        await inner.start(kubelet.run)
        plugin = await registered(nursery, kubelet)
        inner.cancel_scope.cancel()
    assert not kubelet.kubelet_socket.exists()
    with trio.fail_after(HANG_GUARD):
        await plugin.stream_cancelled.wait()
    assert not kubelet.resources[GPU].connected
    with pytest.raises(RuntimeError, match="not running"):
        await kubelet.restart()


async def test_an_old_stream_ending_tears_down_the_new_registration(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    # kubernetes#121994: a new plugin instance registers the same resource while the
    # old one still streams; when the old stream ends, the kubelet disconnects the new.
    old = await registered(nursery, kubelet, "old.sock")
    new = await registered(nursery, kubelet, "new.sock", devices=gpus(2))
    state = kubelet.resources[GPU]
    assert state.endpoint == str(new.path) and state.allocatable == 2

    # Meanwhile the old stream's updates still overwrite the table (keyed by name).
    old.publish(gpus(3))
    await kubelet.wait_until(lambda: state.allocatable == 3)

    old.end_streams()
    await kubelet.wait_until(lambda: not state.connected)
    with trio.fail_after(HANG_GUARD):
        await new.stream_cancelled.wait()
    assert (state.capacity, state.allocatable) == (3, 0)
    assert kubelet.stream_ends[0].endpoint == str(old.path)

    # The new plugin must notice and register again.
    await new.register(kubelet)
    await kubelet.wait_registered(GPU, count=3)
    assert state.connected and state.allocatable == 2


async def test_without_stale_stream_teardown_only_the_old_client_goes(
    nursery: trio.Nursery, start_kubelet: StartKubelet
) -> None:
    kubelet = await start_kubelet(stale_stream_teardown=False)
    old = await registered(nursery, kubelet, "old.sock")
    new = await registered(nursery, kubelet, "new.sock", devices=gpus(2))
    state = kubelet.resources[GPU]

    old.end_streams()
    await kubelet.wait_until(lambda: len(kubelet.stream_ends) == 1)
    assert kubelet.stream_ends[0].endpoint == str(old.path)
    assert state.connected and state.allocatable == 2
    assert new.streams_cancelled == 0

    new.publish(gpus(1))
    await kubelet.wait_until(lambda: state.capacity == 1)
    assert state.connected and state.allocatable == 1


# --- admission -------------------------------------------------------------------------


async def test_admission_without_preferred_allocation(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await registered(nursery, kubelet)
    admission = await kubelet.admit(GPU, 2, pod="p1", container="c1")
    assert (admission.resource, admission.pod, admission.container) == (GPU, "p1", "c1")
    assert admission.preferred is None
    assert len(set(admission.device_ids)) == 2
    assert set(admission.device_ids) <= kubelet.resources[GPU].healthy
    assert plugin.calls[-1] == "Allocate" and "GetPreferredAllocation" not in plugin.calls
    [request] = plugin.allocate_requests
    assert len(request.container_requests) == 1
    assert request.container_requests[0].devices_ids == admission.device_ids
    assert admission.response.envs == {"NVIDIA_VISIBLE_DEVICES": ",".join(admission.device_ids)}
    assert kubelet.resources[GPU].allocated == set(admission.device_ids)

    second = await kubelet.admit(GPU, 2)
    assert not set(second.device_ids) & set(admission.device_ids)


async def test_admission_honours_the_preferred_allocation(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await registered(
        nursery, kubelet,
        options=v1beta1.DevicePluginOptions(get_preferred_allocation_available=True))
    plugin.preferred = ["GPU-3", "GPU-1"]
    admission = await kubelet.admit(GPU, 2)
    assert sorted(admission.device_ids) == ["GPU-1", "GPU-3"]
    assert admission.preferred == ["GPU-3", "GPU-1"]
    assert plugin.calls[-2:] == ["GetPreferredAllocation", "Allocate"]
    [request] = plugin.preferred_requests
    [container] = request.container_requests
    assert sorted(container.available_deviceIDs) == ["GPU-0", "GPU-1", "GPU-2", "GPU-3"]
    assert container.must_include_deviceIDs == []
    assert container.allocation_size == 2

    # Devices in use are no longer offered.
    plugin.preferred = []
    await kubelet.admit(GPU, 1)
    assert sorted(plugin.preferred_requests[1].container_requests[0].available_deviceIDs) == [
        "GPU-0", "GPU-2"]


@pytest.mark.parametrize(("preferred", "count", "must", "allowed"), [
    # Unknown and duplicate IDs are dropped, the rest is filled from what is available.
    (["nope", "GPU-2", "GPU-2"], 2, {"GPU-2"}, {"GPU-0", "GPU-1", "GPU-2", "GPU-3"}),
    # Too many: only `count` of them are taken.
    (["GPU-0", "GPU-1", "GPU-2"], 2, set(), {"GPU-0", "GPU-1", "GPU-2"}),
    # An allocated device (GPU-3, taken first) is not available.
    (["GPU-3", "GPU-1"], 2, {"GPU-1"}, {"GPU-0", "GPU-1", "GPU-2"}),
    # No container response at all: an empty preference.
    (None, 3, set(), {"GPU-0", "GPU-1", "GPU-2"}),
])
async def test_bad_preferred_allocations_are_tolerated(
    nursery: trio.Nursery, kubelet: FakeKubelet, preferred: list[str] | None, count: int,
    must: set[str], allowed: set[str],
) -> None:
    plugin = await registered(
        nursery, kubelet,
        options=v1beta1.DevicePluginOptions(get_preferred_allocation_available=True))
    plugin.preferred = ["GPU-3"]
    await kubelet.admit(GPU, 1)
    plugin.preferred = preferred
    admission = await kubelet.admit(GPU, count)
    assert len(admission.device_ids) == len(set(admission.device_ids)) == count
    assert must <= set(admission.device_ids) <= allowed
    assert admission.preferred == (preferred if preferred is not None else [])


async def test_admission_of_an_unregistered_resource(kubelet: FakeKubelet) -> None:
    with pytest.raises(AdmissionError) as caught:
        await kubelet.admit("example.com/nothing", 1)
    assert caught.value.error == "cannot allocate unregistered device example.com/nothing"
    assert str(caught.value) == caught.value.message == (
        "Allocate failed due to cannot allocate unregistered device example.com/nothing, "
        "which is unexpected")
    assert caught.value.reason == "UnexpectedAdmissionError"


@pytest.mark.parametrize("count", [1, 0])
async def test_admission_without_healthy_devices(
    nursery: trio.Nursery, kubelet: FakeKubelet, count: int
) -> None:
    # Checked even for a request of 0 devices (kubernetes#128854).
    plugin = await registered(nursery, kubelet, devices=gpus(2, v1beta1.UNHEALTHY))
    with pytest.raises(AdmissionError) as caught:
        await kubelet.admit(GPU, count)
    assert caught.value.error == (
        "no healthy devices present; cannot allocate unhealthy devices nvidia.com/gpu")
    assert "Allocate" not in plugin.calls


async def test_admission_of_zero_devices_makes_no_call(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await registered(nursery, kubelet)
    admission = await kubelet.admit(GPU, 0)
    assert admission.device_ids == [] and admission.preferred is None
    assert "Allocate" not in plugin.calls
    await kubelet.pre_start(admission)
    assert "PreStartContainer" not in plugin.calls


async def test_admission_after_a_disconnect(nursery: trio.Nursery, kubelet: FakeKubelet) -> None:
    plugin = await registered(nursery, kubelet)
    plugin.end_streams()
    await kubelet.wait_until(lambda: not kubelet.resources[GPU].connected)
    with pytest.raises(AdmissionError, match="^Allocate failed due to no healthy devices"):
        await kubelet.admit(GPU, 1)


async def test_admission_of_more_devices_than_available(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await registered(nursery, kubelet, devices=[*gpus(4), v1beta1.Device(
        ID="sick", health=v1beta1.UNHEALTHY)])
    with pytest.raises(AdmissionError) as caught:
        await kubelet.admit(GPU, 5)
    assert caught.value.error == (
        "requested number of devices unavailable for nvidia.com/gpu. Requested: 5, Available: 4")
    await kubelet.admit(GPU, 3)
    with pytest.raises(AdmissionError) as caught:
        await kubelet.admit(GPU, 2)
    assert caught.value.error == (
        "requested number of devices unavailable for nvidia.com/gpu. Requested: 2, Available: 1")
    assert plugin.calls.count("Allocate") == 1


@pytest.mark.parametrize(("implemented", "error", "expected"), [
    (True, RpcError(StatusCode.INTERNAL, "topology lost"),
     ("device plugin GetPreferredAllocation rpc failed with err: "
      "rpc error: code = Internal desc = topology lost")),
    (False, None,
     ("device plugin GetPreferredAllocation rpc failed with err: rpc error: code = "
      "Unimplemented desc = method /v1beta1.DevicePlugin/GetPreferredAllocation is not "
      "implemented")),
])
async def test_admission_when_get_preferred_allocation_fails(
    nursery: trio.Nursery, kubelet: FakeKubelet, implemented: bool, error: RpcError | None,
    expected: str,
) -> None:
    options = v1beta1.DevicePluginOptions(get_preferred_allocation_available=True)
    plugin = Plugin(kubelet.socket_dir / "p.sock", options=options)
    plugin.preferred_error = error
    service = plugin.service()
    handlers = {k: v for k, v in service.handlers.items()
                if implemented or k != "GetPreferredAllocation"}
    await nursery.start(serve_unix, plugin.path, [Service(v1beta1.DEVICE_PLUGIN, handlers)])
    await plugin.register(kubelet)
    await kubelet.wait_registered(GPU)
    with pytest.raises(AdmissionError) as caught:
        await kubelet.admit(GPU, 1)
    assert caught.value.error == expected
    assert "Allocate" not in plugin.calls
    assert kubelet.resources[GPU].allocated == set()


async def test_admission_when_allocate_fails(nursery: trio.Nursery, kubelet: FakeKubelet) -> None:
    plugin = await registered(nursery, kubelet)
    plugin.allocate_error = RpcError(StatusCode.RESOURCE_EXHAUSTED, "MIG slices in use")
    with pytest.raises(AdmissionError) as caught:
        await kubelet.admit(GPU, 1)
    assert str(caught.value) == (
        "Allocate failed due to rpc error: code = ResourceExhausted desc = MIG slices in use, "
        "which is unexpected")
    assert kubelet.resources[GPU].allocated == set()

    plugin.allocate_error = None
    plugin.allocate_empty = True
    with pytest.raises(AdmissionError) as caught:
        await kubelet.admit(GPU, 1)
    assert caught.value.error.startswith("no containers return in allocation response ")
    assert kubelet.resources[GPU].allocated == set()


async def test_release_frees_the_devices(nursery: trio.Nursery, kubelet: FakeKubelet) -> None:
    await registered(nursery, kubelet)
    first = await kubelet.admit(GPU, 3)
    with pytest.raises(AdmissionError, match="Requested: 2, Available: 1"):
        await kubelet.admit(GPU, 2)
    kubelet.release(first)
    assert kubelet.resources[GPU].allocated == set()
    second = await kubelet.admit(GPU, 4)
    assert len(second.device_ids) == 4
    with pytest.raises(ValueError, match="not an active admission"):
        kubelet.release(first)
    with pytest.raises(ValueError, match="not an active admission"):
        await kubelet.pre_start(first)


# --- container start -------------------------------------------------------------------


async def test_pre_start_container_when_required(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await registered(
        nursery, kubelet, options=v1beta1.DevicePluginOptions(pre_start_required=True))
    admission = await kubelet.admit(GPU, 2)
    await kubelet.pre_start(admission)
    [request] = plugin.pre_start_requests
    assert request.devices_ids == admission.device_ids

    plugin.pre_start_error = RpcError(StatusCode.UNAVAILABLE, "GPU reset in progress")
    with pytest.raises(PreStartError) as caught:
        await kubelet.pre_start(admission)
    assert str(caught.value) == caught.value.message == (
        "device plugin PreStartContainer rpc failed with err: "
        "rpc error: code = Unavailable desc = GPU reset in progress")


async def test_pre_start_container_only_when_required(
    nursery: trio.Nursery, kubelet: FakeKubelet
) -> None:
    plugin = await registered(nursery, kubelet)
    await kubelet.pre_start(await kubelet.admit(GPU, 1))
    assert "PreStartContainer" not in plugin.calls
