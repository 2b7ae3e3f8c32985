"""The fault-injection control socket, over real Unix sockets against a recording fake.

The fake stands in for ``SimulatedNVML``: it records what the server applied and raises
``KeyError`` for unknown GPUs the way the simulator does, so these tests pin the protocol
(what is applied, what is answered, what closes a connection) and the socket's lifecycle.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import pytest
import trio

from trio_gpu_plugin._control import (
    CONTROL_OPS,
    MAX_LINE,
    FaultTarget,
    request_from_args,
    send_control,
    send_control_sync,
    serve_control,
)

HANG_GUARD = 5.0
GPUS: list[dict[str, Any]] = [
    {
        "index": 0,
        "uuid": "GPU-00000000-aaaa",
        "name": "NVIDIA A100-SXM4-80GB",
        "mig": ["MIG-00000000-a1", "MIG-00000000-a2"],
    },
    {"index": 1, "uuid": "GPU-11111111-bbbb", "name": "NVIDIA A100-SXM4-80GB", "mig": []},
]


class FakeTarget:
    """Records each fault as ``(method, args...)``; unknown GPUs raise KeyError."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_with: Exception | None = None

    def gpu_index(self, gpu: int | str) -> int:
        if isinstance(gpu, str) and gpu.isdigit():
            gpu = int(gpu)
        for d in GPUS:
            if gpu in (d["index"], d["uuid"], *d["mig"]):
                return int(d["index"])
        raise KeyError(
            f"unknown GPU {gpu!r}; valid GPUs: 0, 1, " + ", ".join(d["uuid"] for d in GPUS)
        )

    def _record(self, *call: Any) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append(call)

    def xid(
        self, gpu: int | str, xid: int, *, gi: int | None = None, ci: int | None = None,
        recovery_action: int | None = None,
    ) -> None:
        self.gpu_index(gpu)
        if recovery_action is None:
            self._record("xid", gpu, xid, gi, ci)
        else:
            self._record("xid", gpu, xid, gi, ci, recovery_action)

    def ecc_dbe(self, gpu: int | str) -> None:
        self.gpu_index(gpu)
        self._record("ecc_dbe", gpu)

    def lose(self, gpu: int | str) -> None:
        self.gpu_index(gpu)
        self._record("lose", gpu)

    def recover(self, gpu: int | str) -> None:
        self.gpu_index(gpu)
        self._record("recover", gpu)

    def hang(self, gpu: int | str | None = None) -> None:
        assert gpu is not None
        self.gpu_index(gpu)
        self._record("hang", gpu)

    def unhang(self, gpu: int | str | None = None) -> None:
        assert gpu is not None
        self.gpu_index(gpu)
        self._record("unhang", gpu)

    def set_pending(
        self, gpu: int | str, *, retired_pages: bool | None = None, row_remap: bool | None = None,
        row_remap_failed: bool | None = None,
    ) -> None:
        self.gpu_index(gpu)
        if row_remap_failed is None:
            self._record("set_pending", gpu, retired_pages, row_remap)
        else:
            self._record("set_pending", gpu, retired_pages, row_remap, row_remap_failed)

    def set_recovery_action(self, gpu: int | str, action: int | None) -> None:
        self.gpu_index(gpu)
        self._record("set_recovery_action", gpu, action)

    def add_ecc_errors(self, gpu: int | str, count: int, *, corrected: bool = False) -> None:
        self.gpu_index(gpu)
        self._record("add_ecc_errors", gpu, count, corrected)

    def fail(self, gpu: int | str, calls: Iterable[str] | str, code: int) -> None:
        self.gpu_index(gpu)
        names = [calls] if isinstance(calls, str) else list(calls)
        if "nvmlNoSuchCall" in names:
            raise ValueError("not NVML calls that name a GPU in the simulator: "
                             "['nvmlNoSuchCall']; valid: nvmlDeviceGetMinorNumber, ...")
        self._record("fail", gpu, tuple(names), code)

    def unfail(self, gpu: int | str) -> None:
        self.gpu_index(gpu)
        self._record("unfail", gpu)

    def nvml_down(self) -> None:
        self._record("nvml_down")

    def nvml_up(self) -> None:
        self._record("nvml_up")

    def describe(self) -> list[dict[str, Any]]:
        return [dict(d) for d in GPUS]


class Client:
    """One connection to the control socket, speaking raw lines."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self) -> dict[str, Any] | None:
        """The next answer line, decoded; None at EOF."""
        with trio.fail_after(HANG_GUARD):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    assert not self.buffer, f"partial answer before EOF: {bytes(self.buffer)!r}"
                    return None
                self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        answer = json.loads(line)
        assert isinstance(answer, dict)
        return answer

    async def ask(self, request: dict[str, Any] | bytes) -> dict[str, Any]:
        data = request if isinstance(request, bytes) else json.dumps(request).encode()
        await self.send(data + b"\n")
        answer = await self.line()
        assert answer is not None, "connection closed without an answer"
        return answer


@pytest.fixture
def target() -> FakeTarget:
    return FakeTarget()


@pytest.fixture
async def control(
    nursery: trio.Nursery, socket_dir: pathlib.Path, target: FakeTarget
) -> pathlib.Path:
    path = socket_dir / "control.sock"
    await nursery.start(serve_control, target, path)
    return path


Connect = Callable[[pathlib.Path], Awaitable[Client]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Opens client connections, closed when the test ends."""
    clients: list[Client] = []

    async def open_client(path: pathlib.Path) -> Client:
        clients.append(Client(await trio.open_unix_socket(str(path))))
        return clients[-1]

    yield open_client
    for client in clients:
        await client.stream.aclose()


def test_fake_is_a_fault_target() -> None:
    # Checked by mypy where it matters; here, that the fake has the Protocol's methods.
    target: FaultTarget = FakeTarget()
    assert target.gpu_index("MIG-00000000-a2") == 0


# --- ops -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "call"),
    [
        ({"op": "xid", "gpu": 1, "xid": 79}, ("xid", 1, 79, None, None)),
        (
            {"op": "xid", "gpu": "GPU-11111111-bbbb", "xid": 0},
            ("xid", "GPU-11111111-bbbb", 0, None, None),
        ),
        (
            {"op": "xid", "gpu": "MIG-00000000-a2", "xid": 43, "gi": 2, "ci": 0},
            ("xid", "MIG-00000000-a2", 43, 2, 0),
        ),
        ({"op": "xid", "gpu": "0", "xid": 48, "ci": 1}, ("xid", "0", 48, None, 1)),
        ({"op": "ecc-dbe", "gpu": 0}, ("ecc_dbe", 0)),
        ({"op": "lost", "gpu": "GPU-00000000-aaaa"}, ("lose", "GPU-00000000-aaaa")),
        ({"op": "recover", "gpu": 1}, ("recover", 1)),
        ({"op": "hang", "gpu": 1}, ("hang", 1)),
        ({"op": "unhang", "gpu": "GPU-00000000-aaaa"}, ("unhang", "GPU-00000000-aaaa")),
        ({"op": "pending", "gpu": 0, "retired_pages": True}, ("set_pending", 0, True, None)),
        ({"op": "pending", "gpu": 0, "row_remap": False}, ("set_pending", 0, None, False)),
        (
            {"op": "pending", "gpu": 1, "retired_pages": False, "row_remap": True},
            ("set_pending", 1, False, True),
        ),
        (
            {"op": "pending", "gpu": 1, "row_remap_failed": True},
            ("set_pending", 1, None, None, True),
        ),
        ({"op": "recovery-action", "gpu": 0, "action": "gpu_reset"},
         ("set_recovery_action", 0, 1)),
        ({"op": "recovery-action", "gpu": 0, "action": "NONE"}, ("set_recovery_action", 0, 0)),
        ({"op": "recovery-action", "gpu": 1, "action": 7}, ("set_recovery_action", 1, 7)),
        ({"op": "recovery-action", "gpu": 1, "action": None}, ("set_recovery_action", 1, None)),
        ({"op": "ecc-errors", "gpu": 0, "count": 3}, ("add_ecc_errors", 0, 3, False)),
        ({"op": "ecc-errors", "gpu": 0, "count": 1, "corrected": True},
         ("add_ecc_errors", 0, 1, True)),
        ({"op": "xid", "gpu": 1, "xid": 79, "action": "drain_and_reset"},
         ("xid", 1, 79, None, None, 4)),
        ({"op": "fail", "gpu": 1, "calls": ["nvmlDeviceGetMinorNumber"], "code": "gpu_is_lost"},
         ("fail", 1, ("nvmlDeviceGetMinorNumber",), 15)),
        ({"op": "fail", "gpu": 0, "calls": "nvmlDeviceGetUUID", "code": "NVML_ERROR_UNKNOWN"},
         ("fail", 0, ("nvmlDeviceGetUUID",), 999)),
        ({"op": "fail", "gpu": 0, "calls": ["nvmlDeviceGetName", "nvmlDeviceGetUUID"], "code": 4},
         ("fail", 0, ("nvmlDeviceGetName", "nvmlDeviceGetUUID"), 4)),
        ({"op": "unfail", "gpu": "GPU-11111111-bbbb"}, ("unfail", "GPU-11111111-bbbb")),
        ({"op": "nvml-down"}, ("nvml_down",)),
        ({"op": "nvml-up"}, ("nvml_up",)),
    ],
)
async def test_op_is_applied(
    connect: Connect,
    control: pathlib.Path,
    target: FakeTarget,
    request_: dict[str, Any],
    call: tuple[Any, ...],
) -> None:
    client = await connect(control)
    assert await client.ask(request_) == {"ok": True}
    assert target.calls == [call]


async def test_list_describes_the_gpus(
    connect: Connect, control: pathlib.Path, target: FakeTarget
) -> None:
    client = await connect(control)
    assert await client.ask({"op": "list"}) == {"ok": True, "gpus": GPUS}
    assert target.calls == []


async def test_many_requests_on_one_connection_answered_in_order(
    connect: Connect, control: pathlib.Path, target: FakeTarget
) -> None:
    client = await connect(control)
    # In one write, so the server finds several lines in one receive.
    await client.send(b'{"op": "lost", "gpu": 0}\n{"op": "nope"}\r\n{"op": "recover", "gpu": 0}\n')
    assert await client.line() == {"ok": True}
    bad = await client.line()
    assert bad is not None and bad["ok"] is False
    assert await client.line() == {"ok": True}
    # And then one at a time, on the same connection.
    assert await client.ask({"op": "xid", "gpu": 1, "xid": 13}) == {"ok": True}
    assert target.calls == [("lose", 0), ("recover", 0), ("xid", 1, 13, None, None)]


async def test_a_line_split_across_writes_is_one_request(
    connect: Connect, control: pathlib.Path, target: FakeTarget
) -> None:
    client = await connect(control)
    await client.send(b'{"op": "ecc-')
    await trio.sleep(0.01)
    await client.send(b'dbe", "gpu": 1}\n')
    assert await client.line() == {"ok": True}
    assert target.calls == [("ecc_dbe", 1)]


async def test_last_line_without_newline_is_answered_at_eof(
    connect: Connect, control: pathlib.Path, target: FakeTarget
) -> None:
    client = await connect(control)
    await client.send(b'{"op": "nvml-down"}')
    await client.stream.send_eof()
    assert await client.line() == {"ok": True}
    assert await client.line() is None
    assert target.calls == [("nvml_down",)]


# --- errors ----------------------------------------------------------------------------

VALID_OPS = ["xid", "ecc-dbe", "lost", "recover", "hang", "unhang", "pending", "recovery-action",
             "ecc-errors", "fail", "unfail", "nvml-down", "nvml-up", "list"]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"xid 79 on 3", ["not JSON", "Expecting value: line 1 column 1 (char 0)"]),
        (b'{"op": "lost", "gpu": 1', ["not JSON", "Expecting ',' delimiter"]),
        (b"", ["not JSON", "Expecting value"]),
        (b"[" * 5000, ["not JSON", "nested too deeply"]),
        (b'{"op": "xid", "gpu": 1, "xid": ' + b"7" * 5000 + b"}", ["not JSON", "digits"]),
        (b'\xff{"op": "list"}', ["not valid UTF-8", "0xff", "offset 0"]),
        (b'{"op": "lost", "gpu": "GPU-\xc3"}', ["not valid UTF-8", "0xc3", "offset 27"]),
        (b'["op", "list"]', ["must be a JSON object", "an array"]),
        (b'"list"', ["must be a JSON object", "a string"]),
        (b"null", ["must be a JSON object", "null"]),
        (b'{"gpu": 1}', ['no "op"', *VALID_OPS]),
        (b'{"op": "explode", "gpu": 1}', ['unknown op "explode"', *VALID_OPS]),
        (b'{"op": 7}', ["unknown op 7", *VALID_OPS]),
        (b'{"op": "XID", "gpu": 1, "xid": 79}', ['unknown op "XID"', "valid ops: xid"]),
        (b'{"op": "list", "gpu": 1}', ['for op "list": "gpu"', "it takes nothing else"]),
        (
            b'{"op": "lost", "gpu": 1, "xid": 79, "force": true}',
            ['unexpected keys for op "lost": "force", "xid"', 'it takes "gpu"'],
        ),
        (
            b'{"op": "pending", "gpu": 1, "row_remapped": true}',
            ['"row_remapped"', '"retired_pages", "row_remap"'],
        ),
        (b'{"op": "xid", "xid": 79}', ['op "xid" needs "gpu"']),
        (b'{"op": "recover"}', ['op "recover" needs "gpu"']),
        (b'{"op": "lost", "gpu": true}', ['"gpu" must be a GPU index or UUID, got true']),
        (b'{"op": "lost", "gpu": 1.0}', ['"gpu" must be a GPU index or UUID, got 1.0']),
        (b'{"op": "lost", "gpu": null}', ['"gpu" must be a GPU index or UUID, got null']),
        (b'{"op": "lost", "gpu": 7}', ["unknown GPU 7", "valid GPUs", "GPU-00000000-aaaa"]),
        (b'{"op": "xid", "gpu": "MIG-nope", "xid": 79}', ["unknown GPU 'MIG-nope'", "valid GPUs"]),
        (b'{"op": "pending", "gpu": "GPU-nope", "row_remap": true}', ["unknown GPU 'GPU-nope'"]),
        (b'{"op": "xid", "gpu": 1}', ['op "xid" needs "xid"']),
        (b'{"op": "xid", "gpu": 1, "xid": -1}', ['"xid" must be a non-negative integer, got -1']),
        (
            b'{"op": "xid", "gpu": 1, "xid": true}',
            ['"xid" must be a non-negative integer, got true'],
        ),
        (
            b'{"op": "xid", "gpu": 1, "xid": "79"}',
            ['"xid" must be a non-negative integer, got "79"'],
        ),
        (
            b'{"op": "xid", "gpu": 1, "xid": 79.0}',
            ['"xid" must be a non-negative integer, got 79.0'],
        ),
        (
            b'{"op": "xid", "gpu": 1, "xid": null}',
            ['"xid" must be a non-negative integer, got null'],
        ),
        (
            b'{"op": "xid", "gpu": 1, "xid": 79, "gi": "1"}',
            ['"gi" must be a non-negative integer, got "1"'],
        ),
        (
            b'{"op": "xid", "gpu": 1, "xid": 79, "ci": false}',
            ['"ci" must be a non-negative integer, got false'],
        ),
        (
            b'{"op": "xid", "gpu": 1, "xid": 79, "gi": 1.5}',
            ['"gi" must be a non-negative integer, got 1.5'],
        ),
        (b'{"op": "pending", "gpu": 1}', ['op "pending" needs "retired_pages", "row_remap" or "row_remap_failed"']),
        (
            b'{"op": "pending", "gpu": 1, "retired_pages": 1}',
            ['"retired_pages" must be true or false, got 1'],
        ),
        (
            b'{"op": "pending", "gpu": 1, "row_remap": "yes", "retired_pages": true}',
            ['"row_remap" must be true or false, got "yes"'],
        ),
        (b'{"op": "lost", "gpu": "' + b"x" * 1000 + b'"}', ["unknown GPU"]),
    ],
)
async def test_bad_request_is_answered_with_what_is_wrong(
    connect: Connect,
    control: pathlib.Path,
    target: FakeTarget,
    caplog: pytest.LogCaptureFixture,
    line: bytes,
    expected: list[str],
) -> None:
    client = await connect(control)
    with caplog.at_level(logging.DEBUG, "trio_gpu_plugin.control"):
        answer = await client.ask(line)
    assert answer["ok"] is False and set(answer) == {"ok", "error"}
    for text in expected:
        assert text in answer["error"]
    assert target.calls == [], "a bad request must change nothing"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and answer["error"] in warnings[0].getMessage()
    # The connection is still good for the next request.
    assert await client.ask({"op": "lost", "gpu": 1}) == {"ok": True}
    assert target.calls == [("lose", 1)]


async def test_error_quotes_a_huge_value_shortened(connect: Connect, control: pathlib.Path) -> None:
    client = await connect(control)
    answer = await client.ask({"op": "x" * 10000})
    # The value is quoted shortened (60 characters); the list of valid ops follows it.
    quoted = answer["error"].removesuffix("; valid ops: " + ", ".join(CONTROL_OPS))
    assert len(quoted) < 80 and quoted.startswith('unknown op "xxx')


async def test_target_refusal_is_a_bad_request(
    connect: Connect, control: pathlib.Path, target: FakeTarget
) -> None:
    target.fail_with = ValueError("GPU 1 has no MIG instance gi 3")
    client = await connect(control)
    answer = await client.ask({"op": "xid", "gpu": 1, "xid": 79, "gi": 3})
    assert answer == {"ok": False, "error": "GPU 1 has no MIG instance gi 3"}


async def test_target_failure_is_an_internal_error_of_that_request_only(
    connect: Connect, control: pathlib.Path, target: FakeTarget, caplog: pytest.LogCaptureFixture
) -> None:
    target.fail_with = RuntimeError("simulator bug")
    client = await connect(control)
    with caplog.at_level(logging.ERROR, "trio_gpu_plugin.control"):
        answer = await client.ask({"op": "nvml-down"})
    assert answer == {"ok": False, "error": "internal error: RuntimeError: simulator bug"}
    assert any(r.exc_info for r in caplog.records)
    target.fail_with = None
    assert await client.ask({"op": "nvml-down"}) == {"ok": True}


async def test_errors_leave_other_connections_and_the_server_alone(
    connect: Connect, control: pathlib.Path, target: FakeTarget
) -> None:
    good, bad = await connect(control), await connect(control)
    for line in (b"{", b"[]", b'{"op": "boom"}', b"\xfe"):
        assert (await bad.ask(line))["ok"] is False
    assert await good.ask({"op": "lost", "gpu": 0}) == {"ok": True}
    assert await bad.ask({"op": "recover", "gpu": 0}) == {"ok": True}
    await bad.stream.aclose()
    late = await connect(control)
    assert await late.ask({"op": "list"}) == {"ok": True, "gpus": GPUS}
    assert await good.ask({"op": "recover", "gpu": 1}) == {"ok": True}


@pytest.mark.parametrize("newline", [True, False], ids=["terminated", "unterminated"])
async def test_too_long_line_closes_only_that_connection(
    connect: Connect,
    control: pathlib.Path,
    target: FakeTarget,
    caplog: pytest.LogCaptureFixture,
    newline: bool,
) -> None:
    other = await connect(control)
    client = await connect(control)
    # A valid request first, in the same write: it is still answered.
    payload = b'{"op": "lost", "gpu": 0}\n{"op": "list", "pad": "' + b"x" * MAX_LINE + b'"}'
    with caplog.at_level(logging.WARNING, "trio_gpu_plugin.control"):
        await client.send(payload + (b"\n" if newline else b""))
        assert await client.line() == {"ok": True}
        answer = await client.line()
        assert answer is not None and answer["ok"] is False
        assert f"longer than {MAX_LINE} bytes" in answer["error"]
        assert await client.line() is None, "the connection must be closed (a clean EOF)"
    assert len(caplog.records) == 1
    assert target.calls == [("lose", 0)]
    assert await other.ask({"op": "recover", "gpu": 0}) == {"ok": True}
    assert await (await connect(control)).ask({"op": "nvml-up"}) == {"ok": True}


async def test_line_of_exactly_max_line_bytes_is_read(
    connect: Connect, control: pathlib.Path
) -> None:
    client = await connect(control)
    head = b'{"op": "list", "pad": "'
    line = head + b"x" * (MAX_LINE - len(head) - 2) + b'"}'
    assert len(line) == MAX_LINE
    answer = await client.ask(line)
    assert answer == {
        "ok": False,
        "error": 'unexpected key for op "list": "pad" (it takes nothing else)',
    }


# --- logging ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            {"op": "xid", "gpu": 1, "xid": 79},
            "control: injected XID 79 on GPU 1 (GPU-11111111-bbbb)",
        ),
        (
            {"op": "xid", "gpu": "GPU-11111111-bbbb", "xid": 79},
            "control: injected XID 79 on GPU 1 (GPU-11111111-bbbb)",
        ),
        (
            {"op": "xid", "gpu": "MIG-00000000-a1", "xid": 43, "gi": 1, "ci": 0},
            "control: injected XID 43 on GPU 0 (GPU-00000000-aaaa, MIG-00000000-a1) gi 1 ci 0",
        ),
        (
            {"op": "ecc-dbe", "gpu": "1"},
            "control: injected a double-bit ECC error on GPU 1 (GPU-11111111-bbbb)",
        ),
        ({"op": "lost", "gpu": 0}, "control: GPU 0 (GPU-00000000-aaaa) fell off the bus"),
        ({"op": "recover", "gpu": 0}, "control: recovered GPU 0 (GPU-00000000-aaaa)"),
        (
            {"op": "pending", "gpu": 0, "row_remap": True},
            "control: set pending row_remap=true on GPU 0 (GPU-00000000-aaaa)",
        ),
        ({"op": "nvml-down"}, "control: NVML is now down"),
    ],
)
async def test_applied_fault_is_logged_at_info(
    connect: Connect,
    control: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    request_: dict[str, Any],
    message: str,
) -> None:
    client = await connect(control)
    with caplog.at_level(logging.INFO, "trio_gpu_plugin.control"):
        assert await client.ask(request_) == {"ok": True}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, message)]


# --- the socket ------------------------------------------------------------------------


async def test_socket_is_private(control: pathlib.Path) -> None:
    mode = os.lstat(control).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


async def test_stale_socket_is_replaced(socket_dir: pathlib.Path, target: FakeTarget) -> None:
    path = socket_dir / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # closed without unlinking, as by a killed process
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, target, path)
        assert await send_control(path, {"op": "nvml-up"}) == {"ok": True}
        nursery.cancel_scope.cancel()


async def test_live_socket_is_not_taken_over(socket_dir: pathlib.Path, target: FakeTarget) -> None:
    path = socket_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, target, path)
        with pytest.raises(OSError, match="another process serves this socket") as raised:
            await serve_control(FakeTarget(), path)
        assert str(path) in str(raised.value)
        # The first server still owns the path.
        assert await send_control(path, {"op": "nvml-down"}) == {"ok": True}
        nursery.cancel_scope.cancel()
    assert target.calls == [("nvml_down",)]


async def test_non_socket_file_is_refused_and_kept(
    socket_dir: pathlib.Path, target: FakeTarget
) -> None:
    path = socket_dir / "control.sock"
    path.write_text("my notes\n")
    with pytest.raises(FileExistsError) as raised:
        await serve_control(target, path)
    assert isinstance(raised.value, OSError)
    assert str(path) in str(raised.value) and "not a socket" in str(raised.value)
    assert path.read_text() == "my notes\n"


async def test_too_long_path_is_an_os_error(socket_dir: pathlib.Path, target: FakeTarget) -> None:
    path = socket_dir / ("x" * 120)
    with pytest.raises(OSError, match="longer than 107 bytes"):
        await serve_control(target, path)


async def test_socket_is_removed_on_cancel(
    connect: Connect, socket_dir: pathlib.Path, target: FakeTarget
) -> None:
    path = socket_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, target, path)
        # An open connection does not hold up the shutdown.
        client = await connect(path)
        assert await client.ask({"op": "list"}) != {}
        assert path.exists()
        nursery.cancel_scope.cancel()
    assert not path.exists()
    assert await client.line() is None
    await client.stream.aclose()


async def test_someone_elses_file_is_not_removed_on_cancel(
    socket_dir: pathlib.Path, target: FakeTarget
) -> None:
    path = socket_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, target, path)
        path.unlink()
        path.write_text("replaced\n")
        nursery.cancel_scope.cancel()
    assert path.read_text() == "replaced\n"


# --- clients ---------------------------------------------------------------------------


async def test_send_control(control: pathlib.Path, target: FakeTarget) -> None:
    assert await send_control(control, {"op": "xid", "gpu": 0, "xid": 79}) == {"ok": True}
    answer = await send_control(str(control), {"op": "xid", "gpu": 0})
    assert answer == {"ok": False, "error": 'op "xid" needs "xid" (the XID error number)'}
    assert await send_control(control, {"op": "list"}) == {"ok": True, "gpus": GPUS}
    assert target.calls == [("xid", 0, 79, None, None)]


async def test_send_control_sync(control: pathlib.Path, target: FakeTarget) -> None:
    def inject() -> list[dict[str, Any]]:
        return [
            send_control_sync(control, {"op": "pending", "gpu": "1", "retired_pages": True}),
            send_control_sync(str(control), {"op": "lost", "gpu": 9}, timeout=2.0),
            send_control_sync(control, {"op": "list"}),
        ]

    ok, unknown, listed = await trio.to_thread.run_sync(inject)
    assert ok == {"ok": True}
    assert unknown["ok"] is False and "unknown GPU 9" in unknown["error"]
    assert listed == {"ok": True, "gpus": GPUS}
    assert target.calls == [("set_pending", "1", True, None)]


async def test_clients_raise_os_error_when_nobody_listens(socket_dir: pathlib.Path) -> None:
    missing = socket_dir / "missing.sock"
    with pytest.raises(FileNotFoundError):
        await send_control(missing, {"op": "list"})
    stale = socket_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))
    with pytest.raises(ConnectionRefusedError):
        await send_control(stale, {"op": "list"})
    with pytest.raises(OSError):
        await trio.to_thread.run_sync(lambda: send_control_sync(stale, {"op": "list"}))


async def fake_server(nursery: trio.Nursery, path: pathlib.Path, answer: bytes) -> None:
    """A server that reads one line and answers ``answer`` (then closes)."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)

    async def serve() -> None:
        with listener:
            conn, _ = await listener.accept()
            with conn:
                while b"\n" not in await conn.recv(65536):
                    pass
                await conn.send(answer)

    nursery.start_soon(serve)


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (b"[1, 2]\n", ValueError, "not a JSON object"),
        (b"ok\n", ValueError, "not JSON"),
        (b'{"ok": tr', ConnectionError, "without answering"),
        (b"", ConnectionError, "without answering"),
    ],
)
async def test_send_control_rejects_a_bad_answer(
    nursery: trio.Nursery,
    socket_dir: pathlib.Path,
    answer: bytes,
    error: type[Exception],
    match: str,
) -> None:
    path = socket_dir / "odd.sock"
    await fake_server(nursery, path, answer)
    with pytest.raises(error, match=match):
        await send_control(path, {"op": "list"})


async def test_send_control_sync_times_out(socket_dir: pathlib.Path) -> None:
    path = socket_dir / "silent.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)  # accepts into the backlog, never answers
    with listener, pytest.raises(TimeoutError, match="silent.sock: no answer within 0.1 s"):
        await trio.to_thread.run_sync(lambda: send_control_sync(path, {"op": "list"}, timeout=0.1))


@pytest.mark.parametrize(
    ("args", "request_"),
    [
        (("xid", "3", 79, None, None, None, None), {"op": "xid", "gpu": 3, "xid": 79}),
        (
            ("xid", "MIG-abc", 43, 1, 0, None, None),
            {"op": "xid", "gpu": "MIG-abc", "xid": 43, "gi": 1, "ci": 0},
        ),
        (("lost", "GPU-0a1b", None, None, None, None, None), {"op": "lost", "gpu": "GPU-0a1b"}),
        (
            ("pending", "0", None, None, None, True, False),
            {"op": "pending", "gpu": 0, "retired_pages": True, "row_remap": False},
        ),
        (("nvml-down", None, None, None, None, None, None), {"op": "nvml-down"}),
        # Only ASCII digits make an index: "³".isdigit() is true, int("³") fails.
        (("recover", "³", None, None, None, None, None), {"op": "recover", "gpu": "³"}),
        (("recover", "-1", None, None, None, None, None), {"op": "recover", "gpu": "-1"}),
    ],
)
def test_request_from_args(args: tuple[Any, ...], request_: dict[str, Any]) -> None:
    assert request_from_args(*args) == request_


def test_control_ops() -> None:
    assert list(CONTROL_OPS) == VALID_OPS


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"op": "recovery-action", "gpu": 0}, 'needs "action"'),
        ({"op": "recovery-action", "gpu": 0, "action": "reboot"}, "must be one of bus_reset"),
        ({"op": "recovery-action", "gpu": 0, "action": 99}, "must be one of"),
        ({"op": "ecc-errors", "gpu": 0}, 'needs "count"'),
        ({"op": "ecc-errors", "gpu": 0, "count": -1}, "non-negative integer"),
        ({"op": "xid", "gpu": 0, "xid": 79, "action": None}, 'not null (use op "recovery-action"'),
        ({"op": "xid", "gpu": 0, "xid": 79, "action": "reboot"}, "must be one of bus_reset"),
        ({"op": "fail", "gpu": 0, "code": "unknown"}, 'needs "calls"'),
        ({"op": "fail", "gpu": 0, "calls": ["nvmlDeviceGetUUID"]}, 'needs "code"'),
        ({"op": "fail", "gpu": 0, "calls": [], "code": 1}, "non-empty list of NVML method names"),
        ({"op": "fail", "gpu": 0, "calls": [7], "code": 1}, "non-empty list of NVML method names"),
        ({"op": "fail", "gpu": 0, "calls": ["nvmlDeviceGetUUID"], "code": "lost"},
         "must be an NVML error: one of "),
        ({"op": "fail", "gpu": 0, "calls": ["nvmlDeviceGetUUID"], "code": 0}, "gpu_is_lost"),
        ({"op": "fail", "gpu": 0, "calls": ["nvmlNoSuchCall"], "code": 1},
         "valid: nvmlDeviceGetMinorNumber"),
        ({"op": "fail", "gpu": 9, "calls": ["nvmlDeviceGetUUID"], "code": 1}, "unknown GPU 9"),
    ],
)
async def test_new_fault_ops_say_what_is_wrong(
    connect: Connect, control: pathlib.Path, target: FakeTarget, request_: dict[str, Any],
    error: str,
) -> None:
    client = await connect(control)
    answer = await client.ask(request_)
    assert answer["ok"] is False and error in answer["error"]
    assert target.calls == []


async def test_a_successors_socket_with_our_inode_number_is_left_on_cancel(
    socket_dir: pathlib.Path, target: FakeTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ext4 gives a socket bound after ours was removed our inode number at once; only the
    # change time tells the successor's apart.  Pretend the successor got ours.
    import os

    path = socket_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, target, path)
        ours = os.lstat(path)
        path.unlink()
        successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        successor.bind(str(path))
        real_lstat = os.lstat

        def lstat(p: Any, *args: Any, **kwargs: Any) -> Any:
            st = real_lstat(p, *args, **kwargs)
            if os.fspath(p) == str(path):
                fields = list(st)
                fields[1], fields[2] = ours.st_ino, ours.st_dev  # st_ino, st_dev
                return os.stat_result(fields, {"st_ctime_ns": st.st_ctime_ns})
            return st

        monkeypatch.setattr(os, "lstat", lstat)
        nursery.cancel_scope.cancel()
    monkeypatch.undo()
    assert path.exists()
    successor.close()


def test_request_from_args_for_the_lasting_damage_and_recovery_action_ops() -> None:
    none = (None,) * 5
    assert request_from_args("recovery-action", "3", *none, action="gpu_reset") == {
        "op": "recovery-action", "gpu": 3, "action": "gpu_reset"}
    assert request_from_args("recovery-action", "3", *none, action="null")["action"] is None
    assert request_from_args("recovery-action", "3", *none, action="2")["action"] == 2
    assert request_from_args("ecc-errors", "1", *none, count=4, corrected=True) == {
        "op": "ecc-errors", "gpu": 1, "count": 4, "corrected": True}
    assert request_from_args("pending", "1", *none, row_remap_failed=True) == {
        "op": "pending", "gpu": 1, "row_remap_failed": True}


def test_request_from_args_for_the_fail_ops() -> None:
    none = (None,) * 5
    assert request_from_args("fail", "2", *none, calls="nvmlDeviceGetMinorNumber, nvmlDeviceGetName",
                             code="gpu_is_lost") == {
        "op": "fail", "gpu": 2, "calls": ["nvmlDeviceGetMinorNumber", "nvmlDeviceGetName"],
        "code": "gpu_is_lost"}
    assert request_from_args("fail", "2", *none, calls=["nvmlDeviceGetUUID"], code="15") == {
        "op": "fail", "gpu": 2, "calls": ["nvmlDeviceGetUUID"], "code": 15}
    assert request_from_args("unfail", "2", *none) == {"op": "unfail", "gpu": 2}
    assert request_from_args("xid", "1", 79, None, None, None, None, action="gpu_reset") == {
        "op": "xid", "gpu": 1, "xid": 79, "action": "gpu_reset"}


async def test_the_new_ops_reach_a_real_simulator(socket_dir: pathlib.Path) -> None:
    # The fake pins the protocol; this, that SimulatedNVML takes what the server passes.
    import pynvml

    from trio_gpu_plugin._nvml_sim import SimGpuSpec, SimNodeSpec, SimulatedNVML

    sim = SimulatedNVML(SimNodeSpec("ctl", (SimGpuSpec(recovery_action=0), SimGpuSpec())))
    sim.nvmlInit()
    path = socket_dir / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, sim, path)
        ask = send_control
        assert await ask(path, {"op": "fail", "gpu": 1, "calls": ["nvmlDeviceGetMinorNumber"],
                                "code": "gpu_is_lost"}) == {"ok": True}
        gpu = sim.nvmlDeviceGetHandleByIndex(1)
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            sim.nvmlDeviceGetMinorNumber(gpu)
        refused = await ask(path, {"op": "fail", "gpu": 1, "calls": ["nvmlDeviceGetMinor"],
                                   "code": 1})
        assert refused["ok"] is False and "nvmlDeviceGetMinorNumber" in refused["error"]
        assert await ask(path, {"op": "unfail", "gpu": 1}) == {"ok": True}
        assert sim.nvmlDeviceGetMinorNumber(gpu) == 1
        assert await ask(path, {"op": "xid", "gpu": 0, "xid": 48, "action": "gpu_reset"}) == {
            "ok": True}
        [value] = sim.nvmlDeviceGetFieldValues(sim.nvmlDeviceGetHandleByIndex(0),
                                               [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])
        assert value.value.uiVal == pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET
        assert await ask(path, {"op": "ecc-errors", "gpu": 0, "count": 2}) == {"ok": True}
        assert await ask(path, {"op": "pending", "gpu": 0, "row_remap_failed": True}) == {
            "ok": True}
        assert sim.nvmlDeviceGetRemappedRows(sim.nvmlDeviceGetHandleByIndex(0))[3] == 1
        nursery.cancel_scope.cancel()
    sim.nvmlShutdown()
