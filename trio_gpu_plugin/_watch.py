"""Notice, promptly, when a socket path is created, deleted or replaced.

The device plugin must react when kubelet.sock appears, disappears or is replaced by a
restarted kubelet, when its own socket is removed (kubelet clears the directory when it
starts), and when the whole socket directory is deleted and recreated.

Strategy: level-based, so that no change can be lost between looking and waiting.

* The caller passes the :data:`Identity` of each path as it last saw it.
  :func:`wait_for_change` arms inotify watches first and only then ``lstat()``\\ s every
  path; if anything already differs it returns at once.  A change that happened after
  the caller's ``lstat()`` but before the watches existed is therefore still seen.
* Events are only wake-ups, never the truth: after every wake-up (events, a queue
  overflow, or the safety-net timeout) the events are drained, the watches re-armed (a
  recreated directory is a new inode and needs a new watch; re-adding an existing watch
  is harmless) and every path ``lstat()``-ed again.  Only a changed identity counts.
* Per distinct parent directory we watch the directory for entries coming and going,
  and its own parent for the directory itself coming and going.  When the directory is
  missing, the nearest existing ancestor is watched instead, so its creation wakes us
  and the next re-arm goes deeper.
* inotify is driven through ``ctypes`` (no dependency) and waited on with
  :func:`trio.lowlevel.wait_readable`.  Without inotify (missing from libc, no instances
  left, or ``use_inotify=False``) we poll with ``lstat()``.  Even with inotify a slow
  ``lstat()`` poll runs as a safety net (a filesystem that emits no events, a watch that
  could not be added).

Why the identity includes ``st_ctime_ns``: filesystems reuse a freed inode number at
once.  On ext4, closing a bound Unix socket, unlinking it and binding a new one at the
same path gave the *same* ``(st_dev, st_ino)`` 200 times out of 200, which is exactly
what a restarting kubelet does to kubelet.sock.  The change time tells the two apart
(it is set when the inode is created).  It also moves on ``chmod``/``chown``/``link``;
such a change is reported too (late: no inotify mask covers it, so only a later wake-up
or the safety net sees it), which errs on the side of re-registering.

Regular files edited in place (``cp new.yaml live.yaml``, ``>>``: a config file) keep
their inode; a write moves their change time, so the identity changes, and the
directory of a watched regular file is also watched for ``IN_CLOSE_WRITE`` so that the
wake-up comes when the writer closes the file.  Not ``IN_MODIFY``: that fires on every
``write()``, waking us for each step of a write that is not finished; the close is the
writer saying it is done.  Sockets and symlinks are never written, so their directories
(the kubelet's, where the kubelet rewrites its checkpoint file) are not woken by writes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from typing import Any, Final

import trio

__all__ = ["Identity", "PathWatcher", "identity", "wait_for_change"]

log = logging.getLogger("trio_gpu_plugin.watch")

#: What identifies the file object at a path: ``(st_dev, st_ino, st_ctime_ns)`` from
#: ``os.lstat`` (so a socket or symlink itself is identified, not what it points to),
#: or ``None`` when nothing is there.  Compare identities only for equality.
Identity = tuple[int, int, int] | None

# From <sys/inotify.h>; stable kernel ABI.
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
IN_MASK_ADD: Final = 0x20000000
# IN_NONBLOCK and IN_CLOEXEC are defined by the kernel as O_NONBLOCK and O_CLOEXEC,
# whose values differ between architectures.
IN_NONBLOCK: Final = os.O_NONBLOCK
IN_CLOEXEC: Final = os.O_CLOEXEC

# The socket directory: its entries coming and going, and the directory going away.
_DIR_MASK: Final = (
    IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
)
# The directory of a watched regular file, also: a file there closed after writing.
_FILE_DIR_MASK: Final = _DIR_MASK | IN_CLOSE_WRITE
# An ancestor: the next directory down coming and going.  (Its own removal still wakes
# us: the kernel always sends IN_IGNORED when a watched inode goes away.)
_ANCESTOR_MASK: Final = IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM
# IN_ONLYDIR: a path that turned into a file is not a directory to watch (ENOTDIR).
# IN_MASK_ADD: two watched paths may reach the same directory (symlinks, bind mounts)
# with different masks; without it the second add would narrow the first.
_ADD_FLAGS: Final = IN_ONLYDIR | IN_MASK_ADD

# struct inotify_event { int wd; uint32_t mask, cookie, len; char name[len]; }
_EVENT_HEADER: Final = struct.Struct("=iIII")
# Larger than any single event (16 + NAME_MAX + 1), so a read never fails with EINVAL.
_READ_SIZE: Final = 65536
# Bound on reads per wake-up, so that a directory with a constant stream of events
# cannot keep us from ever reaching a checkpoint; what is left wakes us again at once.
_MAX_READS_PER_WAKE: Final = 64
# Errors of inotify_add_watch that mean "the directory is not there (any more)":
# the next wake-up re-arms, and the ancestor watch reports it coming back.
_GONE: Final = frozenset({errno.ENOENT, errno.ENOTDIR})


def identity(path: str | os.PathLike[str]) -> Identity:
    """Return the identity of whatever is at ``path`` (not following a final symlink),
    or ``None`` when nothing is (including when a component of the path is a file).

    Other errors (permission denied, a symlink loop) are raised.
    """
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def _snapshot(paths: Mapping[str, str]) -> dict[str, Identity]:
    """The identities of the caller's paths (keys), looked up by absolute path (values)."""
    return {key: identity(target) for key, target in paths.items()}


def _ancestors(directory: str) -> Iterator[str]:
    """Strict ancestors of an absolute, normalised directory, nearest first."""
    while True:
        parent = os.path.dirname(directory)
        if parent == directory:
            return
        yield parent
        directory = parent


@functools.cache
def _load_libc() -> Any:
    """The C library, for inotify.  Tests replace this to simulate a libc without it."""
    # CDLL(None) is the running program, which on Linux links libc dynamically;
    # find_library runs ldconfig in a subprocess, so it is only the fallback.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1  # noqa: B018 (AttributeError when this program lacks it)
    except (OSError, AttributeError):
        name = ctypes.util.find_library("c")
        if name is None:
            raise OSError(errno.ENOSYS, "no C library found") from None
        libc = ctypes.CDLL(name, use_errno=True)
    return libc


class _Inotify:
    """One inotify instance: a non-blocking fd plus the watches added to it."""

    def __init__(self, libc: Any, fd: int) -> None:
        self._libc = libc
        self.fd = fd
        # Watch descriptor -> directory, only for debug logs: we never trust events.
        self._watches: dict[int, str] = {}
        # (directory, errno) pairs already warned about, so a persistent failure
        # (no watches left, no permission) is logged once rather than per wake-up.
        self._warned: set[tuple[str, int]] = set()

    def add_watch(self, directory: str, mask: int) -> bool:
        """Watch ``directory``; return False when it does not exist (a race we expect).

        Errors that mean a bug are raised as OSError; those we survive by polling (no
        permission, no watches left) are logged once and raised as _Unwatchable.
        """
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask | _ADD_FLAGS)
        if wd >= 0:
            self._watches[wd] = directory
            return True
        err = ctypes.get_errno()
        if err in _GONE:
            return False
        if err in (errno.EBADF, errno.EINVAL, errno.EFAULT):
            raise OSError(err, f"inotify_add_watch({directory!r}): {os.strerror(err)}")
        if (directory, err) not in self._warned:
            self._warned.add((directory, err))
            log.warning(
                "cannot watch %s (%s); noticing changes there by polling",
                directory,
                os.strerror(err),
            )
        raise _Unwatchable

    def drain(self) -> None:
        """Read and discard queued events; they only told us to look again."""
        for _ in range(_MAX_READS_PER_WAKE):
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset + _EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            name = data[offset + _EVENT_HEADER.size : offset + _EVENT_HEADER.size + length]
            offset += _EVENT_HEADER.size + length
            if mask & IN_Q_OVERFLOW:
                # Events were lost; harmless, since we re-arm and re-stat every time.
                log.debug("inotify queue overflowed")
                continue
            directory = self._watches.get(wd, "?")
            if mask & IN_IGNORED:
                # The watched inode is gone (deleted, or its filesystem unmounted); the
                # kernel dropped the watch and may reuse its number.
                self._watches.pop(wd, None)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "inotify %s %#x %s", directory, mask, os.fsdecode(name.rstrip(b"\0"))
                )

    def close(self) -> None:
        """Release the fd; tell trio first, so no task is left waiting on a dead fd."""
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)


class _Unwatchable(Exception):
    """Internal: a directory we need exists but cannot be watched; poll instead."""


def _open_inotify() -> _Inotify:
    """A new inotify instance, or OSError saying why there is none.  Tests replace
    this to simulate a kernel or libc without inotify."""
    try:
        libc = _load_libc()
        init1 = libc.inotify_init1
        add_watch = libc.inotify_add_watch
    except AttributeError:
        raise OSError(errno.ENOSYS, "the C library has no inotify") from None
    init1.argtypes = [ctypes.c_int]
    init1.restype = ctypes.c_int
    add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add_watch.restype = ctypes.c_int
    fd = init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    return _Inotify(libc, fd)


def _is_regular_file(path: str) -> bool:
    """Whether ``path`` itself (not a symlink's target) is a regular file now."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        # Absent or unreadable: its identity says so, and its creation wakes us anyway.
        return False


def _directory_masks(paths: Mapping[str, str]) -> dict[str, int]:
    """The mask each watched directory needs: entries coming and going, and for the
    directory of a regular file among ``paths`` also writes to it being finished.

    Looked up on every re-arm: a path that was absent or a socket may have become a
    file.  The masks only ever widen (``IN_MASK_ADD``), which is harmless.
    """
    masks: dict[str, int] = {}
    for target in paths.values():
        directory = os.path.dirname(target)
        mask = _FILE_DIR_MASK if _is_regular_file(target) else _DIR_MASK
        masks[directory] = masks.get(directory, 0) | mask
    return masks


def _arm(inotify: _Inotify, directories: Mapping[str, int]) -> bool:
    """(Re)add every watch the directories (each with its mask) need.  Return False
    when one could not be added for a reason other than the directory being absent."""
    complete = True
    for directory, mask in sorted(directories.items()):
        try:
            inotify.add_watch(directory, mask)
        except _Unwatchable:
            complete = False
        # The nearest existing ancestor: normally the parent, which tells us when the
        # directory is deleted or recreated; when the directory is missing, the first
        # ancestor that exists, which tells us when the next level appears.  Tried even
        # when the directory itself could not be watched: the failure may be its own.
        for ancestor in _ancestors(directory):
            try:
                if inotify.add_watch(ancestor, _ANCESTOR_MASK):
                    break
            except _Unwatchable:
                complete = False
                break
    return complete


async def _wait_with_inotify(
    inotify: _Inotify,
    baseline: Mapping[str, Identity],
    paths: Mapping[str, str],
    poll_interval: float,
    fallback_poll_interval: float,
) -> dict[str, Identity]:
    while True:
        # Arm before looking: whatever changes after this lstat() queues an event.
        complete = _arm(inotify, _directory_masks(paths))
        current = _snapshot(paths)
        if current != baseline:
            return current
        # A directory we could not watch is only noticed by polling, so poll at the
        # fallback rate until the watch can be added.
        timeout = poll_interval if complete else min(poll_interval, fallback_poll_interval)
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(inotify.fd)
        inotify.drain()


async def _wait_by_polling(
    baseline: Mapping[str, Identity], paths: Mapping[str, str], interval: float
) -> dict[str, Identity]:
    while True:
        current = _snapshot(paths)
        if current != baseline:
            return current
        await trio.sleep(interval)


def _check_arguments(
    baseline: Mapping[str, Identity], poll_interval: float, fallback_poll_interval: float
) -> None:
    if not baseline:
        raise ValueError("wait_for_change needs at least one path to watch")
    for name, value in (
        ("poll_interval", poll_interval),
        ("fallback_poll_interval", fallback_poll_interval),
    ):
        if not value > 0:  # also rejects NaN
            raise ValueError(f"{name} must be positive, not {value!r}")


class PathWatcher:
    """A reusable watcher: one inotify instance for any number of waits, one at a time.

    Closing an inotify instance that has watches blocks for several milliseconds (the
    kernel waits for a grace period), which is why a plugin that waits again and again
    keeps one of these rather than calling :func:`wait_for_change` each time.  Use it as
    a context manager, or call :meth:`close`.  The arguments are those of
    :func:`wait_for_change`.
    """

    def __init__(
        self,
        *,
        poll_interval: float = 10.0,
        use_inotify: bool | None = None,
        fallback_poll_interval: float = 0.5,
    ) -> None:
        _check_arguments({"": None}, poll_interval, fallback_poll_interval)
        self.poll_interval = poll_interval
        self.fallback_poll_interval = fallback_poll_interval
        self._use_inotify = use_inotify
        self._inotify: _Inotify | None = None
        self._polling_reason: str | None = None if use_inotify is not False else "not asked for"
        self._closed = False

    def __enter__(self) -> PathWatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the inotify instance (if one was opened)."""
        self._closed = True
        if self._inotify is not None:
            inotify, self._inotify = self._inotify, None
            inotify.close()

    def _instance(self, paths: Mapping[str, str]) -> _Inotify | None:
        if self._inotify is None and self._polling_reason is None:
            try:
                self._inotify = _open_inotify()
            except OSError as exc:
                if self._use_inotify:
                    raise OSError(exc.errno, f"inotify is unavailable: {exc.strerror}") from exc
                self._polling_reason = str(exc.strerror or exc)
                log.warning(
                    "inotify is unavailable (%s); polling %s every %gs",
                    self._polling_reason,
                    ", ".join(paths.values()),
                    self.fallback_poll_interval,
                )
        return self._inotify

    async def wait_for_change(self, baseline: Mapping[str, Identity]) -> dict[str, Identity]:
        """Like :func:`wait_for_change`, on this watcher's inotify instance."""
        if self._closed:
            raise RuntimeError("this PathWatcher is closed")
        _check_arguments(baseline, self.poll_interval, self.fallback_poll_interval)
        # Absolute, normalised paths: the directory arithmetic needs them, and a later
        # chdir() must not change what we watch.
        paths = {key: os.path.abspath(key) for key in baseline}
        # Every trio function checkpoints; without this a stale baseline would return
        # without ever giving a cancelled caller the chance to notice.
        await trio.lowlevel.checkpoint()
        inotify = self._instance(paths)
        if inotify is None:
            return await _wait_by_polling(baseline, paths, self.fallback_poll_interval)
        # Events left from an earlier wait only say "look again", which we are about to.
        inotify.drain()
        return await _wait_with_inotify(
            inotify, baseline, paths, self.poll_interval, self.fallback_poll_interval
        )


async def wait_for_change(
    baseline: Mapping[str, Identity],
    *,
    poll_interval: float = 10.0,
    use_inotify: bool | None = None,
    fallback_poll_interval: float = 0.5,
) -> dict[str, Identity]:
    """Return the current identities of all paths as soon as any differs from baseline.

    ``baseline`` maps each path to the :data:`Identity` the caller last saw (from
    :func:`identity`, or a previous result).  The result has the same keys.  When the
    baseline is already stale the result comes back without waiting, so call this in a
    loop with each result as the next baseline and no change is ever missed (or keep a
    :class:`PathWatcher` for that, which avoids reopening inotify each time).

    ``poll_interval`` bounds how long a change inotify did not report can go unnoticed.
    ``use_inotify``: ``None`` uses inotify when it is available and otherwise polls every
    ``fallback_poll_interval`` seconds (with a warning); ``False`` always polls;
    ``True`` raises :class:`OSError` when inotify is unavailable.

    Cancellation is safe at any point: the inotify instance is closed on the way out.
    """
    _check_arguments(baseline, poll_interval, fallback_poll_interval)
    with PathWatcher(
        poll_interval=poll_interval,
        use_inotify=use_inotify,
        fallback_poll_interval=fallback_poll_interval,
    ) as watcher:
        return await watcher.wait_for_change(baseline)
