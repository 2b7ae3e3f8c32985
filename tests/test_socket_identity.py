"""Our served socket's file: removed on exit only while it is still ours, and never taken
from a process that is serving it.

"Ours" is the watch's identity (``_watch.identity``: device, inode number and change
time), not the inode number alone: ext4 hands a freed inode number to the next file
created, so a successor bound at our path usually gets our socket's number.  Tests that
need that reuse fake it (every ``lstat`` of the path reports one inode number), so they
hold on any filesystem under /tmp.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import socket
import time
from typing import Any

import pytest
import trio

from trio_gpu_plugin import (
    DevicePlugin,
    Resource,
    Service,
    SocketInUseError,
    open_unix_channel,
    serve_unix,
)
from trio_gpu_plugin._logging import REMINDER_INTERVAL
from trio_gpu_plugin._watch import identity
from trio_gpu_plugin.proto import v1beta1
from trio_gpu_plugin.testing import FakeKubelet, SimulatedDeviceSource

HANG_GUARD = 10.0
REUSED_INODE_NUMBER = 4242
# The clock Linux stamps files with where timestamps are coarse (<linux/time.h>; the
# time module names it from Python 3.13 only).
CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)


async def options(request: v1beta1.Empty) -> v1beta1.DevicePluginOptions:
    return v1beta1.DevicePluginOptions(pre_start_required=True)


def service() -> list[Service]:
    return [Service(v1beta1.DEVICE_PLUGIN, {"GetDevicePluginOptions": options})]


async def call(path: pathlib.Path) -> v1beta1.DevicePluginOptions:
    async with open_unix_channel(path) as channel:
        return await channel.unary(v1beta1.DEVICE_PLUGIN, "GetDevicePluginOptions",
                                   v1beta1.Empty(), timeout=HANG_GUARD)


def listen(path: pathlib.Path) -> socket.socket:
    """A socket listening at ``path``, as another process serving it would hold."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    sock.listen()
    return sock


class _SameInodeNumber:
    """An ``os.stat_result`` with its inode number replaced."""

    def __init__(self, real: os.stat_result) -> None:
        self._real = real
        self.st_ino = REUSED_INODE_NUMBER

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def every_file_at_gets_one_inode_number(monkeypatch: pytest.MonkeyPatch,
                                        path: pathlib.Path) -> None:
    """What ext4 does to a socket replaced at ``path``, made certain."""
    real_lstat = os.lstat

    def lstat(target: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_lstat(target, *args, **kwargs)
        if isinstance(target, (str, os.PathLike)) and os.fspath(target) == os.fspath(path):
            return _SameInodeNumber(result)
        return result

    monkeypatch.setattr(os, "lstat", lstat)


async def until_a_new_file_gets_a_later_change_time(path: pathlib.Path) -> None:
    """Wait (a clock tick at most) until a file created now cannot share the change time
    of the one at ``path``: kernels without fine-grained timestamps stamp files with a
    coarse clock."""
    stamped = os.lstat(path).st_ctime_ns
    while time.clock_gettime_ns(CLOCK_REALTIME_COARSE) <= stamped:
        await trio.sleep(0.001)


async def test_an_exiting_server_leaves_the_socket_of_a_successor_with_its_inode_number(
    socket_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = socket_dir / "p.sock"
    every_file_at_gets_one_inode_number(monkeypatch, path)
    with contextlib.ExitStack() as successor:
        async with trio.open_nursery() as server:
            await server.start(serve_unix, path, service())
            ours = identity(path)
            await until_a_new_file_gets_a_later_change_time(path)
            os.unlink(path)  # the kubelet clearing its directory, say
            successor.enter_context(listen(path))
            theirs = identity(path)
            assert os.lstat(path).st_ino == REUSED_INODE_NUMBER and theirs != ours
            server.cancel_scope.cancel()
        # Our server has exited; the successor's socket is still at the path.
        assert identity(path) == theirs


async def test_an_exiting_server_removes_its_own_socket(socket_dir: pathlib.Path) -> None:
    path = socket_dir / "p.sock"
    async with trio.open_nursery() as server:
        await server.start(serve_unix, path, service())
        assert (await call(path)).pre_start_required
        server.cancel_scope.cancel()
    assert not path.exists()


async def test_a_second_server_given_a_served_socket_is_refused_and_the_first_keeps_it(
    socket_dir: pathlib.Path
) -> None:
    path = socket_dir / "p.sock"
    async with trio.open_nursery() as first:
        await first.start(serve_unix, path, service())
        served = identity(path)
        with pytest.raises(OSError) as refused:
            await first.start(serve_unix, path, service())
        assert refused.value.errno == errno.EADDRINUSE
        assert f"{path}: another process serves this socket" in str(refused.value)
        assert identity(path) == served
        assert (await call(path)).pre_start_required
        first.cancel_scope.cancel()
    # Once the first has gone, the path is free to serve again.
    async with trio.open_nursery() as second:
        await second.start(serve_unix, path, service())
        assert (await call(path)).pre_start_required
        second.cancel_scope.cancel()


async def test_a_socket_bound_by_another_process_after_we_looked_is_refused_as_in_use(
    nursery: trio.Nursery, socket_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = socket_dir / "p.sock"
    real_lstat = os.lstat
    looked = False

    def lstat(target: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal looked
        if not looked and os.fspath(target) == os.fspath(path):
            looked = True
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real_lstat(target, *args, **kwargs)

    with listen(path):  # bound by another instance between our look and our bind
        theirs = identity(path)
        monkeypatch.setattr(os, "lstat", lstat)
        with pytest.raises(SocketInUseError) as refused:
            await nursery.start(serve_unix, path, service())
        monkeypatch.undo()
        assert looked and refused.value.errno == errno.EADDRINUSE
        assert f"{path}: another process serves this socket" in str(refused.value)
        assert identity(path) == theirs


async def test_a_socket_whose_listener_has_gone_is_replaced(socket_dir: pathlib.Path) -> None:
    path = socket_dir / "p.sock"
    listen(path).close()  # what a killed process leaves: the file, refusing connections
    async with trio.open_nursery() as server:
        await server.start(serve_unix, path, service())
        assert (await call(path)).pre_start_required
        server.cancel_scope.cancel()


async def test_the_plugin_says_once_that_another_process_serves_its_socket_then_takes_it(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource,
    caplog: pytest.LogCaptureFixture
) -> None:
    gpu = "nvidia.com/gpu"
    path = fake_kubelet.socket_dir / "nvidia-gpu.sock"
    plugin = DevicePlugin([Resource(gpu, simulated_node, "nvidia-gpu.sock")],
                          kubelet_socket=fake_kubelet.kubelet_socket)

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "served by another process" in r.getMessage()]

    with caplog.at_level(logging.DEBUG, "trio_gpu_plugin.runtime"):
        other = listen(path)  # a second plugin instance given the same socket, say
        with other:
            served = identity(path)
            nursery.start_soon(plugin.run)
            with trio.fail_after(HANG_GUARD):
                while len(refusals()) < 3:
                    await trio.sleep(0.01)
            assert identity(path) == served  # never replaced while it is served
            assert fake_kubelet.registrations == []
            [problem] = await plugin.check(gpu)
            assert f"{path} is served by another process" in problem.text
        # The other process has gone (killed: its file stays, refusing connections).
        await fake_kubelet.wait_registered(gpu, timeout=HANG_GUARD)
    errors = [r for r in refusals() if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    message = errors[0].getMessage()
    assert f"{gpu}: {path} is served by another process" in message
    assert "another instance of this plugin" in message
    assert "NVIDIA's device plugin still running" in message
    assert any(f"{path} is no longer served by another process" in r.getMessage()
               for r in caplog.records)


async def test_while_another_process_keeps_the_socket_a_reminder_comes_every_ten_minutes(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource,
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    gpu = "nvidia.com/gpu"
    path = fake_kubelet.socket_dir / "nvidia-gpu.sock"
    plugin = DevicePlugin([Resource(gpu, simulated_node, "nvidia-gpu.sock")],
                          kubelet_socket=fake_kubelet.kubelet_socket)
    with caplog.at_level(logging.DEBUG, "trio_gpu_plugin.runtime"), listen(path):
        nursery.start_soon(plugin.run)
        await trio.sleep(25 * 60)
        tries = [r for r in caplog.records if "served by another process" in r.getMessage()]
    assert REMINDER_INTERVAL == 600
    # Tried every few seconds all along; said at the start, after 10 and after 20 min.
    assert len(tries) > 100
    said = [r.getMessage() for r in tries if r.levelno >= logging.WARNING]
    assert len(said) == 3, said
    assert [("still served" in m, "after 10 min" in m, "after 20 min" in m) for m in said] == [
        (False, False, False), (True, True, False), (True, False, True)]
    assert fake_kubelet.registrations == []


async def test_a_socket_that_cannot_be_probed_is_left_alone_with_the_reason(
    nursery: trio.Nursery, socket_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = socket_dir / "p.sock"
    listen(path).close()
    real_connect_ex = socket.socket.connect_ex

    def connect_ex(self: socket.socket, address: Any) -> int:
        # What a non-root process gets from a socket file it may not write to.
        return errno.EACCES if address == os.fspath(path) else real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    left = identity(path)
    with pytest.raises(PermissionError, match=f"{path}: cannot tell whether another process "
                                              "serves this socket"):
        await nursery.start(serve_unix, path, service())
    assert identity(path) == left
