"""gRPC over real Unix sockets, in both directions against grpcio.

Our server is called by grpcio's client (in a worker thread, or in another process when
the client must be killed), and our client calls grpcio's server.  Each test reads as the
behaviour it pins: a client resets a stream and the handler is cancelled, a client dies
and its socket is released, the server shuts down and open streams end.

Time bounds here are hang guards (seconds), not performance asserts; the latency of
cancellation is measured in bench/cancel.py.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import Any

import grpc
import pytest
import trio

from trio_gpu_plugin import RpcError, Service, StatusCode, open_unix_channel, serve_unix
from trio_gpu_plugin.proto import v1beta1

ROOT = pathlib.Path(__file__).resolve().parent.parent
HANG_GUARD = 5.0
UNICODE_MESSAGE = "GPU-0 is gone: Xid 79 — «fallen off the bus» 🔥 100% sure"


def allocate_request(*ids: str) -> v1beta1.AllocateRequest:
    return v1beta1.AllocateRequest(
        container_requests=[v1beta1.ContainerAllocateRequest(devices_ids=list(ids))]
    )


async def allocate(request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
    ids = request.container_requests[0].devices_ids
    return v1beta1.AllocateResponse(container_responses=[
        v1beta1.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": ",".join(ids)})
    ])


def devices(n: int, health: str = v1beta1.HEALTHY) -> v1beta1.ListAndWatchResponse:
    return v1beta1.ListAndWatchResponse(devices=[
        v1beta1.Device(ID=f"GPU-{i}", health=health,
                       topology=v1beta1.TopologyInfo(nodes=[v1beta1.NUMANode(ID=i % 2)]))
        for i in range(n)
    ])


class Watch:
    """A ListAndWatch handler that sends one list, then waits; records its cancellation."""

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.started = trio.Event()
        self.cancelled = trio.Event()
        self.cancelled_at: float | None = None

    async def __call__(self, request: v1beta1.Empty, send: Callable[[Any], Awaitable[None]]) -> None:
        try:
            await send(devices(self.count))
            self.started.set()
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled_at = trio.current_time()
            self.cancelled.set()
            raise


async def start_server(
    nursery: trio.Nursery, path: pathlib.Path, handlers: dict[str, Any]
) -> str:
    return await nursery.start(serve_unix, path, [Service(v1beta1.DEVICE_PLUGIN, handlers)])


def grpc_stub(pb2_grpc: types.ModuleType, path: str) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"unix://{path}")
    return channel, pb2_grpc.DevicePluginStub(channel)


def open_sockets() -> set[str]:
    """This process's open sockets, as the kernel names them (``socket:[inode]``)."""
    names = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the fd listing itself, closed meanwhile
            continue
        if target.startswith("socket:"):
            names.add(target)
    return names


# --- our server, grpcio client -------------------------------------------------------


async def test_grpcio_client_calls_unary_allocate(
    nursery: trio.Nursery, socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": allocate})

    def call() -> Any:
        channel, stub = grpc_stub(pb2_grpc, path)
        with channel:
            return stub.Allocate(pb2.AllocateRequest(container_requests=[
                pb2.ContainerAllocateRequest(devices_ids=["GPU-a", "GPU-b"])]), timeout=HANG_GUARD)

    response = await trio.to_thread.run_sync(call)
    assert dict(response.container_responses[0].envs) == {"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"}


async def test_grpcio_client_receives_a_server_stream(
    nursery: trio.Nursery, socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    async def watch(request: v1beta1.Empty, send: Callable[[Any], Awaitable[None]]) -> None:
        for health in (v1beta1.HEALTHY, v1beta1.UNHEALTHY, v1beta1.HEALTHY):
            await send(devices(3, health))

    path = await start_server(nursery, socket_dir / "p.sock", {"ListAndWatch": watch})

    def call() -> list[list[tuple[str, str, list[int]]]]:
        channel, stub = grpc_stub(pb2_grpc, path)
        with channel:
            return [
                [(d.ID, d.health, [n.ID for n in d.topology.nodes]) for d in msg.devices]
                for msg in stub.ListAndWatch(pb2.Empty(), timeout=HANG_GUARD)
            ]

    lists = await trio.to_thread.run_sync(call)
    assert [[health for _, health, _ in devices_] for devices_ in lists] == [
        ["Healthy"] * 3, ["Unhealthy"] * 3, ["Healthy"] * 3]
    assert lists[0][1] == ("GPU-1", "Healthy", [1])


async def test_a_large_stream_message_respects_flow_control(
    nursery: trio.Nursery, socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    # 20,000 devices is about 1.2 MB: far more than HTTP/2's initial 64 KiB window and its
    # 16 KiB frames, so the server must split it and wait for WINDOW_UPDATEs.
    async def watch(request: v1beta1.Empty, send: Callable[[Any], Awaitable[None]]) -> None:
        await send(devices(20_000))

    path = await start_server(nursery, socket_dir / "p.sock", {"ListAndWatch": watch})

    def call() -> list[int]:
        channel, stub = grpc_stub(pb2_grpc, path)
        with channel:
            return [len(m.devices) for m in stub.ListAndWatch(pb2.Empty(), timeout=HANG_GUARD)]

    assert await trio.to_thread.run_sync(call) == [20_000]


async def test_handler_error_reaches_grpcio_with_its_code_and_unicode_message(
    nursery: trio.Nursery, socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    async def fail(request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        raise RpcError(StatusCode.FAILED_PRECONDITION, UNICODE_MESSAGE)

    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": fail})

    def call() -> grpc.RpcError:
        channel, stub = grpc_stub(pb2_grpc, path)
        with channel, pytest.raises(grpc.RpcError) as info:
            stub.Allocate(pb2.AllocateRequest(), timeout=HANG_GUARD)
        return info.value

    error = await trio.to_thread.run_sync(call)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == UNICODE_MESSAGE


async def test_unexpected_exception_is_unknown_with_a_clean_message_and_a_logged_traceback(
    nursery: trio.Nursery, socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        raise KeyError("GPU-7")

    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": broken})

    def call() -> grpc.RpcError:
        channel, stub = grpc_stub(pb2_grpc, path)
        with channel, pytest.raises(grpc.RpcError) as info:
            stub.Allocate(pb2.AllocateRequest(), timeout=HANG_GUARD)
        return info.value

    error = await trio.to_thread.run_sync(call)
    assert error.code() == grpc.StatusCode.UNKNOWN
    assert error.details() == "KeyError: 'GPU-7'"
    failures = [r for r in caplog.records if "/v1beta1.DevicePlugin/Allocate failed" in r.getMessage()]
    assert failures and failures[0].exc_info is not None


async def test_malformed_request_fails_that_call_only(
    nursery: trio.Nursery, socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": allocate})
    # Field 1 of ContainerAllocateRequest (a string) holding invalid UTF-8.
    bad = bytes.fromhex("0a03" + "0a01ff")

    def call() -> tuple[grpc.RpcError, Any]:
        channel = grpc.insecure_channel(f"unix://{path}")
        with channel:
            raw = channel.unary_unary("/v1beta1.DevicePlugin/Allocate")
            with pytest.raises(grpc.RpcError) as info:
                raw(bad, timeout=HANG_GUARD)
            stub = pb2_grpc.DevicePluginStub(channel)
            ok = stub.Allocate(pb2.AllocateRequest(container_requests=[
                pb2.ContainerAllocateRequest(devices_ids=["GPU-1"])]), timeout=HANG_GUARD)
            return info.value, ok

    error, ok = await trio.to_thread.run_sync(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "v1beta1.ContainerAllocateRequest" in error.details()
    assert "'devices_ids'" in error.details() and "byte 4" in error.details()
    assert dict(ok.container_responses[0].envs) == {"NVIDIA_VISIBLE_DEVICES": "GPU-1"}


async def test_unknown_method_is_unimplemented(
    nursery: trio.Nursery, socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": allocate})

    def call() -> list[grpc.RpcError]:
        channel, stub = grpc_stub(pb2_grpc, path)
        errors = []
        with channel:
            for do in (lambda: stub.GetDevicePluginOptions(pb2.Empty(), timeout=HANG_GUARD),
                       lambda: channel.unary_unary("/no.Such/Method")(b"", timeout=HANG_GUARD)):
                with pytest.raises(grpc.RpcError) as info:
                    do()
                errors.append(info.value)
        return errors

    errors = await trio.to_thread.run_sync(call)
    assert [e.code() for e in errors] == [grpc.StatusCode.UNIMPLEMENTED] * 2
    assert "/v1beta1.DevicePlugin/GetDevicePluginOptions" in errors[0].details()


async def test_oversized_request_is_resource_exhausted_and_the_server_keeps_serving(
    nursery: trio.Nursery, socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    path = await nursery.start(
        lambda task_status: serve_unix(
            socket_dir / "p.sock", [Service(v1beta1.DEVICE_PLUGIN, {"Allocate": allocate})],
            max_message_length=1024, task_status=task_status)
    )
    big = pb2.AllocateRequest(container_requests=[
        pb2.ContainerAllocateRequest(devices_ids=["x" * 2000])])

    def call() -> tuple[grpc.RpcError, Any]:
        channel, stub = grpc_stub(pb2_grpc, path)
        with channel:
            with pytest.raises(grpc.RpcError) as info:
                stub.Allocate(big, timeout=HANG_GUARD)
            return info.value, stub.Allocate(pb2.AllocateRequest(container_requests=[
                pb2.ContainerAllocateRequest(devices_ids=["GPU-1"])]), timeout=HANG_GUARD)

    error, ok = await trio.to_thread.run_sync(call)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ok.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == "GPU-1"


async def test_handler_returning_the_wrong_type_is_internal(
    nursery: trio.Nursery, socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    async def confused(request: v1beta1.AllocateRequest) -> Any:
        return v1beta1.Empty()

    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": confused})

    def call() -> grpc.RpcError:
        channel, stub = grpc_stub(pb2_grpc, path)
        with channel, pytest.raises(grpc.RpcError) as info:
            stub.Allocate(pb2.AllocateRequest(), timeout=HANG_GUARD)
        return info.value

    error = await trio.to_thread.run_sync(call)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "returned Empty, expected AllocateResponse" in error.details()


async def test_grpc_timeout_is_enforced_on_the_server(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    cancelled = trio.Event()

    async def slow(request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": slow})
    async with open_unix_channel(path) as channel:
        # Send grpc-timeout 0.2 s but wait for the server's own verdict, not ours.
        call = await channel._start(v1beta1.DEVICE_PLUGIN, "Allocate", allocate_request("x"), 0.2)
        with trio.fail_after(HANG_GUARD), pytest.raises(RpcError) as info:
            await channel._receive(call)
    assert info.value.code is StatusCode.DEADLINE_EXCEEDED
    assert "did not finish within the client's deadline (0.2 s)" in info.value.message
    assert cancelled.is_set()


async def test_grpcio_client_cancel_mid_stream_cancels_the_handler(
    nursery: trio.Nursery, socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    watch = Watch()
    path = await start_server(nursery, socket_dir / "p.sock", {"ListAndWatch": watch})
    channel, stub = grpc_stub(pb2_grpc, path)
    try:
        responses = stub.ListAndWatch(pb2.Empty())
        first = await trio.to_thread.run_sync(next, responses)
        assert len(first.devices) == 2
        assert not watch.cancelled.is_set()
        responses.cancel()  # RST_STREAM(CANCEL)
        with trio.fail_after(HANG_GUARD):
            await watch.cancelled.wait()
    finally:
        channel.close()


CLIENT_SCRIPT = textwrap.dedent("""
    import sys
    import grpc
    from tests import peers
    pb2, pb2_grpc = peers.load()
    channel = grpc.insecure_channel("unix://" + sys.argv[1])
    stub = pb2_grpc.DevicePluginStub(channel)
    for message in stub.ListAndWatch(pb2.Empty()):
        print(len(message.devices), flush=True)
""")


async def test_killed_grpcio_client_cancels_the_handler_and_releases_the_socket(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    watch = Watch()
    path = await start_server(nursery, socket_dir / "p.sock", {"ListAndWatch": watch})
    sockets_before = open_sockets()
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, path], cwd=ROOT, stdout=subprocess.PIPE,
    )
    try:
        assert client.stdout is not None
        line = await trio.to_thread.run_sync(client.stdout.readline)
        assert line.strip() == b"2"
        assert open_sockets() - sockets_before, "the server holds a socket for the client"
        client.send_signal(signal.SIGKILL)
        with trio.fail_after(HANG_GUARD):
            await watch.cancelled.wait()
            while open_sockets() - sockets_before:
                await trio.sleep(0.01)
    finally:
        client.kill()
        client.wait()
        if client.stdout is not None:
            client.stdout.close()


async def test_server_shutdown_with_open_streams_ends_them_promptly(
    socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    watch = Watch()
    outcome: list[grpc.StatusCode] = []
    clients_done = threading.Event()

    def client(channel: grpc.Channel, stub: Any) -> None:
        try:
            for _ in stub.ListAndWatch(pb2.Empty(), timeout=HANG_GUARD * 2):
                pass
        except grpc.RpcError as error:
            outcome.append(error.code())
        finally:
            clients_done.set()

    channel, stub = grpc_stub(pb2_grpc, str(socket_dir / "p.sock"))
    try:
        async with trio.open_nursery() as server_nursery:
            await start_server(server_nursery, socket_dir / "p.sock", {"ListAndWatch": watch})
            thread = threading.Thread(target=client, args=(channel, stub), daemon=True)
            thread.start()
            with trio.fail_after(HANG_GUARD):
                await watch.started.wait()
            shutdown_started = trio.current_time()
            server_nursery.cancel_scope.cancel()
        shutdown_took = trio.current_time() - shutdown_started
        assert watch.cancelled.is_set()
        assert shutdown_took < 1.0
        assert await trio.to_thread.run_sync(clients_done.wait, HANG_GUARD)
        assert outcome and outcome[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert not (socket_dir / "p.sock").exists(), "the socket file is removed on exit"
    finally:
        channel.close()


async def test_a_client_speaking_garbage_is_disconnected_and_others_are_served(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": allocate})
    garbage = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with garbage:
        await garbage.connect(path)
        await garbage.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 100)
        with trio.fail_after(HANG_GUARD):
            received = b""
            while chunk := await garbage.recv(65536):
                received += chunk
        # The server said what it could (its SETTINGS, then a GOAWAY) and hung up.
    async with open_unix_channel(path) as channel:
        response = await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate", allocate_request("GPU-3"))
    assert response.container_responses[0].envs == {"NVIDIA_VISIBLE_DEVICES": "GPU-3"}


async def test_stale_socket_file_is_replaced_but_other_files_are_not(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_dir / "p.sock"))
    stale.close()  # the file stays behind, as after a crash
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": allocate})
    async with open_unix_channel(path) as channel:
        await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate", allocate_request("a"))

    (socket_dir / "plain").write_text("not a socket")
    with pytest.raises(FileExistsError, match="is not a socket"):
        await start_server(nursery, socket_dir / "plain", {"Allocate": allocate})
    assert (socket_dir / "plain").read_text() == "not a socket"


async def test_service_with_a_handler_for_a_method_it_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="has no method"):
        Service(v1beta1.DEVICE_PLUGIN, {"Alocate": allocate})


# --- our client, grpcio server -------------------------------------------------------


class GrpcioServer:
    """A grpcio DevicePlugin server on a Unix socket, with hooks to observe cancellation."""

    def __init__(self, pb2: Any, pb2_grpc: Any, path: str) -> None:
        self.pb2 = pb2
        self.path = path
        self.cancelled = threading.Event()
        self.deadlines: list[float | None] = []
        outer = self

        class Servicer(pb2_grpc.DevicePluginServicer):  # type: ignore[misc, name-defined]
            def Allocate(self, request: Any, context: Any) -> Any:  # noqa: N802
                outer.deadlines.append(context.time_remaining())
                ids = request.container_requests[0].devices_ids
                if ids and ids[0] == "fail":
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, UNICODE_MESSAGE)
                if ids and ids[0] == "slow":
                    context.add_callback(outer.cancelled.set)
                    outer.cancelled.wait(HANG_GUARD)
                return pb2.AllocateResponse(container_responses=[
                    pb2.ContainerAllocateResponse(envs={"NVIDIA_VISIBLE_DEVICES": ",".join(ids)},
                                                  devices=[pb2.DeviceSpec(container_path="/dev/nvidia0",
                                                                          host_path="/dev/nvidia0",
                                                                          permissions="rw")])])

            def ListAndWatch(self, request: Any, context: Any) -> Any:  # noqa: N802
                context.add_callback(outer.cancelled.set)
                yield pb2.ListAndWatchResponse(devices=[
                    pb2.Device(ID="GPU-0", health="Healthy",
                               topology=pb2.TopologyInfo(nodes=[pb2.NUMANode(ID=0)]))])
                while context.is_active() and not outer.cancelled.wait(0.01):
                    pass

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb2_grpc.add_DevicePluginServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"unix:{path}")

    def __enter__(self) -> GrpcioServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0).wait(HANG_GUARD)


async def test_our_client_calls_grpcio_unary_and_sends_its_deadline(
    socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    path = str(socket_dir / "g.sock")
    with GrpcioServer(pb2, pb2_grpc, path) as server:
        async with open_unix_channel(path) as channel:
            response = await channel.unary(
                v1beta1.DEVICE_PLUGIN, "Allocate", allocate_request("GPU-1", "GPU-2"), timeout=7)
    assert response == v1beta1.AllocateResponse(container_responses=[
        v1beta1.ContainerAllocateResponse(
            envs={"NVIDIA_VISIBLE_DEVICES": "GPU-1,GPU-2"},
            devices=[v1beta1.DeviceSpec(container_path="/dev/nvidia0", host_path="/dev/nvidia0",
                                        permissions="rw")])])
    (remaining,) = server.deadlines
    assert remaining is not None and 5 < remaining <= 7


async def test_our_client_receives_a_grpcio_server_stream_and_cancel_reaches_the_handler(
    socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    path = str(socket_dir / "g.sock")
    with GrpcioServer(pb2, pb2_grpc, path) as server:
        async with open_unix_channel(path) as channel:
            async with channel.server_stream(v1beta1.DEVICE_PLUGIN, "ListAndWatch",
                                             v1beta1.Empty()) as responses:
                first = await responses.__anext__()
            # Leaving the block mid-stream resets it: grpcio's handler sees the cancel.
            assert await trio.to_thread.run_sync(server.cancelled.wait, HANG_GUARD)
            # The channel stays usable for other calls.
            ok = await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate", allocate_request("a"))
    assert first.devices == [v1beta1.Device(ID="GPU-0", health="Healthy",
                                            topology=v1beta1.TopologyInfo(nodes=[v1beta1.NUMANode(ID=0)]))]
    assert ok.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == "a"


async def test_our_client_gets_grpcio_error_status_with_unicode_message(
    socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    path = str(socket_dir / "g.sock")
    with GrpcioServer(pb2, pb2_grpc, path):
        async with open_unix_channel(path) as channel:
            with pytest.raises(RpcError) as info:
                await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate", allocate_request("fail"))
            with pytest.raises(RpcError) as unimplemented:
                await channel.unary(v1beta1.DEVICE_PLUGIN, "PreStartContainer",
                                    v1beta1.PreStartContainerRequest())
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED
    assert info.value.message == UNICODE_MESSAGE
    assert unimplemented.value.code is StatusCode.UNIMPLEMENTED


async def test_our_client_call_is_bounded_by_its_timeout(
    socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    path = str(socket_dir / "g.sock")
    with GrpcioServer(pb2, pb2_grpc, path) as server:
        async with open_unix_channel(path) as channel:
            with trio.fail_after(HANG_GUARD), pytest.raises(RpcError) as info:
                await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate", allocate_request("slow"),
                                    timeout=0.2)
            assert await trio.to_thread.run_sync(server.cancelled.wait, HANG_GUARD)
    assert info.value.code is StatusCode.DEADLINE_EXCEEDED


async def test_grpcio_server_shutdown_ends_our_open_stream(
    socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    path = str(socket_dir / "g.sock")
    server = GrpcioServer(pb2, pb2_grpc, path).__enter__()
    try:
        async with open_unix_channel(path) as channel:
            async with channel.server_stream(v1beta1.DEVICE_PLUGIN, "ListAndWatch",
                                             v1beta1.Empty()) as responses:
                await responses.__anext__()
                await trio.to_thread.run_sync(lambda: server.server.stop(0).wait(HANG_GUARD))
                with trio.fail_after(HANG_GUARD), pytest.raises(RpcError) as info:
                    await responses.__anext__()
            assert info.value.code in (StatusCode.UNAVAILABLE, StatusCode.CANCELLED)
            # Further calls fail fast rather than hang.
            with trio.fail_after(HANG_GUARD), pytest.raises(RpcError) as later:
                await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate", allocate_request("a"))
            assert later.value.code is StatusCode.UNAVAILABLE
    finally:
        server.__exit__()


OUR_CLIENT_SCRIPT = textwrap.dedent("""
    import sys
    import trio
    from trio_gpu_plugin import open_unix_channel
    from trio_gpu_plugin.proto import v1beta1

    async def main():
        async with open_unix_channel(sys.argv[1]) as channel:
            async with channel.server_stream(v1beta1.DEVICE_PLUGIN, "ListAndWatch",
                                             v1beta1.Empty()) as responses:
                async for message in responses:
                    print(len(message.devices), flush=True)

    trio.run(main)
""")


async def test_killed_client_of_ours_cancels_the_grpcio_handler(
    socket_dir: pathlib.Path, pb2: Any, pb2_grpc: Any
) -> None:
    path = str(socket_dir / "g.sock")
    with GrpcioServer(pb2, pb2_grpc, path) as server:
        client = subprocess.Popen([sys.executable, "-c", OUR_CLIENT_SCRIPT, path], cwd=ROOT,
                                  stdout=subprocess.PIPE)
        try:
            assert client.stdout is not None
            assert (await trio.to_thread.run_sync(client.stdout.readline)).strip() == b"1"
            client.send_signal(signal.SIGKILL)
            assert await trio.to_thread.run_sync(server.cancelled.wait, HANG_GUARD)
        finally:
            client.kill()
            client.wait()
            if client.stdout is not None:
                client.stdout.close()


async def test_connecting_to_a_missing_socket_is_unavailable(socket_dir: pathlib.Path) -> None:
    with pytest.raises(RpcError) as info:
        async with open_unix_channel(socket_dir / "nobody.sock"):
            pass
    assert info.value.code is StatusCode.UNAVAILABLE
    assert "nobody.sock" in info.value.message


async def test_an_error_inside_the_channel_block_comes_out_unwrapped(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": allocate})
    with pytest.raises(LookupError, match="mine"):
        async with open_unix_channel(path):
            raise LookupError("mine")


# --- our client, our server ---------------------------------------------------------


async def test_leaving_our_stream_early_cancels_our_handler(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    watch = Watch()
    path = await start_server(nursery, socket_dir / "p.sock", {"ListAndWatch": watch})
    async with open_unix_channel(path) as channel:
        async with channel.server_stream(v1beta1.DEVICE_PLUGIN, "ListAndWatch",
                                         v1beta1.Empty()) as responses:
            async for message in responses:
                assert len(message.devices) == 2
                break
        with trio.fail_after(HANG_GUARD):
            await watch.cancelled.wait()


async def test_many_concurrent_calls_share_one_connection(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    async def echo(request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        await trio.sleep(0.01)
        return await allocate(request)

    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": echo})
    results: dict[int, str] = {}
    async with open_unix_channel(path) as channel:
        async def one(i: int) -> None:
            response = await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate",
                                           allocate_request(f"GPU-{i}"))
            results[i] = response.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"]

        async with trio.open_nursery() as calls:
            for i in range(50):
                calls.start_soon(one, i)
    assert results == {i: f"GPU-{i}" for i in range(50)}


async def test_wrong_request_type_is_refused_before_sending(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": allocate})
    async with open_unix_channel(path) as channel:
        with pytest.raises(TypeError, match="takes AllocateRequest, not Empty"):
            await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate", v1beta1.Empty())


async def test_an_outer_cancel_propagates_out_of_a_handler_and_the_server(
    socket_dir: pathlib.Path
) -> None:
    watch = Watch()
    with trio.move_on_after(HANG_GUARD) as guard:
        async with trio.open_nursery() as nursery:
            path = await start_server(nursery, socket_dir / "p.sock", {"ListAndWatch": watch})
            async with open_unix_channel(path) as channel:
                async with channel.server_stream(v1beta1.DEVICE_PLUGIN, "ListAndWatch",
                                                 v1beta1.Empty()) as responses:
                    await responses.__anext__()
                    nursery.cancel_scope.cancel()
                    # Our own stream ends too: the server closed the connection.
                    with pytest.raises(RpcError):
                        await responses.__anext__()
    assert not guard.cancelled_caught
    assert watch.cancelled.is_set()


def test_logs_name_the_socket(caplog: pytest.LogCaptureFixture, socket_dir: pathlib.Path) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await start_server(nursery, socket_dir / "p.sock", {"Allocate": allocate})
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, "trio_gpu_plugin.transport"):
        trio.run(main)
    assert any(str(socket_dir / "p.sock") in r.getMessage() for r in caplog.records)
