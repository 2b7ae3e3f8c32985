"""Hostile input over the wire: random and mutated gRPC frames, protobuf payloads, headers
and raw garbage sent to a real plugin's socket by a raw HTTP/2 client.

What is run: one :class:`~trio_gpu_plugin.DevicePlugin` serving the simulated
``dgx-a100`` node, registered with the test kit's :class:`FakeKubelet`, all in this
process.  ``WORKERS`` raw clients (``trio.open_unix_socket`` + ``h2``), each on its own
connection, send seeded random cases one stream at a time, reusing a connection until the
server closes it:

* ``valid``: a well-formed request for one of the five methods (must end with status 0);
* ``random``: random payload bytes in a well-formed gRPC frame;
* ``mutated``: a valid AllocateRequest with bit flips, truncation, extension, splices;
* ``framing``: length-prefix lies (declared longer/shorter than sent, > 4 MiB), the
  compressed flag set, no message, several messages, a frame cut across DATA frames;
* ``headers``: missing/odd content-type, bad paths, unknown methods, bad grpc-timeout,
  odd grpc-encoding, random extra headers (sent unvalidated);
* ``garbage``: a fresh connection with raw bytes instead of, or after, the preface.

Every case is classified from what the server sends back: ``status-<CODE>`` (grpc-status
with ``:status`` 200), ``http-<N>/status-<CODE>`` (grpc-status with another ``:status``),
``streamed`` (a ListAndWatch that sent a list), ``rst-<ERROR>`` (RST_STREAM before any
status), ``closed`` (GOAWAY / connection close).  Each case also says which outcomes
it may get, as the gRPC and HTTP/2 specs (and grpc-go, where they leave room) answer it:

* a malformed header block (RFC 9113 §8.2-8.3: a missing, repeated or misplaced
  pseudo-header, an uppercase or connection-specific header, ``te`` other than
  ``trailers``, a value padded with whitespace or holding CR, LF or NUL, a
  ``content-length`` the body does not have) resets only its stream:
  ``rst-PROTOCOL_ERROR``, and the connection serves the worker's next case;
* a content-type other than ``application/grpc[+codec][;params]``: ``http-415/status-INTERNAL``;
  a method other than POST: ``http-405/status-INTERNAL``;
* a grpc-timeout that is not 1-8 ASCII digits and a unit: ``http-400/status-INTERNAL``;
  one already expired (``0S``, ``1n``): ``status-DEADLINE_EXCEEDED``;
* a request message cut short by the end of the stream (a length prefix promising more
  than was sent, part of a prefix): ``status-INTERNAL`` saying "truncated";
* garbage: ``closed``; any other request: some answer on its own stream, never a closed
  connection or a reset.

Failures: a case that gets no outcome within ``CASE_TIMEOUT`` (a hang), a response that
ends without grpc-status, an outcome the case does not allow (a valid case answered with
a non-zero status, a malformed header block that closed the connection), a connection
task that crashed (an ERROR record with a traceback from the transport), or a plugin
that stopped serving: after every batch a well-formed Allocate through
:func:`open_unix_channel` must succeed and the fake kubelet's ListAndWatch must still be
connected.  Leaks: open fds (``/proc/self/fd``) before and after, and the plugin's
ListAndWatch watcher count back to 1.

Run: ``python bench/hostile.py [--cases 100000] [--seed 1]``; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from trio_gpu_plugin import DevicePlugin, Resource, open_unix_channel
from trio_gpu_plugin.proto import v1beta1
from trio_gpu_plugin.testing import FakeKubelet, SimulatedDeviceSource

GPU = "nvidia.com/gpu"
CASE_TIMEOUT = 5.0
WORKERS = 8
BATCH = 2000
FD_SLACK = 8
MAX_MESSAGE = 4 * 1024 * 1024
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SERVICE = "/v1beta1.DevicePlugin/"
METHODS = ["Allocate", "ListAndWatch", "GetPreferredAllocation", "GetDevicePluginOptions",
           "PreStartContainer"]
STATUS_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT",
                4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND", 6: "ALREADY_EXISTS",
                7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
                10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL",
                14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}
# RFC 9113 §8.2.2: these belong to HTTP/1.1 connections and make an HTTP/2 request malformed.
CONNECTION_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection",
                                "transfer-encoding", "upgrade"})
REQUEST_PSEUDO_HEADERS = frozenset({":method", ":scheme", ":path", ":authority"})
# Outcomes a case may be allowed.
SERVED = frozenset({"status-OK", "streamed"})
RESET = frozenset({"rst-PROTOCOL_ERROR"})
INTERNAL = frozenset({"status-INTERNAL"})
BAD_CONTENT_TYPE = frozenset({"http-415/status-INTERNAL"})
BAD_TIMEOUT = frozenset({"http-400/status-INTERNAL"})
EXPIRED = frozenset({"status-DEADLINE_EXCEEDED"})
CLOSED = frozenset({"closed"})
MALFORMED_TIMEOUTS = ("", "abc", "1", "1x", "S", "-1S", "+1S", "100000000S", "12345678901m",
                      "1.5S", "1\u0663S")


@dataclass
class Report:
    cases: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    connections: int = 0
    fd_before: int = 0
    fd_after: int = 0
    watchers_after: int = 0
    health_checks: int = 0
    elapsed: float = 0.0

    @property
    def fd_delta(self) -> int:
        return self.fd_after - self.fd_before

    @property
    def classified(self) -> int:
        return sum(n for o, n in self.outcomes.items() if not o.startswith("FAIL"))

    @property
    def ok(self) -> bool:
        return not self.failures and abs(self.fd_delta) <= FD_SLACK

    def fail(self, line: str) -> None:
        if len(self.failures) < 200:
            self.failures.append(line)


# --- case generation --------------------------------------------------------------------


@dataclass
class Case:
    kind: str
    detail: str = ""
    headers: list[tuple[str, str]] | None = None
    chunks: list[bytes] = field(default_factory=list)  # DATA frames; the last ends the stream
    raw: bytes = b""
    raw_eof: bool = False
    streaming: bool = False
    # The outcomes this case may get; None: any answer on its own stream (a grpc-status
    # with :status 200, or a live stream), never a reset or a closed connection.
    expect: frozenset[str] | None = None
    expect_message: str = ""  # text the grpc-message must hold (for the expected outcomes)

    def allows(self, answer: Answer) -> bool:
        if self.expect is None:
            return answer.outcome == "streamed" or answer.outcome.startswith("status-")
        if answer.outcome not in self.expect:
            return False
        return not self.expect_message or self.expect_message in answer.message


@dataclass(frozen=True)
class Answer:
    """What the server did with one case."""

    outcome: str  # see the module docstring
    message: str = ""  # grpc-message, percent-decoded


def frame(payload: bytes, *, compressed: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">BI", compressed, len(payload) if length is None else length) + payload


def base_headers(method: str, timeout: str | None = None) -> list[tuple[str, str]]:
    headers = [(":method", "POST"), (":scheme", "http"), (":path", SERVICE + method),
               (":authority", "localhost"), ("content-type", "application/grpc"),
               ("te", "trailers")]
    if timeout is not None:
        headers.append(("grpc-timeout", timeout))
    return headers


def wrong_length(headers: list[tuple[str, str]], body_length: int) -> bool:
    """A well-formed ``content-length`` the body does not match: seen only once the body
    arrives, so a server that refused the call on its headers never sees it."""
    return any(name == "content-length" and value.isdigit() and int(value) != body_length
               for name, value in headers)


def malformed_block(headers: list[tuple[str, str]]) -> bool:
    """Whether RFC 9113 §8.2-8.3 makes this header block malformed (a stream error).

    Written from the RFC for the bench, independently of the server's own check.
    """
    seen: set[str] = set()
    regular = False
    for name, value in headers:
        if value != value.strip(" \t") or any(c in value for c in "\r\n\x00"):
            return True
        if name.startswith(":"):
            if regular or name in seen or name not in REQUEST_PSEUDO_HEADERS:
                return True
            seen.add(name)
            continue
        regular = True
        if name != name.lower() or name in CONNECTION_HEADERS:
            return True
        if name == "te" and value != "trailers":
            return True
        if name == "content-length" and not value.isdigit():
            return True
    path = dict(headers).get(":path", "")
    return not {":method", ":scheme", ":path"} <= seen or not path.startswith("/")


class Generator:
    def __init__(self, seed: int, gpus: list[str]) -> None:
        self.rng = random.Random(seed)
        self.gpus = gpus

    def valid_payload(self, method: str) -> bytes:
        rng = self.rng
        ids = rng.sample(self.gpus, rng.randint(1, 3))
        if method == "Allocate":
            msg: object = v1beta1.AllocateRequest(container_requests=[
                v1beta1.ContainerAllocateRequest(devices_ids=ids)])
        elif method == "GetPreferredAllocation":
            msg = v1beta1.PreferredAllocationRequest(container_requests=[
                v1beta1.ContainerPreferredAllocationRequest(
                    available_deviceIDs=list(self.gpus), must_include_deviceIDs=[],
                    allocation_size=len(ids))])
        elif method == "PreStartContainer":
            msg = v1beta1.PreStartContainerRequest(devices_ids=ids)
        else:
            msg = v1beta1.Empty()
        return msg.SerializeToString()  # type: ignore[attr-defined]

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(6)
            if op == 0 and b:  # bit flips
                for _ in range(rng.randint(1, 8)):
                    i = rng.randrange(len(b))
                    b[i] ^= 1 << rng.randrange(8)
            elif op == 1 and b:  # truncation
                del b[rng.randrange(len(b)):]
            elif op == 2:  # extension
                b += rng.randbytes(rng.randint(1, 64))
            elif op == 3 and b:  # random byte values
                b[rng.randrange(len(b))] = rng.choice((0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12))
            elif op == 4:  # splice random bytes in
                i = rng.randint(0, len(b))
                b[i:i] = rng.randbytes(rng.randint(1, 16))
            elif op == 5:  # a huge varint length somewhere
                i = rng.randint(0, len(b))
                b[i:i] = b"\x0a" + b"\xff" * rng.randint(1, 10) + b"\x01"
        return bytes(b)

    def split(self, data: bytes) -> list[bytes]:
        if len(data) < 2 or self.rng.random() < 0.7:
            return [data]
        cuts = sorted(self.rng.sample(range(1, len(data)), min(len(data) - 1, self.rng.randint(1, 3))))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]

    def method(self) -> str:
        return self.rng.choice(METHODS) if self.rng.random() < 0.4 else "Allocate"

    def case(self) -> Case:
        rng = self.rng
        r = rng.random()
        if r < 0.08:
            m = self.method()
            return Case("valid", headers=base_headers(m, rng.choice((None, "5S", "100m"))),
                        chunks=[frame(self.valid_payload(m))], expect=SERVED,
                        streaming=m == "ListAndWatch")
        if r < 0.33:
            m = self.method()
            payload = rng.randbytes(rng.choice((0, 1, 2, 5, 16, 100, 1000, rng.randint(0, 5000))))
            return Case("random", headers=base_headers(m), chunks=self.split(frame(payload)),
                        streaming=m == "ListAndWatch")
        if r < 0.63:
            m = "Allocate" if rng.random() < 0.8 else self.method()
            payload = self.mutate(self.valid_payload(m))
            return Case("mutated", headers=base_headers(m), chunks=self.split(frame(payload)),
                        streaming=m == "ListAndWatch")
        if r < 0.80:
            return self.framing_case()
        if r < 0.96:
            return self.headers_case()
        return self.garbage_case()

    def framing_case(self) -> Case:
        rng = self.rng
        m = self.method()
        payload = self.valid_payload(m)
        op = rng.randrange(9)
        expect: frozenset[str] = INTERNAL
        truncated = False
        if op == 0:  # declared longer than sent
            data = frame(payload, length=len(payload) + rng.randint(1, 1000))
            truncated = True
        elif op == 1:  # declared shorter than sent: what follows is parsed as more messages
            data = frame(payload, length=rng.randint(0, max(0, len(payload) - 1)))
            expect = SERVED if not payload else INTERNAL | {"status-RESOURCE_EXHAUSTED"}
        elif op == 2:  # compressed flag set (no grpc-encoding)
            data = frame(payload, compressed=1)
        elif op == 3:  # odd flag byte
            data = frame(payload, compressed=rng.randint(2, 255))
        elif op == 4:  # huge declared length
            data = frame(payload, length=rng.choice((MAX_MESSAGE + 1, 2**31, 2**32 - 1)))
            expect = frozenset({"status-RESOURCE_EXHAUSTED"})
        elif op == 5:  # no message at all
            data = b""
        elif op == 6:  # two messages
            data = frame(payload) + frame(payload)
        elif op == 7:  # a partial header
            data = frame(payload)[:rng.randint(1, 4)]
            truncated = True
        elif rng.random() < 0.02:  # a message of exactly the limit + 1, really sent
            data = frame(b"\x00" * (MAX_MESSAGE + 1))
            expect = frozenset({"status-RESOURCE_EXHAUSTED"})
        else:  # a whole message, then the first byte of another
            data = frame(payload) + b"\x00"
            truncated = True
        return Case("framing", f"op{op}", base_headers(m), self.split(data),
                    streaming=m == "ListAndWatch", expect=expect,
                    expect_message="truncated" if truncated else "")

    def headers_case(self) -> Case:
        rng = self.rng
        m = self.method()
        headers = base_headers(m)
        body = frame(self.valid_payload(m))
        op = rng.randrange(10)
        expect: frozenset[str] | None = SERVED
        message = ""
        if op == 0:
            headers = [h for h in headers if h[0] != "content-type"]
            expect, message = BAD_CONTENT_TYPE, "content-type"
        elif op == 1:
            content_type = rng.choice(("text/plain", "application/grpc+json", "", "application/grpcx",
                                       "application/grpc-web", "application/grpc; charset=utf-8"))
            headers = [(k, content_type if k == "content-type" else v) for k, v in headers]
            # application/grpc, then "+codec" or ";params" or nothing; grpc-go serves an
            # unknown codec as proto, and so do we.
            if content_type.startswith(("application/grpc+", "application/grpc;")):
                expect = SERVED
            else:
                expect, message = BAD_CONTENT_TYPE, "content-type"
        elif op == 2:
            path = rng.choice(("/", "", "/v1beta1.DevicePlugin", "/v1beta1.DevicePlugin/",
                               "/v1beta1.DevicePlugin/Nope", "/x/y/z", "//", "/v1beta1.Registration/Register",
                               "noslash", "/" + rng.randbytes(8).hex()))
            headers = [(k, path if k == ":path" else v) for k, v in headers]
            expect = RESET if not path.startswith("/") else frozenset(
                {"status-UNIMPLEMENTED", "status-INTERNAL"})
        elif op == 3:
            timeout = rng.choice(("1n", "0S", "99999999H", " 1S", *MALFORMED_TIMEOUTS))
            headers.append(("grpc-timeout", timeout))
            if timeout in MALFORMED_TIMEOUTS:
                expect, message = BAD_TIMEOUT, "malformed grpc-timeout"
            elif timeout in ("1n", "0S"):
                expect = EXPIRED
            elif timeout == " 1S":
                expect = RESET  # a whitespace-padded value: malformed before it is a timeout
        elif op == 4:
            encoding = rng.choice(("gzip", "deflate", "snappy", "identity", "x"))
            headers.append(("grpc-encoding", encoding))
            expect = SERVED if encoding == "identity" else frozenset({"status-UNIMPLEMENTED"})
        elif op == 5:
            headers = [(k, "GET" if k == ":method" else v) for k, v in headers]
            expect = frozenset({"http-405/status-INTERNAL"})
        elif op == 6:
            headers = [h for h in headers if h[0] != "te"]
            expect = INTERNAL
        elif op == 7:  # random extra headers, possibly invalid ones
            for _ in range(rng.randint(1, 5)):
                name = rng.choice(("x-" + rng.randbytes(3).hex(), "Upper-Case", "connection",
                                   "grpc-status", ":bogus", "te", "content-length"))
                headers.append((name, rng.choice(("1", "", "trailers", "keep-alive", "\x00x"))))
            expect = None  # a second "te: trailers" is refused by gRPC, for one
        elif op == 8:  # missing pseudo-headers
            drop = rng.choice((":method", ":path", ":scheme"))
            headers = [h for h in headers if h[0] != drop]
        else:
            rng.shuffle(headers)
        if malformed_block(headers):
            expect, message = RESET, ""
        elif wrong_length(headers, len(body)):
            # A second "te" is refused on the headers (INTERNAL); whether that answer
            # leaves before the body (arriving with them) shows the wrong length and gets
            # the stream reset is a race, and either is right.  Otherwise: reset.
            twice = sum(1 for name, _ in headers if name == "te") > 1
            expect, message = (INTERNAL | RESET if twice else RESET), ""
        return Case("headers", f"op{op}", headers, [body], streaming=m == "ListAndWatch",
                    expect=expect, expect_message=message)

    def garbage_case(self) -> Case:
        rng = self.rng
        op = rng.randrange(5)
        if op == 0:  # garbage instead of the preface
            data = rng.randbytes(rng.randint(1, 200))
            if data[:1] == b"P":
                data = b"Q" + data[1:]
            return Case("garbage", raw=data, raw_eof=False, expect=CLOSED)
        if op == 1:
            return Case("garbage", raw=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", raw_eof=False, expect=CLOSED)
        if op == 2:  # a corrupted preface
            b = bytearray(PREFACE)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return Case("garbage", raw=bytes(b), raw_eof=False, expect=CLOSED)
        if op == 3:  # preface, then random frames
            return Case("garbage", raw=PREFACE + rng.randbytes(rng.randint(1, 300)), raw_eof=True, expect=CLOSED)
        # preface, then frames with plausible headers and random bodies
        out = bytearray(PREFACE)
        for _ in range(rng.randint(1, 4)):
            body = rng.randbytes(rng.randint(0, 40))
            out += struct.pack(">I", len(body))[1:] + bytes((rng.randrange(10), rng.randrange(256)))
            out += struct.pack(">I", rng.choice((0, 1, 2, 3, rng.randrange(2**31))))
            out += body
        return Case("garbage", raw=bytes(out), raw_eof=True, expect=CLOSED)


# --- the raw client ---------------------------------------------------------------------


class Closed(Exception):
    pass


class RawConnection:
    """A raw HTTP/2 client connection: sends whatever headers it is given, unvalidated."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h2 = h2.connection.H2Connection(config=h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        self.closed = False
        self.goaway: int | None = None  # the error code of the server's GOAWAY, if any

    @classmethod
    async def open(cls, path: Path) -> RawConnection:
        conn = cls(await trio.open_unix_socket(os.fspath(path)))
        conn.h2.initiate_connection()
        conn.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        conn.h2.increment_flow_control_window(2**30)
        await conn.flush()
        return conn

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.closed = True
                raise Closed() from exc

    async def close(self) -> None:
        self.closed = True
        await self.stream.aclose()

    async def send_data(self, stream_id: int, data: bytes, end: bool) -> None:
        """Send ``data``, waiting for flow-control credit as the server gives it."""
        while True:
            window = min(self.h2.local_flow_control_window(stream_id),
                         self.h2.max_outbound_frame_size)
            if window >= len(data):
                self.h2.send_data(stream_id, data, end_stream=end)
                await self.flush()
                return
            if window > 0:
                self.h2.send_data(stream_id, data[:window])
                data = data[window:]
                await self.flush()
                continue
            events = await self.receive()
            for ev in events:
                if isinstance(ev, (h2.events.StreamReset, h2.events.StreamEnded)) \
                        and ev.stream_id == stream_id:
                    raise _Early(events)

    async def receive(self) -> list[object]:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = True
            raise Closed()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.closed = True
            raise Closed() from exc
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
                self.goaway = ev.error_code
        await self.flush()
        if self.closed:
            raise Closed()
        return events


class _Early(Exception):
    def __init__(self, events: list[object]) -> None:
        self.events = events


def _answer_of(headers: list[tuple[str, str]]) -> Answer | None:
    """The outcome a header block carries (grpc-status, and :status where not 200)."""
    fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
              for k, v in headers}
    code = fields.get("grpc-status")
    if code is None:
        return None
    try:
        outcome = "status-" + STATUS_NAMES.get(int(code), code)
    except ValueError:
        outcome = "status-" + code
    http_status = fields.get(":status", "200")
    if http_status != "200":
        outcome = f"http-{http_status}/{outcome}"
    return Answer(outcome, urllib.parse.unquote(fields.get("grpc-message", "")))


def _reset_outcome(error_code: int) -> str:
    try:
        return f"rst-{h2.errors.ErrorCodes(error_code).name}"
    except ValueError:
        return f"rst-{error_code}"


async def run_stream(conn: RawConnection, case: Case) -> Answer:
    """Send one request and read until its outcome; ``Closed`` if the connection went."""
    sid = conn.h2.get_next_available_stream_id()
    assert case.headers is not None
    chunks = case.chunks or [b""]
    try:
        conn.h2.send_headers(sid, case.headers, end_stream=False)
    except h2.exceptions.ProtocolError:
        # h2 itself refuses (e.g. too many streams): a fresh connection will do.
        raise Closed() from None
    await conn.flush()
    pending: list[object] = []
    try:
        for i, chunk in enumerate(chunks):
            await conn.send_data(sid, chunk, end=i == len(chunks) - 1)
    except _Early as early:
        pending = early.events
    except h2.exceptions.StreamClosedError:
        pass  # the server already answered and reset this stream; the events tell
    status: Answer | None = None
    got_data = False
    while True:
        for ev in pending:
            if getattr(ev, "stream_id", None) != sid:
                continue
            if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                status = _answer_of(ev.headers) or status
            elif isinstance(ev, h2.events.DataReceived):
                got_data = True
                if case.streaming and status is None:
                    # A live ListAndWatch: it streamed, which is its success; cancel it.
                    try:
                        conn.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    except h2.exceptions.StreamClosedError:
                        continue  # it ended in this same read: its trailers tell
                    await conn.flush()
                    return Answer("streamed")
            elif isinstance(ev, h2.events.StreamReset):
                return status or Answer(_reset_outcome(ev.error_code))
            elif isinstance(ev, h2.events.StreamEnded):
                return status or Answer("FAIL-no-status" + ("-data" if got_data else ""))
        pending = await conn.receive()


async def run_garbage(path: Path, case: Case) -> Answer:
    stream = await trio.open_unix_socket(os.fspath(path))
    async with stream:
        try:
            await stream.send_all(case.raw)
            if case.raw_eof:
                await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return Answer("closed")
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return Answer("closed")
            if not data:
                return Answer("closed")


# --- the scenario ----------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def check_serving(path: Path, kubelet: FakeKubelet, gpus: list[str], report: Report,
                        where: str) -> None:
    report.health_checks += 1
    try:
        with trio.fail_after(CASE_TIMEOUT):
            async with open_unix_channel(path) as channel:
                response = await channel.unary(
                    v1beta1.DEVICE_PLUGIN, "Allocate", v1beta1.AllocateRequest(container_requests=[
                        v1beta1.ContainerAllocateRequest(devices_ids=gpus[:2])]))
        if len(response.container_responses) != 1:
            report.fail(f"{where}: Allocate answered {response!r}")
    except Exception as exc:  # noqa: BLE001 - any failure here is the finding
        report.fail(f"{where}: a well-formed Allocate failed: {type(exc).__name__}: {exc}")
    state = kubelet.resources.get(GPU)
    if state is None or not state.connected:
        report.fail(f"{where}: the kubelet's ListAndWatch is no longer connected")


async def hostile(cases: int, seed: int = 1, *, workers: int = WORKERS,
                  batch: int = BATCH) -> Report:
    """Run ``cases`` hostile cases against an in-process plugin; see the module docstring."""
    report = Report()
    capture = _Capture()
    logger = logging.getLogger("trio_gpu_plugin")
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    logger.addHandler(capture)
    directory = tempfile.mkdtemp(prefix="tgp-hostile-", dir="/tmp")
    try:
        await _scenario(Path(directory), cases, seed, workers, batch, report)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        shutil.rmtree(directory, ignore_errors=True)
    for record in capture.records:
        report.fail(f"plugin logged {record.levelname}: {record.getMessage()}"
                    + (f" ({record.exc_info[0].__name__}: {record.exc_info[1]})"
                       if record.exc_info and record.exc_info[0] else ""))
    if abs(report.fd_delta) > FD_SLACK:
        report.fail(f"fd leak: {report.fd_before} open before, {report.fd_after} after")
    return report


async def _scenario(directory: Path, cases: int, seed: int, workers: int, batch: int,
                    report: Report) -> None:
    source = SimulatedDeviceSource.preset("dgx-a100")
    gpus = [g.uuid for g in source.gpus]
    path = directory / "nvidia-gpu.sock"
    generator = Generator(seed, gpus)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        kubelet = FakeKubelet(directory)
        await nursery.start(kubelet.run)
        plugin = DevicePlugin([Resource(GPU, source, "nvidia-gpu.sock")],
                              kubelet_socket=kubelet.kubelet_socket)
        with trio.fail_after(10):
            await nursery.start(plugin.run)
            await kubelet.wait_registered(GPU)
            await kubelet.wait_until(lambda: kubelet.resources[GPU].connected)
        fd_base = count_fds()
        report.fd_before = fd_base
        done = 0
        while done < cases:
            n = min(batch, cases - done)
            queue = [generator.case() for _ in range(n)]
            queue.reverse()
            async with trio.open_nursery() as workers_nursery:
                for w in range(workers):
                    workers_nursery.start_soon(_worker, path, queue, report, done, n)
            done += n
            await check_serving(path, kubelet, gpus, report, f"after case {done}")
        # Everything the cases opened is gone: fds back, only the kubelet watching.
        with trio.move_on_after(CASE_TIMEOUT):
            while plugin.services[GPU].watchers != 1 or count_fds() > fd_base + FD_SLACK:
                await trio.sleep(0.01)
        report.watchers_after = plugin.services[GPU].watchers
        if report.watchers_after != 1:
            report.fail(f"{report.watchers_after} ListAndWatch watchers left (expected 1)")
        report.fd_after = count_fds()
        report.elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()


async def _worker(path: Path, queue: list[Case], report: Report, offset: int, n: int) -> None:
    conn: RawConnection | None = None
    try:
        while queue:
            index = offset + n - len(queue)
            case = queue.pop()
            answer = Answer("FAIL-hang")
            with trio.move_on_after(CASE_TIMEOUT):
                if case.headers is None:
                    answer = await run_garbage(path, case)
                else:
                    for _attempt in range(2):
                        if conn is None or conn.closed:
                            if conn is not None:
                                await conn.close()
                            conn = await RawConnection.open(path)
                            report.connections += 1
                        try:
                            answer = await run_stream(conn, case)
                            break
                        except Closed:
                            answer = Answer("closed")
                            # An already-dead connection we only noticed now: retry once
                            # on a fresh one, unless this case killed it.
                            if conn.h2.get_next_available_stream_id() > 3:
                                break
            outcome = answer.outcome
            if outcome == "FAIL-hang" and conn is not None:
                await conn.close()  # the stream's state is unknown: start afresh
            report.cases += 1
            report.outcomes[outcome] += 1
            report.by_kind[f"{case.kind}{'/' + case.detail if case.detail else ''}:{outcome}"] += 1
            if outcome.startswith("FAIL"):
                report.fail(f"case {index} ({case.kind}): {outcome}: {describe(case)}")
            elif not case.allows(answer):
                wanted = "an answer on its stream" if case.expect is None else sorted(case.expect)
                if case.expect_message:
                    wanted = f"{wanted} saying {case.expect_message!r}"
                report.fail(f"case {index} ({case.kind}): expected {wanted}, got {outcome}"
                            f"{f' ({answer.message})' if answer.message else ''}: {describe(case)}")
    finally:
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.close()


def describe(case: Case) -> str:
    if case.headers is None:
        return f"raw {case.raw[:60]!r}{'+EOF' if case.raw_eof else ''}"
    body = b"".join(case.chunks)
    return f"headers={case.headers!r} data({len(case.chunks)} frames)={body[:60]!r}"


def format_report(report: Report) -> str:
    lines = [(f"cases: {report.cases} in {report.elapsed:.1f} s "
              f"({report.cases / max(report.elapsed, 1e-9):.0f}/s), "
              f"{report.connections} raw connections, {report.health_checks} health checks")]
    for outcome, count in sorted(report.outcomes.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {outcome:28} {count}")
    lines.append("by kind:")
    for key, count in sorted(report.by_kind.items()):
        lines.append(f"  {key:36} {count}")
    lines.append(f"fds: {report.fd_before} before, {report.fd_after} after "
                 f"(delta {report.fd_delta:+d}); watchers left {report.watchers_after}")
    lines.extend(f"FAIL {line}" for line in report.failures)
    lines.append("OK" if report.ok else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=WORKERS)
    args = parser.parse_args(argv)
    report = trio.run(functools.partial(hostile, args.cases, args.seed, workers=args.workers))
    print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
