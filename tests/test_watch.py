"""Watching socket paths: kubelet.sock and the plugin's own socket coming, going and
being replaced, and the socket directory itself being deleted and recreated; and a
config file written in place, seen when its writer closes it.

Most behaviours run twice: with inotify and the safety-net poll pushed out to an hour
(so only an inotify event can wake the waiter, and a missed event fails the hang
guard), and with forced polling.  Time bounds are hang guards, never latency asserts.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pathlib
import shutil
import socket
import types
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from trio_gpu_plugin import _watch
from trio_gpu_plugin._watch import Identity, identity, wait_for_change

HANG_GUARD = 5.0
# Long enough that only an inotify event (not the safety net) can end a wait.
NEVER = 3600.0

MODES: dict[str, dict[str, Any]] = {
    "inotify": {"use_inotify": True, "poll_interval": NEVER},
    "polling": {"use_inotify": False, "fallback_poll_interval": 0.01},
}

Snapshot = dict[str, Identity]


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Keyword arguments for wait_for_change: inotify only, or polling only."""
    return MODES[request.param]


def bind(path: pathlib.Path) -> socket.socket:
    """A Unix socket bound at ``path``, as kubelet or the plugin would create it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.fspath(path))
    return sock


def snapshot(*paths: pathlib.Path) -> Snapshot:
    return {os.fspath(p): identity(p) for p in paths}


class Waiter:
    """One wait_for_change call running in the background, so the test can change the
    filesystem while it waits."""

    def __init__(self) -> None:
        self.result: Snapshot | None = None
        self.done = trio.Event()

    async def run(self, baseline: Snapshot, kwargs: dict[str, Any]) -> None:
        self.result = await wait_for_change(baseline, **kwargs)
        self.done.set()

    async def result_within_guard(self) -> Snapshot:
        with trio.fail_after(HANG_GUARD):
            await self.done.wait()
        assert self.result is not None
        return self.result


async def start_waiter(
    nursery: trio.Nursery, baseline: Snapshot, kwargs: dict[str, Any]
) -> Waiter:
    waiter = Waiter()
    nursery.start_soon(waiter.run, baseline, kwargs)
    # Let it arm its watches and block before the test changes anything; otherwise the
    # test would exercise the stale-baseline path instead.
    await all_tasks_blocked()
    return waiter


async def all_tasks_blocked() -> None:
    """Wait until every task is blocked; a waiter that spins instead fails the guard."""
    with trio.fail_after(HANG_GUARD):
        await trio.testing.wait_all_tasks_blocked()


async def settle() -> None:
    """Give a waiter the chance to wake up, look and (wrongly) return: several poll
    periods in polling mode, and every queued inotify event handled."""
    await trio.sleep(0.05)
    await all_tasks_blocked()


async def watch_forever(
    baseline: Snapshot, kwargs: dict[str, Any], send: trio.MemorySendChannel[Snapshot]
) -> None:
    """The plugin's loop: each result is the next baseline, so nothing is missed."""
    async with send:
        while True:
            baseline = await wait_for_change(baseline, **kwargs)
            await send.send(baseline)


async def next_matching(
    receive: trio.MemoryReceiveChannel[Snapshot], predicate: Callable[[Snapshot], bool]
) -> Snapshot:
    """The first report satisfying ``predicate`` (intermediate states may come first)."""
    with trio.fail_after(HANG_GUARD):
        async for report in receive:
            if predicate(report):
                return report
    raise AssertionError("the watcher stopped")


def test_identity_of_missing_path_is_none(tmp_path: pathlib.Path) -> None:
    assert identity(tmp_path / "absent") is None
    (tmp_path / "file").write_text("")
    # A path through a regular file cannot exist either (ENOTDIR, not an error).
    assert identity(tmp_path / "file" / "kubelet.sock") is None


def test_identity_names_a_symlink_itself_not_its_target(tmp_path: pathlib.Path) -> None:
    (tmp_path / "target").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert identity(tmp_path / "link") != identity(tmp_path / "target")
    (tmp_path / "target").unlink()
    assert identity(tmp_path / "link") is not None  # dangling, but there


async def test_kubelet_socket_created_wakes_the_waiter(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    kubelet = socket_dir / "kubelet.sock"
    async with trio.open_nursery() as nursery:
        waiter = await start_waiter(nursery, snapshot(kubelet), mode)
        with bind(kubelet):
            assert await waiter.result_within_guard() == snapshot(kubelet)
            assert identity(kubelet) is not None


async def test_kubelet_socket_deleted_wakes_the_waiter(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    kubelet = socket_dir / "kubelet.sock"
    with bind(kubelet):
        async with trio.open_nursery() as nursery:
            waiter = await start_waiter(nursery, snapshot(kubelet), mode)
            kubelet.unlink()
            assert await waiter.result_within_guard() == {os.fspath(kubelet): None}


async def test_plugin_socket_deleted_wakes_the_waiter_and_reports_both_paths(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    kubelet, plugin = socket_dir / "kubelet.sock", socket_dir / "gpu.sock"
    with bind(kubelet), bind(plugin):
        baseline = snapshot(kubelet, plugin)
        async with trio.open_nursery() as nursery:
            waiter = await start_waiter(nursery, baseline, mode)
            plugin.unlink()
            result = await waiter.result_within_guard()
    assert result == {os.fspath(kubelet): baseline[os.fspath(kubelet)], os.fspath(plugin): None}
    assert list(result) == list(baseline)


async def test_socket_replaced_by_a_new_inode_wakes_the_waiter(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    kubelet = socket_dir / "kubelet.sock"
    with bind(kubelet):
        baseline = snapshot(kubelet)
        async with trio.open_nursery() as nursery:
            waiter = await start_waiter(nursery, baseline, mode)
            # The old socket stays open, so its inode cannot be freed and reused.
            kubelet.unlink()
            with bind(kubelet):
                result = await waiter.result_within_guard()
                assert result == snapshot(kubelet) != baseline
                assert result[os.fspath(kubelet)] is not None


async def test_kubelet_restart_is_seen_even_when_the_inode_number_is_reused(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    # A restarting kubelet: the old process is gone (socket closed), the new one
    # removes the stale file and binds.  ext4 hands the freed inode number straight to
    # the new socket, so (st_dev, st_ino) alone would call this "no change".
    kubelet = socket_dir / "kubelet.sock"
    bind(kubelet).close()
    baseline = snapshot(kubelet)
    # Kernels without fine-grained timestamps stamp ctime from a clock that ticks every
    # few milliseconds; a real restart takes far longer than this.
    await trio.sleep(0.05)
    async with trio.open_nursery() as nursery:
        waiter = await start_waiter(nursery, baseline, mode)
        # No checkpoint between the two steps: the waiter can only see the end state.
        kubelet.unlink()
        with bind(kubelet):
            assert await waiter.result_within_guard() == snapshot(kubelet) != baseline


async def test_unrelated_changes_in_the_directory_do_not_wake_the_waiter(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    kubelet = socket_dir / "kubelet.sock"
    with bind(kubelet):
        baseline = snapshot(kubelet)
        async with trio.open_nursery() as nursery:
            waiter = await start_waiter(nursery, baseline, mode)
            (socket_dir / "other-plugin.sock").write_text("")
            (socket_dir / "other-plugin.sock").rename(socket_dir / "renamed")
            (socket_dir / "renamed").unlink()
            with bind(socket_dir / "another-vendor.sock"):
                pass
            (socket_dir / "subdir").mkdir()
            # The parent directory is watched too; a sibling there is just as unrelated.
            sibling = socket_dir.parent / (socket_dir.name + "-sibling")
            sibling.mkdir()
            sibling.rmdir()
            await settle()
            assert not waiter.done.is_set()
            nursery.cancel_scope.cancel()


async def test_stale_baseline_returns_at_once(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    # The change happened between the caller's look and the call.  Both intervals are
    # an hour, so only the look before waiting can return in time.
    kubelet = socket_dir / "kubelet.sock"
    stale = snapshot(kubelet)
    with bind(kubelet), trio.fail_after(HANG_GUARD):
        result = await wait_for_change(
            stale, **{**mode, "poll_interval": NEVER, "fallback_poll_interval": NEVER}
        )
        assert result == snapshot(kubelet) != stale


async def test_cancelled_caller_is_cancelled_even_when_the_baseline_is_stale(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    kubelet = socket_dir / "kubelet.sock"
    stale = snapshot(kubelet)
    with bind(kubelet), trio.CancelScope() as scope:
        scope.cancel()
        await wait_for_change(stale, **mode)
    assert scope.cancelled_caught


async def test_directory_deleted_and_recreated_with_the_socket_is_seen_every_time(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    sockets = socket_dir / "device-plugins"
    kubelet = sockets / "kubelet.sock"
    sockets.mkdir()
    held = bind(kubelet)
    send, receive = trio.open_memory_channel[Snapshot](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_forever, snapshot(kubelet), mode, send)
        await all_tasks_blocked()
        for _ in range(2):
            # Gone and back in one step: the watcher may or may not see the gap.
            held.close()
            shutil.rmtree(sockets)
            sockets.mkdir()
            held = bind(kubelet)
            new = identity(kubelet)
            await next_matching(receive, lambda r: r[os.fspath(kubelet)] == new)
        nursery.cancel_scope.cancel()
    held.close()


async def test_directory_deleted_and_recreated_empty_then_socket_created_is_seen(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    # The case where watchfiles goes silent: the new directory is a new inode, and only
    # a watcher that re-arms on it sees the socket appear inside.
    sockets = socket_dir / "device-plugins"
    kubelet, plugin = sockets / "kubelet.sock", sockets / "gpu.sock"
    sockets.mkdir()
    held = [bind(kubelet), bind(plugin)]
    send, receive = trio.open_memory_channel[Snapshot](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_forever, snapshot(kubelet, plugin), mode, send)
        await all_tasks_blocked()
        for _ in range(2):
            for sock in held:
                sock.close()
            shutil.rmtree(sockets)
            await next_matching(receive, lambda r: set(r.values()) == {None})
            await settle()  # the watcher is waiting again, with no directory to watch
            sockets.mkdir()
            await settle()  # the watcher is waiting on the new, empty directory
            held = [bind(kubelet)]
            new = identity(kubelet)
            report = await next_matching(receive, lambda r: r[os.fspath(kubelet)] == new)
            assert report[os.fspath(plugin)] is None
            held.append(bind(plugin))
            new = identity(plugin)
            await next_matching(receive, lambda r: r[os.fspath(plugin)] == new)
        nursery.cancel_scope.cancel()
    for sock in held:
        sock.close()


async def test_directory_replaced_by_rename_is_seen(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    sockets = socket_dir / "device-plugins"
    kubelet = sockets / "kubelet.sock"
    sockets.mkdir()
    staged = socket_dir / "staged"
    staged.mkdir()
    with bind(kubelet), bind(staged / "kubelet.sock"):
        baseline = snapshot(kubelet)
        async with trio.open_nursery() as nursery:
            waiter = await start_waiter(nursery, baseline, mode)
            sockets.rename(socket_dir / "old")
            staged.rename(sockets)
            assert await waiter.result_within_guard() == snapshot(kubelet) != baseline


async def test_directory_absent_at_start_then_created_with_the_socket_wakes_the_waiter(
    socket_dir: pathlib.Path, mode: dict[str, Any]
) -> None:
    # Two missing levels: the watch must move down one directory at a time.
    outer = socket_dir / "kubelet"
    sockets = outer / "device-plugins"
    kubelet = sockets / "kubelet.sock"
    async with trio.open_nursery() as nursery:
        waiter = await start_waiter(nursery, snapshot(kubelet), mode)
        outer.mkdir()
        await settle()
        sockets.mkdir()
        await settle()
        assert not waiter.done.is_set()
        with bind(kubelet):
            assert await waiter.result_within_guard() == snapshot(kubelet)


def append(path: pathlib.Path) -> None:
    """``echo ... >> path``: open, write, close; the inode stays."""
    with open(path, "a") as stream:
        stream.write("# appended\n")


def copy_over(path: pathlib.Path) -> None:
    """``cp staging/new.yaml path``: truncated and written in place; the inode stays.
    The new file is written in a directory nobody watches, so that only the write to
    ``path`` can wake a waiter."""
    new = path.parent.parent / "staging" / "new.yaml"
    new.write_text("version: v1\nflags:\n  migStrategy: mixed\n")
    shutil.copyfile(new, path)


@pytest.mark.parametrize("write", [append, copy_over])
async def test_a_file_written_in_place_wakes_the_waiter(
    tmp_path: pathlib.Path, mode: dict[str, Any], write: Callable[[pathlib.Path], None]
) -> None:
    # A config file edited in place: no entry comes or goes in its directory, so only
    # the close after the write (or a poll) can say it changed.
    config = tmp_path / "live" / "config.yaml"
    config.parent.mkdir()
    (tmp_path / "staging").mkdir()
    config.write_text("version: v1\n")
    inode = config.stat().st_ino
    baseline = snapshot(config)
    # ctime comes from a clock that may tick only every few milliseconds; an operator's
    # edit comes far later than the file's creation.
    await trio.sleep(0.05)
    async with trio.open_nursery() as nursery:
        waiter = await start_waiter(nursery, baseline, mode)
        write(config)
        result = await waiter.result_within_guard()
    assert result == snapshot(config) != baseline
    assert config.stat().st_ino == inode, "written in place, not replaced"


async def test_a_write_wakes_the_waiter_when_the_writer_closes_the_file(
    tmp_path: pathlib.Path,
) -> None:
    # IN_CLOSE_WRITE, not IN_MODIFY: a file half written is not read.
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\n")
    baseline = snapshot(config)
    await trio.sleep(0.05)
    async with trio.open_nursery() as nursery:
        waiter = await start_waiter(nursery, baseline, MODES["inotify"])
        with open(config, "a") as stream:
            stream.write("flags:\n")
            stream.flush()
            await settle()
            assert not waiter.done.is_set(), "woken by a write before the writer finished"
            stream.write("  migStrategy: mixed\n")
        assert await waiter.result_within_guard() == snapshot(config) != baseline


def test_only_the_directory_of_a_regular_file_listens_for_writes(
    socket_dir: pathlib.Path,
) -> None:
    # The kubelet rewrites its checkpoint file next to kubelet.sock on every allocation;
    # a socket's directory need not wake for that.
    kubelet, config = socket_dir / "sockets" / "kubelet.sock", socket_dir / "config.yaml"
    kubelet.parent.mkdir()
    config.write_text("version: v1\n")
    with bind(kubelet):
        masks = _watch._directory_masks({"k": os.fspath(kubelet), "c": os.fspath(config)})
    assert masks[os.fspath(kubelet.parent)] & _watch.IN_CLOSE_WRITE == 0
    assert masks[os.fspath(socket_dir)] & _watch.IN_CLOSE_WRITE
    assert masks[os.fspath(socket_dir)] & 0x2 == 0, "not IN_MODIFY: every write() would wake"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_cancellation_releases_the_inotify_fd(socket_dir: pathlib.Path) -> None:
    kubelet = socket_dir / "kubelet.sock"
    baseline = snapshot(kubelet)
    before = open_fds()
    for cycle in range(200):
        async with trio.open_nursery() as nursery:
            waiter = await start_waiter(nursery, baseline, MODES["inotify"])
            if cycle == 0:
                assert open_fds() == before + 1  # the test does watch an inotify fd
            nursery.cancel_scope.cancel()
        assert not waiter.done.is_set()
    assert open_fds() == before


async def test_use_inotify_true_raises_when_inotify_cannot_be_created(
    socket_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_instances_left() -> _watch._Inotify:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(_watch, "_open_inotify", no_instances_left)
    with pytest.raises(OSError, match="inotify is unavailable: Too many open files") as info:
        await wait_for_change(snapshot(socket_dir / "kubelet.sock"), use_inotify=True)
    assert info.value.errno == errno.EMFILE


async def test_use_inotify_true_raises_when_libc_lacks_inotify(
    socket_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_watch, "_load_libc", lambda: types.SimpleNamespace())
    with pytest.raises(OSError, match="no inotify") as info:
        await wait_for_change(snapshot(socket_dir / "kubelet.sock"), use_inotify=True)
    assert info.value.errno == errno.ENOSYS


async def test_use_inotify_true_raises_when_inotify_init_fails(
    socket_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def inotify_init1(flags: int) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    def inotify_add_watch(fd: int, path: bytes, mask: int) -> int:
        raise AssertionError("no instance, so no watches")

    monkeypatch.setattr(
        _watch,
        "_load_libc",
        lambda: types.SimpleNamespace(
            inotify_init1=inotify_init1, inotify_add_watch=inotify_add_watch
        ),
    )
    with pytest.raises(OSError, match="inotify_init1") as info:
        await wait_for_change(snapshot(socket_dir / "kubelet.sock"), use_inotify=True)
    assert info.value.errno == errno.ENOSYS


async def test_without_inotify_the_waiter_polls_and_warns_once(
    socket_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_instances_left() -> _watch._Inotify:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(_watch, "_open_inotify", no_instances_left)
    kubelet = socket_dir / "kubelet.sock"
    caplog.set_level(logging.WARNING, logger="trio_gpu_plugin.watch")
    async with trio.open_nursery() as nursery:
        waiter = await start_waiter(
            nursery, snapshot(kubelet), {"fallback_poll_interval": 0.01, "poll_interval": NEVER}
        )
        await settle()
        with bind(kubelet):
            assert await waiter.result_within_guard() == snapshot(kubelet)
    warnings = [r for r in caplog.records if r.name == "trio_gpu_plugin.watch"]
    assert len(warnings) == 1
    assert "Too many open files" in warnings[0].getMessage()


async def test_forced_polling_does_not_warn(
    socket_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet = socket_dir / "kubelet.sock"
    caplog.set_level(logging.DEBUG, logger="trio_gpu_plugin.watch")
    with bind(kubelet), trio.fail_after(HANG_GUARD):
        await wait_for_change({os.fspath(kubelet): None}, **MODES["polling"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_directory_that_cannot_be_watched_is_polled_instead(
    socket_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # inotify works but every watch fails as when fs.inotify.max_user_watches is spent.
    real = _watch._load_libc()

    def inotify_add_watch(fd: int, path: bytes, mask: int) -> int:
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(
        _watch,
        "_load_libc",
        lambda: types.SimpleNamespace(
            inotify_init1=real.inotify_init1, inotify_add_watch=inotify_add_watch
        ),
    )
    kubelet = socket_dir / "kubelet.sock"
    caplog.set_level(logging.WARNING, logger="trio_gpu_plugin.watch")
    kwargs = {"use_inotify": True, "poll_interval": NEVER, "fallback_poll_interval": 0.01}
    async with trio.open_nursery() as nursery:
        waiter = await start_waiter(nursery, snapshot(kubelet), kwargs)
        await settle()  # several polls: each would warn again if warnings were not kept
        with bind(kubelet):
            assert await waiter.result_within_guard() == snapshot(kubelet)
    messages = [r.getMessage() for r in caplog.records if r.name == "trio_gpu_plugin.watch"]
    # One warning per directory (the socket directory and its parent), not per poll.
    assert len(messages) == 2
    assert all("No space left on device" in m for m in messages)


@pytest.mark.parametrize(
    "kwargs",
    [{"poll_interval": 0}, {"fallback_poll_interval": -1.0}, {"poll_interval": float("nan")}],
)
async def test_nonpositive_intervals_are_rejected(
    socket_dir: pathlib.Path, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        await wait_for_change(snapshot(socket_dir / "kubelet.sock"), **kwargs)


async def test_empty_baseline_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one path"):
        await wait_for_change({})


async def test_one_path_watcher_serves_many_waits_on_one_inotify_instance(
    socket_dir: pathlib.Path,
) -> None:
    # The plugin keeps one watcher per resource: closing an inotify instance costs
    # milliseconds, which would otherwise land in every re-registration.
    kubelet = socket_dir / "kubelet.sock"
    with _watch.PathWatcher(poll_interval=3600) as watcher:
        baseline = snapshot(kubelet)
        fds = open_fds()
        for _ in range(20):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(os.fspath(kubelet))
            with trio.fail_after(HANG_GUARD):
                baseline = await watcher.wait_for_change(baseline)
            assert baseline == snapshot(kubelet)
            sock.close()
            kubelet.unlink()
            with trio.fail_after(HANG_GUARD):
                baseline = await watcher.wait_for_change(baseline)
            assert baseline == {os.fspath(kubelet): None}
        assert open_fds() == fds + 1, "one inotify instance for all the waits"
    with pytest.raises(RuntimeError, match="closed"):
        await watcher.wait_for_change(baseline)
