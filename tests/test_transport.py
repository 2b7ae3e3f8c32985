"""gRPC over real Unix sockets, in both directions against grpcio.

Our server is called by grpcio's client (in a worker thread, or in another process when
the client must be killed), and our client calls grpcio's server.  Each test reads as the
behaviour it pins: a client resets a stream and the handler is cancelled, a client dies
and its socket is released, the server shuts down and open streams end.  Requests no
gRPC library would send (malformed header blocks, cut-short messages, bad grpc-timeout
or content-type) go through the hostile bench's raw HTTP/2 client.

Time bounds here are hang guards (seconds), not performance asserts; the latency of
cancellation is measured in bench/cancel.py.
"""

from __future__ import annotations

import gc
import logging
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import h2.errors
import pytest
import trio
import trio.testing

from tests.test_hostile import hostile  # bench/hostile.py: its raw HTTP/2 client
from trio_gpu_plugin import RpcError, Service, StatusCode, open_unix_channel, serve_unix
from trio_gpu_plugin._grpc import GrpcConnection
from trio_gpu_plugin.proto import v1beta1

ROOT = pathlib.Path(__file__).resolve().parent.parent
HANG_GUARD = 5.0
UNICODE_MESSAGE = "GPU-0 is gone: Xid 79 — «fallen off the bus» 🔥 100% sure"


@pytest.fixture(scope="module", autouse=True)
def free_grpcio_objects() -> Iterator[None]:
    """After this module, free the grpcio channels and servers its tests leave in
    reference cycles: grpcio's poller (an epoll and an eventfd) lives until they are
    collected, and a collection that lands inside a later test's fd-leak check (the
    runtime's hundred restarts) would show up there as fds closing."""
    yield
    gc.collect()


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


# --- a raw HTTP/2 client against our server: what the specs answer to bad requests ----


GOOD_BODY = hostile.frame(allocate_request("GPU-1").SerializeToString())
Header = tuple[str, str] | tuple[bytes, bytes]


def request(
    *, drop: str = "", replace: dict[str, str] | None = None, add: Sequence[Header] = (),
    first: Sequence[Header] = (),
) -> list[Header]:
    """An Allocate request header block: ``first`` ahead of the pseudo-headers, ``drop``
    one header, ``replace`` values by name, ``add`` headers at the end."""
    replace = replace or {}
    headers: list[Header] = [
        (name, replace.get(name, value)) for name, value in hostile.base_headers("Allocate")
        if name != drop
    ]
    return [*first, *headers, *add]


class CountingAllocate:
    """An Allocate handler that counts its calls and never reaches a checkpoint, so only
    the server's own checks can keep it from answering."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        self.calls += 1
        return v1beta1.AllocateResponse(container_responses=[v1beta1.ContainerAllocateResponse()])


async def raw_call(path: str, headers: list[Header], chunks: Sequence[bytes]) -> Any:
    """One request on a fresh raw connection: its ``hostile.Answer``."""
    conn = await hostile.RawConnection.open(path)
    try:
        with trio.fail_after(HANG_GUARD):
            case = hostile.Case("test", headers=headers, chunks=list(chunks))
            return await hostile.run_stream(conn, case)
    finally:
        await conn.close()


MALFORMED = {
    "empty :path": request(replace={":path": ""}),
    ":path without a leading slash": request(replace={":path": "v1beta1.DevicePlugin/Allocate"}),
    "value with leading whitespace": request(add=[("x-note", " GPU-1")]),
    "value with trailing whitespace": request(add=[("x-note", "GPU-1\t")]),
    "NUL in a value": request(add=[("x-note", "GPU\x00-1")]),
    "CR LF in a value": request(add=[("x-note", "GPU-1\r\nx-injected: 1")]),
    "value not UTF-8": request(add=[(b"x-note", b"GPU-\xff")]),
    "uppercase name": request(add=[("X-Note", "GPU-1")]),
    "space in a name": request(add=[("x note", "GPU-1")]),
    "missing :method": request(drop=":method"),
    "missing :scheme": request(drop=":scheme"),
    "missing :path": request(drop=":path"),
    "repeated :path": request(first=[(":path", "/v1beta1.DevicePlugin/Allocate")]),
    "pseudo-header after a regular one": request(drop=":authority", add=[(":authority", "localhost")]),
    "unknown pseudo-header": request(first=[(":protocol", "grpc")]),
    "response pseudo-header": request(first=[(":status", "200")]),
    "connection-specific header": request(add=[("connection", "keep-alive")]),
    "transfer-encoding": request(add=[("transfer-encoding", "chunked")]),
    "te other than trailers": request(replace={"te": "gzip"}),
    "content-length not a number": request(add=[("content-length", "ten")]),
    "content-length the body does not have": request(add=[("content-length", "1")]),
}


@pytest.mark.parametrize("headers", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_a_malformed_request_header_block_resets_only_its_stream(
    nursery: trio.Nursery, socket_dir: pathlib.Path, headers: list[Header]
) -> None:
    # RFC 9113 §8.1.1 (RFC 7540 §8.1.2.6): a malformed request is a stream error of type
    # PROTOCOL_ERROR; the connection, and the other calls on it, go on.
    watch, counting = Watch(), CountingAllocate()
    path = await start_server(nursery, socket_dir / "p.sock",
                              {"Allocate": counting, "ListAndWatch": watch})
    conn = await hostile.RawConnection.open(path)
    try:
        with trio.fail_after(HANG_GUARD):
            watching = conn.h2.get_next_available_stream_id()
            conn.h2.send_headers(watching, hostile.base_headers("ListAndWatch"))
            await conn.send_data(watching, hostile.frame(b""), end=True)
            await watch.started.wait()
            bad = await hostile.run_stream(
                conn, hostile.Case("bad", headers=headers, chunks=[GOOD_BODY]))
            good = await hostile.run_stream(
                conn, hostile.Case("good", headers=hostile.base_headers("Allocate"), chunks=[GOOD_BODY]))
        watch_cancelled = watch.cancelled.is_set()
    finally:
        await conn.close()
    assert bad.outcome == "rst-PROTOCOL_ERROR"
    assert good.outcome == "status-OK"
    assert conn.goaway is None
    assert not watch_cancelled, "the call in flight on the same connection went on"
    assert counting.calls == 1, "only the well-formed request reached the handler"


async def test_a_header_block_hpack_cannot_decode_still_closes_the_connection(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    # RFC 9113 §4.3: the HPACK state is lost with it, so it is a connection error of type
    # COMPRESSION_ERROR.
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": allocate})
    conn = await hostile.RawConnection.open(path)
    block = b"\x80"  # an indexed field with index 0, which no table has
    # HEADERS (type 1) with END_HEADERS and END_STREAM, on stream 1.
    headers_frame = struct.pack(">I", len(block))[1:] + bytes((0x1, 0x4 | 0x1)) + struct.pack(">I", 1)
    try:
        await conn.stream.send_all(headers_frame + block)
        with trio.fail_after(HANG_GUARD), pytest.raises(hostile.Closed):
            while True:
                await conn.receive()
    finally:
        await conn.close()
    assert conn.goaway == h2.errors.ErrorCodes.COMPRESSION_ERROR


TRUNCATED = {
    "prefix announces more than was sent": (
        [struct.pack(">BI", 0, 100) + b"x" * 4, b"x" * 6],
        "length prefix announced 100 bytes, the stream ended after 10"),
    "part of a prefix": ([b"\x00\x00\x00"], "ended 3 bytes into a 5-byte length prefix"),
    "a whole message, then part of another": (
        [GOOD_BODY + b"\x00\x00"], "ended 2 bytes into a 5-byte length prefix"),
}


@pytest.mark.parametrize("chunks, says", list(TRUNCATED.values()), ids=list(TRUNCATED))
async def test_a_request_message_cut_short_by_the_end_of_the_stream_is_internal(
    nursery: trio.Nursery, socket_dir: pathlib.Path, chunks: list[bytes], says: str
) -> None:
    # What grpc-go answers ("grpc: failed to receive the whole message"): INTERNAL, and
    # the handler is never called.
    counting = CountingAllocate()
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": counting})
    answer = await raw_call(path, request(), chunks)
    assert answer.outcome == "status-INTERNAL"
    assert "request message truncated" in answer.message and says in answer.message
    assert counting.calls == 0


@pytest.mark.parametrize(
    "timeout", ["-1S", "123456789S", "1.5S", "+1S", "1\u0663S", "1x", "S", "5", ""])
async def test_a_malformed_grpc_timeout_is_internal_and_never_handled(
    nursery: trio.Nursery, socket_dir: pathlib.Path, timeout: str
) -> None:
    # The spec: 1 to 8 ASCII digits, then one of H M S m u n.  grpc-go answers a
    # malformed one with :status 400 and INTERNAL "malformed grpc-timeout".
    counting = CountingAllocate()
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": counting})
    answer = await raw_call(path, request(add=[("grpc-timeout", timeout)]), [GOOD_BODY])
    assert answer.outcome == "http-400/status-INTERNAL"
    assert f"malformed grpc-timeout {timeout!r}" in answer.message
    assert counting.calls == 0


@pytest.mark.parametrize("timeout", ["0S", "0m", "0n", "1n"])
async def test_an_expired_grpc_timeout_is_deadline_exceeded_and_never_handled(
    nursery: trio.Nursery, socket_dir: pathlib.Path, timeout: str
) -> None:
    counting = CountingAllocate()
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": counting})
    answer = await raw_call(path, request(add=[("grpc-timeout", timeout)]), [GOOD_BODY])
    assert answer.outcome == "status-DEADLINE_EXCEEDED"
    assert "deadline" in answer.message
    assert counting.calls == 0


BAD_CONTENT_TYPES = {
    "application/grpcfoo": request(replace={"content-type": "application/grpcfoo"}),
    "application/grpc-web": request(replace={"content-type": "application/grpc-web"}),
    "application/json": request(replace={"content-type": "application/json"}),
    "empty": request(replace={"content-type": ""}),
    "missing": request(drop="content-type"),
    "twice": request(add=[("content-type", "application/grpc")]),
}


@pytest.mark.parametrize("headers", list(BAD_CONTENT_TYPES.values()), ids=list(BAD_CONTENT_TYPES))
async def test_a_content_type_other_than_grpc_is_415_internal_and_never_handled(
    nursery: trio.Nursery, socket_dir: pathlib.Path, headers: list[Header]
) -> None:
    # As grpc-go answers: :status 415 and a grpc-status, in one HEADERS frame ending the
    # stream.
    counting = CountingAllocate()
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": counting})
    answer = await raw_call(path, headers, [GOOD_BODY])
    assert answer.outcome == "http-415/status-INTERNAL"
    assert "content-type" in answer.message
    assert counting.calls == 0


@pytest.mark.parametrize("content_type", [
    "application/grpc", "application/grpc+proto", "application/grpc; charset=utf-8",
    "application/grpc+json",  # an unknown codec is read as proto, as grpc-go does
])
async def test_grpc_content_types_with_a_codec_or_parameters_are_served(
    nursery: trio.Nursery, socket_dir: pathlib.Path, content_type: str
) -> None:
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": allocate})
    answer = await raw_call(path, request(replace={"content-type": content_type}), [GOOD_BODY])
    assert answer.outcome == "status-OK"


async def test_a_method_other_than_post_is_405_internal_and_never_handled(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    counting = CountingAllocate()
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": counting})
    answer = await raw_call(path, request(replace={":method": "PUT"}), [GOOD_BODY])
    assert answer.outcome == "http-405/status-INTERNAL"
    assert "'PUT'" in answer.message
    assert counting.calls == 0



async def test_a_grpc_header_given_twice_fails_that_call_only(
    nursery: trio.Nursery, socket_dir: pathlib.Path
) -> None:
    # purerpc reads grpc-accept-encoding as one value; given twice it got a list and
    # raised AttributeError out of the connection's task, closing the connection.
    counting = CountingAllocate()
    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": counting})
    twice = request(add=[("grpc-accept-encoding", "identity"), ("grpc-accept-encoding", "gzip")])
    conn = await hostile.RawConnection.open(path)
    try:
        with trio.fail_after(HANG_GUARD):
            refused = await hostile.run_stream(conn, hostile.Case("twice", headers=twice, chunks=[GOOD_BODY]))
            served = await hostile.run_stream(conn, hostile.Case("good", headers=request(), chunks=[GOOD_BODY]))
    finally:
        await conn.close()
    assert refused.outcome == "status-INTERNAL"
    assert "malformed request" in refused.message
    assert served.outcome == "status-OK" and counting.calls == 1


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


# HTTP/2's initial window (RFC 9113 §6.9.2).  Our connections open theirs to about a
# GiB; shrunk back to this, a test crosses it many times over in a few calls.
SMALL_WINDOW = 65_535
BLOB = 20_000  # bytes of one large message: about a third of that window


@pytest.fixture
def small_connection_window(monkeypatch: pytest.MonkeyPatch) -> int:
    """Both ends of every connection advertise only HTTP/2's initial connection window."""
    monkeypatch.setattr(GrpcConnection, "CONNECTION_WINDOW", SMALL_WINDOW)
    return SMALL_WINDOW


def large_response(size: int = BLOB) -> v1beta1.AllocateResponse:
    return v1beta1.AllocateResponse(container_responses=[
        v1beta1.ContainerAllocateResponse(envs={"BLOB": "x" * size})])


async def test_one_channel_carries_unary_responses_many_times_its_connection_window(
    nursery: trio.Nursery, socket_dir: pathlib.Path, small_connection_window: int
) -> None:
    # The trailers come in the same read as the message, so each call has its status
    # before its message is consumed: that message's credit must still go back.
    async def big(request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        return large_response()

    path = await start_server(nursery, socket_dir / "p.sock", {"Allocate": big})
    calls = 20 * small_connection_window // BLOB
    sizes = []
    async with open_unix_channel(path) as channel:
        for _ in range(calls):
            response = await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate",
                                           allocate_request("GPU-0"), timeout=HANG_GUARD)
            sizes.append(len(response.container_responses[0].envs["BLOB"]))
    assert sizes == [BLOB] * calls


@pytest.mark.parametrize("behind", ["whole messages", "a message cut off by the window"])
async def test_what_a_call_never_read_gives_its_credit_back(
    nursery: trio.Nursery, socket_dir: pathlib.Path, small_connection_window: int, behind: str
) -> None:
    # Each stream is left after a small first message, with what the window let the
    # server send behind it already received and never to be read.
    if behind == "whole messages":
        sizes = [BLOB] * (2 * small_connection_window // BLOB)
    else:
        sizes = [2 * small_connection_window]

    async def flood(request: v1beta1.Empty, send: Callable[[Any], Awaitable[None]]) -> None:
        await send(devices(1))
        for size in sizes:
            await send(v1beta1.ListAndWatchResponse(devices=[v1beta1.Device(ID="x" * size)]))

    # h2 hands credit back once half the window's worth is processed, so this much is
    # always open on a connection that loses none.
    large = small_connection_window // 3

    async def big(request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        return large_response(large)

    path = await start_server(nursery, socket_dir / "p.sock",
                              {"ListAndWatch": flood, "Allocate": big})
    async with open_unix_channel(path) as channel:
        for _ in range(10):
            async with channel.server_stream(v1beta1.DEVICE_PLUGIN, "ListAndWatch",
                                             v1beta1.Empty(), timeout=HANG_GUARD) as responses:
                async for message in responses:
                    assert [d.ID for d in message.devices] == ["GPU-0"]
                    # Until everything the window let the server send has arrived.
                    await trio.testing.wait_all_tasks_blocked()
                    break
        response = await channel.unary(v1beta1.DEVICE_PLUGIN, "Allocate",
                                       allocate_request("GPU-0"), timeout=HANG_GUARD)
    assert len(response.container_responses[0].envs["BLOB"]) == large


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
