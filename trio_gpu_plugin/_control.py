"""The simulated node's fault-injection control socket (``--simulate-control PATH``).

A plugin serving a simulated node can be told to break one of its GPUs while it runs, so
that health checking, ListAndWatch updates and the kubelet's reaction can be watched end
to end.  :func:`serve_control` listens on a Unix socket and applies each request to a
:class:`FaultTarget` (the simulated NVML); :func:`send_control` (trio) and
:func:`send_control_sync` (blocking, for ``trio-gpu-plugin inject``) are the clients.

Protocol
--------

Requests are JSON objects, one per line (UTF-8, each ending in ``\\n``); a connection may
send any number of them.  ``gpu`` is a GPU index (``3`` or ``"3"``), a GPU UUID or a MIG
device UUID (for ``xid``: an error on that MIG instance)::

    {"op": "xid", "gpu": 3, "xid": 79}              optional "gi", "ci": MIG instance IDs;
                                                    optional "action": the recovery action
                                                    the driver records with it (as below)
    {"op": "ecc-dbe", "gpu": "GPU-..."}             a double-bit ECC error
    {"op": "lost", "gpu": 3}                        the GPU falls off the bus
    {"op": "recover", "gpu": 3}                     ... and comes back healthy
    {"op": "hang", "gpu": 3}  {"op": "unhang", "gpu": 3}
                                                    NVML calls naming the GPU block / return
    {"op": "pending", "gpu": 3, "retired_pages": true, "row_remap": false}
                                                    at least one of these and
                                                    "row_remap_failed" (a lasting failure)
    {"op": "recovery-action", "gpu": 3, "action": "gpu_reset"}
                                                    the driver's recovery action (a name,
                                                    its number, or null: not reported)
    {"op": "ecc-errors", "gpu": 3, "count": 5}      more ECC errors; optional "corrected"
    {"op": "fail", "gpu": 3, "calls": ["nvmlDeviceGetMinorNumber"], "code": "gpu_is_lost"}
                                                    these NVML calls fail for the GPU
                                                    ("code": an NVML_ERROR_* name or number)
    {"op": "unfail", "gpu": 3}                      ... and answer again
    {"op": "nvml-down"}  {"op": "nvml-up"}          NVML as a whole stops/starts working
    {"op": "list"}                                  -> {"ok": true, "gpus": [...]}

Each line gets exactly one answer line, in order: ``{"ok": true}`` (``list`` adds
``"gpus"``: per GPU its ``index``, ``uuid``, ``name``, ``minor``, ``pci_bus_id``,
``lost``, ``mig_uuids`` and ``mig_profiles``) or ``{"ok": false, "error": "..."}``,
where the error says what was wrong: not UTF-8, not JSON (with the parser's message),
not an object, a missing or unknown ``op`` (with the valid ones), keys the op does not
take (named), a missing or unknown ``gpu``, an ``xid`` that is not a non-negative
integer, ``gi``/``ci`` that are not non-negative integers, an unknown recovery action or
error code (with the valid names), an NVML call name the simulator does not have (with
the valid ones).  A
bad request fails alone: the connection stays open for the next one.  The one exception
is a line longer than :data:`MAX_LINE` bytes: it is answered with an error and that
connection is closed, since the rest of the stream can no longer be framed.  A final
line the client ends with EOF instead of ``\\n`` is still answered.

The socket is made mode 0600 before it accepts connections: breaking GPUs is for the
node's owner only.  Applied faults are logged at INFO and bad requests at WARNING on the
``trio_gpu_plugin.control`` logger.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final, NoReturn, Protocol

import pynvml
import trio

from ._watch import Identity, identity as identity_of

__all__ = [
    "CONTROL_OPS",
    "FaultTarget",
    "MAX_LINE",
    "request_from_args",
    "send_control",
    "send_control_sync",
    "serve_control",
]

log = logging.getLogger("trio_gpu_plugin.control")

#: The longest request line the server reads, in bytes, without its ``\n``.
MAX_LINE: Final = 64 * 1024

# The keys each op takes besides "op".  Keys outside these are rejected rather than
# ignored: a misspelt "row_remap" silently dropped would inject a different fault than
# the one asked for.
_OP_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "xid": frozenset({"gpu", "xid", "gi", "ci", "action"}),
    "ecc-dbe": frozenset({"gpu"}),
    "lost": frozenset({"gpu"}),
    "recover": frozenset({"gpu"}),
    "hang": frozenset({"gpu"}),
    "unhang": frozenset({"gpu"}),
    "pending": frozenset({"gpu", "retired_pages", "row_remap", "row_remap_failed"}),
    "recovery-action": frozenset({"gpu", "action"}),
    "ecc-errors": frozenset({"gpu", "count", "corrected"}),
    "fail": frozenset({"gpu", "calls", "code"}),
    "unfail": frozenset({"gpu"}),
    "nvml-down": frozenset(),
    "nvml-up": frozenset(),
    "list": frozenset(),
}

#: The request ops the server understands (for a CLI's choices).
CONTROL_OPS: Final[tuple[str, ...]] = tuple(_OP_KEYS)

# Bytes asked of the socket per receive: one maximal line.
_RECEIVE_SIZE: Final = 65536
# An answer is at most a "list" of a node's GPUs; anything near this is not our server.
_MAX_ANSWER: Final = 16 * 1024 * 1024
# How long a connection closed for a too-long line waits for the client to close its
# side.  Closing a Unix socket with unread bytes in it makes the peer's next read fail
# with ECONNRESET instead of a clean EOF after our error line, so the rest is drained.
_CLOSE_GRACE: Final = 0.5
# sockaddr_un.sun_path holds 108 bytes on Linux, the terminating NUL included.
_MAX_UNIX_PATH: Final = 107
_LISTEN_BACKLOG: Final = 16
# How much of a client's value an error message (and so the log) repeats.
_MAX_QUOTED: Final = 60
_DIGITS: Final = re.compile(r"[0-9]+")


class FaultTarget(Protocol):
    """What the control socket breaks: the simulated NVML (``SimulatedNVML``).

    ``gpu`` is an int index, a string of digits, a GPU UUID or a MIG device UUID.  Every
    method raises :class:`KeyError` for an unknown GPU, its message listing the valid ones.
    """

    def gpu_index(self, gpu: int | str) -> int:
        """The index of the GPU that ``gpu`` names (a MIG UUID: its parent GPU)."""
        ...

    def xid(
        self, gpu: int | str, xid: int, *, gi: int | None = None, ci: int | None = None,
        recovery_action: int | None = None,
    ) -> None:
        """Raise an XID error event on ``gpu`` (on a MIG instance if ``gi``/``ci`` given),
        setting the driver's recovery action with it if ``recovery_action`` is given."""
        ...

    def ecc_dbe(self, gpu: int | str) -> None:
        """Raise a double-bit ECC error event on ``gpu``."""
        ...

    def lose(self, gpu: int | str) -> None:
        """Make ``gpu`` fall off the bus."""
        ...

    def recover(self, gpu: int | str) -> None:
        """Bring ``gpu`` back healthy."""
        ...

    def hang(self, gpu: int | str | None = None) -> None:
        """Make every NVML call naming ``gpu`` block until :meth:`unhang`."""
        ...

    def unhang(self, gpu: int | str | None = None) -> None:
        """Let ``gpu``'s blocked NVML calls return."""
        ...

    def set_pending(
        self, gpu: int | str, *, retired_pages: bool | None = None, row_remap: bool | None = None,
        row_remap_failed: bool | None = None,
    ) -> None:
        """Set or clear pending page retirement / row remapping, or a failed row
        remapping, on ``gpu`` (None: as is)."""
        ...

    def set_recovery_action(self, gpu: int | str, action: int | None) -> None:
        """The driver's recovery action for ``gpu`` (``None``: the driver reports none)."""
        ...

    def add_ecc_errors(self, gpu: int | str, count: int, *, corrected: bool = False) -> None:
        """``count`` more ECC errors on ``gpu`` (uncorrectable unless ``corrected``)."""
        ...

    def fail(self, gpu: int | str, calls: Iterable[str] | str, code: int) -> None:
        """Make these NVML calls fail with ``code`` whenever they name ``gpu`` (or its MIG
        devices), until :meth:`unfail`; ``ValueError`` for a call name or code it does
        not take, its message listing the valid names."""
        ...

    def unfail(self, gpu: int | str) -> None:
        """Undo :meth:`fail` for ``gpu``."""
        ...

    def nvml_down(self) -> None:
        """Make every NVML call fail as if the driver had gone."""
        ...

    def nvml_up(self) -> None:
        """Make NVML work again."""
        ...

    def describe(self) -> list[dict[str, Any]]:
        """One JSON-able dict per GPU: ``index``, ``uuid``, ``name`` and more (the
        simulator's: ``minor``, ``pci_bus_id``, ``lost``, ``mig_uuids``, ``mig_profiles``)."""
        ...


class _BadRequest(Exception):
    """A request the server answers with ``{"ok": false, "error": message}``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _quote(value: object) -> str:
    """``value`` as the client wrote it (JSON), shortened so a huge value cannot flood
    the answer or the log."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _MAX_QUOTED else text[: _MAX_QUOTED - 3] + "..."


def _names(keys: Iterable[str]) -> str:
    return ", ".join(_quote(k) for k in sorted(keys))


def _type_name(value: object) -> str:
    # JSON's names for what json.loads can return, since the client wrote JSON.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


# --- request parsing -------------------------------------------------------------------


def _decode_request(line: bytes) -> dict[str, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadRequest(
            f"request is not valid UTF-8: byte 0x{line[exc.start]:02x} at offset {exc.start} "
            f"({exc.reason})"
        ) from None
    try:
        request = json.loads(text)
    except RecursionError:
        raise _BadRequest("request is not JSON: arrays or objects nested too deeply") from None
    except ValueError as exc:
        # JSONDecodeError, and also the int() digit limit (a 5000-digit number).
        raise _BadRequest(f"request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise _BadRequest(f"request must be a JSON object, got {_type_name(request)}")
    return request


def _op(request: Mapping[str, Any]) -> str:
    valid = ", ".join(CONTROL_OPS)
    if "op" not in request:
        raise _BadRequest(f'request has no "op"; valid ops: {valid}')
    op = request["op"]
    if not isinstance(op, str) or op not in _OP_KEYS:
        raise _BadRequest(f"unknown op {_quote(op)}; valid ops: {valid}")
    unexpected = set(request) - _OP_KEYS[op] - {"op"}
    if unexpected:
        takes = _names(_OP_KEYS[op]) or "nothing else"
        raise _BadRequest(
            f"unexpected key{'s' if len(unexpected) > 1 else ''} for op {_quote(op)}: "
            f"{_names(unexpected)} (it takes {takes})"
        )
    return op


def _gpu(request: Mapping[str, Any], op: str) -> int | str:
    if "gpu" not in request:
        raise _BadRequest(f'op {_quote(op)} needs "gpu" (a GPU index or UUID)')
    gpu = request["gpu"]
    # bool is an int subclass, but true is no GPU index.
    if isinstance(gpu, bool) or not isinstance(gpu, (int, str)):
        raise _BadRequest(f'"gpu" must be a GPU index or UUID, got {_quote(gpu)}')
    return gpu


def _natural(request: Mapping[str, Any], key: str) -> int | None:
    """``request[key]`` if it is a non-negative integer, None if absent."""
    if key not in request:
        return None
    value = request[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadRequest(f'"{key}" must be a non-negative integer, got {_quote(value)}')
    return value


def _flag(request: Mapping[str, Any], key: str) -> bool | None:
    if key not in request:
        return None
    value = request[key]
    if not isinstance(value, bool):
        raise _BadRequest(f'"{key}" must be true or false, got {_quote(value)}')
    return value


#: ``NVML_GPU_RECOVERY_ACTION_*`` by name, for requests that name the action.
_ACTIONS: Final = {name.removeprefix("NVML_GPU_RECOVERY_ACTION_").lower(): getattr(pynvml, name)
                   for name in dir(pynvml) if name.startswith("NVML_GPU_RECOVERY_ACTION_")}
_ACTION_NAMES: Final = {value: name.upper() for name, value in _ACTIONS.items()}


def _action(request: Mapping[str, Any], op: str = "recovery-action") -> int | None:
    """``request["action"]``: an action name (``gpu_reset``), its number, or null (the
    driver reports no recovery actions)."""
    if "action" not in request:
        raise _BadRequest(f'op "{op}" needs "action" (e.g. "gpu_reset", "none", '
                          'or null for a driver that does not report one)')
    value = request["action"]
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in _ACTIONS:
        return int(_ACTIONS[value.lower()])
    if isinstance(value, int) and not isinstance(value, bool) and value in _ACTION_NAMES:
        return value
    raise _BadRequest(f'"action" must be one of {", ".join(sorted(_ACTIONS))} (or its number, '
                      f"or null), got {_quote(value)}")


#: ``NVML_ERROR_*`` codes by name (``gpu_is_lost``), for requests that name the code.
_ERRORS: Final = {name.removeprefix("NVML_ERROR_").lower(): getattr(pynvml, name)
                  for name in dir(pynvml)
                  if name.startswith("NVML_ERROR_") and isinstance(getattr(pynvml, name), int)
                  and getattr(pynvml, name) > 0}
_ERROR_NAMES: Final = {value: name.upper() for name, value in _ERRORS.items()}


def _calls(request: Mapping[str, Any]) -> list[str]:
    """``request["calls"]``: NVML method names, as a list or one string (checked by the
    target, which knows which it has)."""
    if "calls" not in request:
        raise _BadRequest('op "fail" needs "calls" (NVML method names, e.g. '
                          '["nvmlDeviceGetMinorNumber"])')
    value = request["calls"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _BadRequest(f'"calls" must be a non-empty list of NVML method names, got '
                          f"{_quote(value)}")
    return list(value)


def _code(request: Mapping[str, Any]) -> int:
    """``request["code"]``: an ``NVML_ERROR_*`` name (``gpu_is_lost``, any case, with or
    without the prefix) or its number."""
    if "code" not in request:
        raise _BadRequest('op "fail" needs "code" (e.g. "gpu_is_lost", "unknown" or a number)')
    value = request["code"]
    if isinstance(value, str):
        name = value.lower().removeprefix("nvml_error_")
        if name in _ERRORS:
            return int(_ERRORS[name])
    elif isinstance(value, int) and not isinstance(value, bool) and value in _ERROR_NAMES:
        return value
    raise _BadRequest(f'"code" must be an NVML error: one of {", ".join(sorted(_ERRORS))} (or '
                      f"its number), got {_quote(value)}")


def _unknown_gpu(exc: KeyError) -> _BadRequest:
    # KeyError's str() is the repr of its argument; the target's message is the argument.
    return _BadRequest(str(exc.args[0]) if exc.args else "unknown GPU")


# --- server ----------------------------------------------------------------------------


class _Server:
    def __init__(self, target: FaultTarget, path: str) -> None:
        self._target = target
        self._path = path
        self._numbers = itertools.count(1)

    def _label(self, gpu: int | str, index: int) -> str:
        """How the log names a GPU: ``GPU 3 (GPU-...)``, plus the MIG UUID if one was used."""
        uuid = next(
            (d.get("uuid") for d in self._target.describe() if d.get("index") == index), None
        )
        # dict.fromkeys: the GPU UUID once when that is what the client gave.
        names = dict.fromkeys(
            n for n in (uuid, gpu) if isinstance(n, str) and not _DIGITS.fullmatch(n)
        )
        return f"GPU {index} ({', '.join(names)})" if names else f"GPU {index}"

    def _apply(self, request: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        """Apply one request: its answer and what to log at INFO (None: nothing)."""
        op = _op(request)
        target = self._target
        if op == "list":
            return {"ok": True, "gpus": target.describe()}, None
        if op == "nvml-down":
            target.nvml_down()
            return {"ok": True}, "control: NVML is now down"
        if op == "nvml-up":
            target.nvml_up()
            return {"ok": True}, "control: NVML is up again"

        gpu = _gpu(request, op)
        try:
            index = target.gpu_index(gpu)
        except KeyError as exc:
            raise _unknown_gpu(exc) from None
        label = self._label(gpu, index)
        # In each branch every field is checked before the target is called, so a bad
        # request changes nothing.
        try:
            if op == "xid":
                xid = _natural(request, "xid")
                if xid is None:
                    raise _BadRequest('op "xid" needs "xid" (the XID error number)')
                gi = _natural(request, "gi")
                ci = _natural(request, "ci")
                where = "".join(f" {k} {v}" for k, v in (("gi", gi), ("ci", ci)) if v is not None)
                if "action" in request:
                    action = _action(request, "xid")
                    if action is None:
                        raise _BadRequest('"action" with op "xid" must be a recovery action, '
                                          'not null (use op "recovery-action" for that)')
                    target.xid(gpu, xid, gi=gi, ci=ci, recovery_action=action)
                    where += f", the driver asking for {_ACTION_NAMES.get(action, action)}"
                else:
                    target.xid(gpu, xid, gi=gi, ci=ci)
                done = f"injected XID {xid} on {label}{where}"
            elif op == "ecc-dbe":
                target.ecc_dbe(gpu)
                done = f"injected a double-bit ECC error on {label}"
            elif op == "lost":
                target.lose(gpu)
                done = f"{label} fell off the bus"
            elif op == "recover":
                target.recover(gpu)
                done = f"recovered {label}"
            elif op == "hang":
                target.hang(gpu)
                done = f"{label} hangs: NVML calls naming it block until unhang"
            elif op == "unhang":
                target.unhang(gpu)
                done = f"{label} answers NVML calls again"
            elif op == "recovery-action":
                action = _action(request)
                target.set_recovery_action(gpu, action)
                done = (f"{label}'s driver no longer reports recovery actions" if action is None
                        else f"{label}'s driver asks for {_ACTION_NAMES.get(action, action)}")
            elif op == "ecc-errors":
                count = _natural(request, "count")
                if count is None:
                    raise _BadRequest('op "ecc-errors" needs "count" (how many errors)')
                corrected = bool(_flag(request, "corrected"))
                target.add_ecc_errors(gpu, count, corrected=corrected)
                done = (f"added {count} {'corrected' if corrected else 'uncorrectable'} ECC "
                        f"error(s) on {label}")
            elif op == "fail":
                calls = _calls(request)
                code = _code(request)
                target.fail(gpu, calls, code)
                done = (f"{', '.join(calls)} now fail{'s' if len(calls) == 1 else ''} with "
                        f"NVML_ERROR_{_ERROR_NAMES.get(code, code)} on {label}")
            elif op == "unfail":
                target.unfail(gpu)
                done = f"every NVML call answers for {label} again"
            else:
                assert op == "pending", op
                retired_pages = _flag(request, "retired_pages")
                row_remap = _flag(request, "row_remap")
                row_remap_failed = _flag(request, "row_remap_failed")
                if retired_pages is None and row_remap is None and row_remap_failed is None:
                    raise _BadRequest('op "pending" needs "retired_pages", "row_remap" or '
                                      '"row_remap_failed"')
                target.set_pending(gpu, retired_pages=retired_pages, row_remap=row_remap,
                                   row_remap_failed=row_remap_failed)
                flags = ", ".join(
                    f"{name}={json.dumps(value)}"
                    for name, value in (("retired_pages", retired_pages), ("row_remap", row_remap),
                                        ("row_remap_failed", row_remap_failed))
                    if value is not None
                )
                done = f"set pending {flags} on {label}"
        except KeyError as exc:
            raise _unknown_gpu(exc) from None
        except ValueError as exc:
            # The target refusing an instance (gi/ci on a GPU without MIG, say) is the
            # client's mistake, not a server failure.
            raise _BadRequest(str(exc)) from None
        return {"ok": True}, f"control: {done}"

    def respond(self, line: bytes, peer: str) -> bytes:
        """The answer line to one request line; raises nothing but cancellation."""
        try:
            answer, done = self._apply(_decode_request(line))
            encoded = _answer_bytes(answer)
        except _BadRequest as exc:
            log.warning("control: bad request on %s: %s", peer, exc.message)
            return _answer_bytes({"ok": False, "error": exc.message})
        except Exception as exc:
            # A bug in the target or here fails this request only; the client gets its text.
            log.exception("control: request on %s failed", peer)
            return _answer_bytes(
                {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
            )
        if done is not None:
            log.info("%s", done)
        return encoded

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection until its client closes it (or sends a too-long line)."""
        peer = f"{self._path} connection {next(self._numbers)}"
        try:
            async with stream:
                await self._converse(stream, peer)
        except trio.BrokenResourceError as exc:
            # The client went away mid-conversation: its business, not an error of ours.
            log.debug("control: %s broke: %s", peer, exc.__cause__ or exc)
        except Exception:
            # A bug in one connection must not take the server down with it.
            log.exception("control: %s failed; closing it", peer)

    async def _converse(self, stream: trio.SocketStream, peer: str) -> None:
        buffer = bytearray()
        scanned = 0  # buffer[:scanned] holds no newline: a long line is scanned once
        while True:
            chunk = await stream.receive_some(_RECEIVE_SIZE)
            eof = not chunk
            buffer += chunk
            answers: list[bytes] = []
            # Lines are answered from an offset and the buffer trimmed once per chunk:
            # deleting each line from the front would copy the rest every time.
            start = 0
            while True:
                newline = buffer.find(b"\n", scanned)
                end = len(buffer) if newline < 0 else newline
                too_long = end - start > MAX_LINE
                if newline < 0 or too_long:
                    scanned = len(buffer)
                    break
                answers.append(self.respond(bytes(buffer[start:newline]), peer))
                start = scanned = newline + 1
            del buffer[:start]
            scanned -= start
            if eof and buffer and not too_long:
                answers.append(self.respond(bytes(buffer), peer))
            if too_long:
                error = f"request line longer than {MAX_LINE} bytes; closing the connection"
                log.warning("control: bad request on %s: %s", peer, error)
                answers.append(_answer_bytes({"ok": False, "error": error}))
            if answers:
                await stream.send_all(b"".join(answers))
            if too_long:
                await stream.send_eof()
                with trio.move_on_after(_CLOSE_GRACE):
                    while await stream.receive_some(_RECEIVE_SIZE):
                        pass
                return
            if eof:
                return


def _answer_bytes(answer: Mapping[str, Any]) -> bytes:
    return json.dumps(answer).encode() + b"\n"


def _bind(path: str) -> tuple[socket.socket, Identity]:
    """A listening Unix socket at ``path``, mode 0600, replacing a stale socket file; and
    the identity of its file, to remove it on exit only if it is still ours."""
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise OSError(
            errno.ENAMETOOLONG, f"Unix socket path is longer than {_MAX_UNIX_PATH} bytes: {path!r}"
        )
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(
                errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it"
            )
        if _listening(path):
            raise OSError(errno.EADDRINUSE, f"{path}: another process serves this socket")
        # Left by an earlier instance that did not clean up: nobody is served through it.
        os.unlink(path)
    # Bound with the stdlib socket, as in _transport: trio's bind() of a Unix path takes a
    # worker thread for what is a quick local operation.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Before listen(): until then a connect() is refused, so nobody gets in through
        # the umask's wider mode in between.
        os.chmod(path, 0o600)
        sock.listen(_LISTEN_BACKLOG)
        return sock, identity_of(path)
    except BaseException:
        sock.close()
        raise


def _listening(path: str) -> bool:
    """Whether a process accepts connections on the socket file at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # Non-blocking: a Unix connect either completes or fails at once, except when the
        # backlog is full (EAGAIN), which also means somebody listens.
        probe.setblocking(False)
        return probe.connect_ex(path) in (0, errno.EAGAIN, errno.EINPROGRESS)


async def serve_control(
    target: FaultTarget,
    path: str | os.PathLike[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the control socket at ``path``, applying requests to ``target``, until cancelled.

    Use it with ``await nursery.start(serve_control, target, path)``, which returns once
    the socket accepts connections.  A stale socket file at ``path`` is replaced; a socket
    another process listens on, or a file that is not a socket, is left alone and raises
    :class:`OSError` (:class:`FileExistsError` for the latter).  The socket is mode 0600.
    On exit the socket file is removed unless something else has been put there since.

    Each connection is served by its own task in this server's nursery; a failing or
    misbehaving connection is closed alone.  ``target``'s methods are called from the
    trio thread, one request at a time.
    """
    path = os.fspath(path)
    raw, identity = _bind(path)
    sock = trio.socket.from_stdlib_socket(raw)
    server = _Server(target, path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server.handle, [trio.SocketListener(sock)])
            log.info("control: accepting fault injection requests on %s", path)
            task_status.started()
    finally:
        # Removed before closing, so nobody connects to a socket about to stop listening.
        # By device, inode and change time: ext4 hands a successor's socket our freed
        # inode number at once (see _watch), so the inode alone could name its file.
        if identity is not None and identity_of(path) == identity:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        sock.close()
    raise AssertionError("trio.serve_listeners returned")  # pragma: no cover


# --- clients ---------------------------------------------------------------------------


def _encode_request(request: Mapping[str, Any]) -> bytes:
    # json.dumps escapes newlines inside strings, so the request stays one line.
    return json.dumps(dict(request), allow_nan=False).encode() + b"\n"


def _decode_answer(data: bytes, path: str) -> dict[str, Any]:
    try:
        answer = json.loads(data.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
        raise ValueError(f"{path}: the answer is not JSON ({exc}): {data[:200]!r}") from None
    if not isinstance(answer, dict):
        raise ValueError(f"{path}: the answer is not a JSON object: {data[:200]!r}")
    return answer


def _answer_line(buffer: bytearray, path: str) -> bytes | None:
    """The first line of ``buffer`` if complete; raises if the answer grows too large."""
    newline = buffer.find(b"\n")
    if newline >= 0:
        return bytes(buffer[:newline])
    if len(buffer) > _MAX_ANSWER:
        raise ValueError(f"{path}: the answer is longer than {_MAX_ANSWER} bytes")
    return None


def _no_answer(path: str) -> ConnectionError:
    return ConnectionError(f"{path}: the control socket closed the connection without answering")


async def send_control(path: str | os.PathLike[str], request: Mapping[str, Any]) -> dict[str, Any]:
    """Send one request to the control socket at ``path`` and return its answer.

    Raises :class:`OSError` if nobody listens there or the connection breaks, and
    :class:`ValueError` if the answer is not a JSON object.  An ``{"ok": false}`` answer
    is returned, not raised.  Bound it with a trio cancel scope.
    """
    path = os.fspath(path)
    line = _encode_request(request)
    stream = await trio.open_unix_socket(path)
    buffer = bytearray()
    async with stream:
        try:
            await stream.send_all(line)
            while (answer := _answer_line(buffer, path)) is None:
                chunk = await stream.receive_some(_RECEIVE_SIZE)
                if not chunk:
                    raise _no_answer(path)
                buffer += chunk
        except trio.BrokenResourceError as exc:
            # One error family for callers: every transport failure is an OSError.
            raise ConnectionError(f"{path}: connection broken: {exc.__cause__ or exc}") from exc
    return _decode_answer(answer, path)


def send_control_sync(
    path: str | os.PathLike[str], request: Mapping[str, Any], *, timeout: float = 5.0
) -> dict[str, Any]:
    """Blocking :func:`send_control`, for the command line; at most ``timeout`` seconds
    in all (:class:`TimeoutError`, an :class:`OSError`, when exceeded)."""
    path = os.fspath(path)
    line = _encode_request(request)
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        # Each blocking call gets what is left, so that timeout bounds the whole exchange.
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    buffer = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(remaining())
            sock.connect(path)
            sock.settimeout(remaining())
            sock.sendall(line)
            while (answer := _answer_line(buffer, path)) is None:
                sock.settimeout(remaining())
                chunk = sock.recv(_RECEIVE_SIZE)
                if not chunk:
                    raise _no_answer(path)
                buffer += chunk
    except TimeoutError:
        # The socket's own "timed out" names neither the socket nor the bound.
        raise TimeoutError(errno.ETIMEDOUT, f"{path}: no answer within {timeout} s") from None
    return _decode_answer(answer, path)


def request_from_args(
    op: str,
    gpu: str | None,
    xid: int | None,
    gi: int | None,
    ci: int | None,
    retired_pages: bool | None,
    row_remap: bool | None,
    *,
    row_remap_failed: bool | None = None,
    action: str | None = None,
    count: int | None = None,
    corrected: bool | None = None,
    calls: str | Iterable[str] | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The request ``trio-gpu-plugin inject`` sends for its arguments.

    Arguments left as None are left out; a ``gpu`` of ASCII digits becomes an index.
    ``calls`` (op ``fail``) is a list, or one string of comma-separated names; ``code``
    an ``NVML_ERROR_*`` name, or digits for its number.  Nothing is validated here: the
    server answers what is wrong, in one place.
    """
    request: dict[str, Any] = {"op": op}
    if gpu is not None:
        request["gpu"] = int(gpu) if _DIGITS.fullmatch(gpu) else gpu
    for key, value in (
        ("xid", xid),
        ("gi", gi),
        ("ci", ci),
        ("retired_pages", retired_pages),
        ("row_remap", row_remap),
        ("row_remap_failed", row_remap_failed),
        ("count", count),
        ("corrected", corrected),
    ):
        if value is not None:
            request[key] = value
    if action is not None:
        # "null" asks for a driver that reports no recovery actions; digits are a number.
        request["action"] = None if action == "null" else (
            int(action) if _DIGITS.fullmatch(action) else action)
    if calls is not None:
        names = calls.split(",") if isinstance(calls, str) else list(calls)
        request["calls"] = [n.strip() for n in names if n.strip()]
    if code is not None:
        request["code"] = int(code) if _DIGITS.fullmatch(code) else code
    return request
