"""--metrics-address: the Metrics registry, the probe rules, and the h11 server scraped
over loopback with a small h11 client."""

from __future__ import annotations

import functools
import logging
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import h11
import pynvml
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_gpu_plugin import DevicePlugin, NvmlNode, Resource, RpcError, StatusCode, _runtime
from trio_gpu_plugin._health import HealthChecks
from trio_gpu_plugin._metrics import (
    LIVE_CHECK_TIMEOUT,
    LIVENESS_GRACE,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    HealthStatus,
    Metrics,
    parse_address,
    serve_metrics,
)
from trio_gpu_plugin._nvml_sim import SimulatedNVML, node_from
from trio_gpu_plugin._observe import Observer, Problem
from trio_gpu_plugin._watch import Identity, PathWatcher
from trio_gpu_plugin.proto import v1beta1
from trio_gpu_plugin.testing import FakeKubelet, SimulatedDeviceSource

GPU = "nvidia.com/gpu"
MIG = "nvidia.com/mig-1g.10gb"
HANG_GUARD = 10.0


# --- a small client ----------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection driven by h11."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, body: bytes = b""
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("host", "test")]
        if body:
            headers.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data = (data or b"") + (self.conn.send(h11.Data(data=body)) or b"")
        data = (data or b"") + (self.conn.send(h11.EndOfMessage()) or b"")
        await self.stream.send_all(data)
        response: h11.Response | None = None
        received = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                received += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response.status_code, dict(response.headers), received
            else:
                raise AssertionError(f"unexpected {event!r}")


async def connect(port: int) -> Client:
    return Client(await trio.open_tcp_stream("127.0.0.1", port))


async def get(port: int, target: str, method: str = "GET") -> tuple[int, dict[bytes, bytes], bytes]:
    client = await connect(port)
    async with client.stream:
        return await client.request(method, target)


async def raw(port: int, payload: bytes) -> bytes:
    """Send ``payload`` on a fresh connection and read until the server closes."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(payload)
        received = b""
        with trio.fail_after(2):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return received


@pytest.fixture
async def served(nursery: trio.Nursery) -> tuple[Metrics, int]:
    metrics = Metrics()
    port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
    return metrics, port


def samples(metrics_text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics_text.decode()):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


# --- probes ------------------------------------------------------------------------------


async def test_healthz_starting_then_ok_then_not_registered(
    served: tuple[Metrics, int],
) -> None:
    metrics, port = served
    status, headers, body = await get(port, "/healthz")
    assert status == 503 and b"starting" in body
    assert headers[b"content-type"].startswith(b"text/plain")

    metrics.health.set_resource(GPU, True, True, "")
    status, _, body = await get(port, "/healthz")
    assert (status, body) == (200, b"ok\n")

    metrics.health.set_resource(MIG, False, True, "kubelet refused: version")
    status, _, body = await get(port, "/healthz")
    assert status == 503
    assert body == b"nvidia.com/mig-1g.10gb: not registered: kubelet refused: version\n"

    metrics.health.set_resource(GPU, True, False, "")
    status, _, body = await get(port, "/healthz")
    assert status == 503
    assert body.decode().splitlines() == [
        "nvidia.com/gpu: not serving",
        "nvidia.com/mig-1g.10gb: not registered: kubelet refused: version",
    ]

    metrics.health.forget_resource(MIG)
    metrics.health.set_resource(GPU, True, True, "")
    assert (await get(port, "/healthz"))[0] == 200


async def test_readyz_also_needs_nvml(served: tuple[Metrics, int]) -> None:
    metrics, port = served
    status, _, body = await get(port, "/readyz")
    assert status == 503 and b"starting" in body

    metrics.health.set_resource(GPU, True, True, "")
    assert (await get(port, "/readyz"))[::2] == (200, b"ok\n")  # NVML never reported

    metrics.nvml_up(False, "driver unloaded")
    status, _, body = await get(port, "/readyz")
    assert (status, body) == (503, b"nvml: down: driver unloaded\n")
    assert (await get(port, "/healthz"))[0] == 200  # liveness ignores NVML

    metrics.nvml_up(True)
    assert (await get(port, "/readyz"))[0] == 200

    metrics.health.set_resource(GPU, False, False, "")
    status, _, body = await get(port, "/readyz")
    assert (status, body) == (503, b"nvidia.com/gpu: not registered, not serving\n")


async def test_health_status_forgetting_every_resource_is_starting_again() -> None:
    health = HealthStatus()
    health.set_resource(GPU, True, True, "")
    assert await health.healthz() == (True, "ok\n")
    health.forget_resource(GPU)
    health.forget_resource(GPU)  # idempotent
    ok, text = await health.healthz()
    assert not ok and "starting" in text


async def test_liveness_forgives_a_state_the_plugin_repairs_for_the_grace_readiness_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    health = HealthStatus()
    found: list[Problem] = []

    async def check(timeout: float) -> list[Problem]:
        assert timeout == LIVE_CHECK_TIMEOUT
        return found

    health.set_live_check(GPU, check)
    health.set_resource(GPU, False, False, "")  # a live check outranks reported flags
    starting = Problem("not registered with the kubelet for 0 s: registering",
                       since=trio.current_time())
    found[:] = [starting]
    # Until the first ok the grace does not apply: the startupProbe waits for that.
    assert await health.healthz() == (False, f"{GPU}: {starting.text}\n")
    found.clear()
    assert await health.healthz() == (True, "ok\n")

    found[:] = [Problem("no ListAndWatch stream from the kubelet", since=trio.current_time())]
    assert await health.healthz() == (True, "ok\n")
    assert await health.readyz() == (False, f"{GPU}: no ListAndWatch stream from the kubelet\n")
    await trio.sleep(LIVENESS_GRACE)
    assert await health.healthz() == (False, f"{GPU}: no ListAndWatch stream from the kubelet\n")

    found[:] = [Problem("socket x does not answer: refused")]  # nothing repairs that
    assert await health.healthz() == (False, f"{GPU}: socket x does not answer: refused\n")
    found.clear()
    assert await health.healthz() == (True, "ok\n")
    health.forget_resource(GPU)
    assert (await health.healthz())[0] is False  # starting: nothing known


async def test_a_check_that_hangs_or_breaks_fails_the_probe_not_the_server(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    health = HealthStatus()

    async def hangs(timeout: float) -> list[Problem]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def breaks(timeout: float) -> list[Problem]:
        raise RuntimeError("a bug")

    health.set_live_check(GPU, hangs)
    health.set_live_check(MIG, breaks)
    ok, text = await health.healthz()
    assert not ok
    assert text.splitlines() == [
        f"{GPU}: the health check did not finish within {LIVE_CHECK_TIMEOUT + 0.5:g} s",
        f"{MIG}: the health check failed: RuntimeError: a bug",
    ]
    assert any("the live health check failed" in r.getMessage() for r in caplog.records)


# --- live probes: the plugin's own socket and the kubelet's stream ------------------------
#
# /healthz and /readyz against a running DevicePlugin and a fake kubelet: the answer must
# come from checking now (dialling the plugin's socket, looking at the kubelet's stream),
# not from a flag set when the plugin registered.

PLUGIN_SOCKET = "nvidia-gpu.sock"


async def serve_plugin(
    nursery: trio.Nursery, kubelet: FakeKubelet, plugin: DevicePlugin, metrics: Metrics
) -> int:
    port: int = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
    with trio.fail_after(HANG_GUARD):
        await nursery.start(plugin.run)
        await kubelet.wait_registered(GPU)
    return port


def new_plugin(kubelet: FakeKubelet, source: SimulatedDeviceSource) -> tuple[DevicePlugin, Metrics]:
    metrics = Metrics()
    plugin = DevicePlugin([Resource(GPU, source, PLUGIN_SOCKET)],
                          kubelet_socket=kubelet.kubelet_socket, observer=metrics)
    return plugin, metrics


async def until_ok(port: int, target: str = "/healthz") -> None:
    with trio.fail_after(HANG_GUARD):
        while (await get(port, target))[0] != 200:
            await trio.sleep(0.01)


async def test_healthz_fails_on_the_next_request_when_the_plugins_server_stops_answering(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource,
    autojump_clock: trio.testing.MockClock,
) -> None:
    plugin, metrics = new_plugin(fake_kubelet, simulated_node)
    service = plugin.services[GPU]
    answer = service.get_device_plugin_options
    wedged = False

    async def maybe_wedged(request: v1beta1.Empty) -> v1beta1.DevicePluginOptions:
        if wedged:
            await trio.sleep_forever()
        return await answer(request)

    service.get_device_plugin_options = maybe_wedged  # type: ignore[method-assign]
    port = await serve_plugin(nursery, fake_kubelet, plugin, metrics)
    assert (await get(port, "/healthz"))[::2] == (200, b"ok\n")

    wedged = True  # the server accepts connections but answers nothing
    status, _, body = await get(port, "/healthz")
    path = fake_kubelet.socket_dir / PLUGIN_SOCKET
    assert status == 503
    assert body.decode() == (f"{GPU}: socket {path} does not answer: no reply to "
                             f"GetDevicePluginOptions within {LIVE_CHECK_TIMEOUT:g} s\n")
    assert (await get(port, "/readyz"))[0] == 503

    wedged = False
    assert (await get(port, "/healthz"))[::2] == (200, b"ok\n")


class MissesOwnSocket(PathWatcher):
    """Sees kubelet.sock come and go, never the plugin's own socket: as if inotify missed
    its removal and the safety-net poll had not come round yet."""

    async def wait_for_change(self, baseline: Mapping[str, Identity]) -> dict[str, Identity]:
        kubelet = {k: v for k, v in baseline.items() if k.endswith("/kubelet.sock")}
        return {**baseline, **await super().wait_for_change(kubelet)}


async def test_healthz_fails_when_the_plugins_socket_is_gone_and_recovers_when_served_again(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_runtime, "PathWatcher", MissesOwnSocket)
    plugin, metrics = new_plugin(fake_kubelet, simulated_node)
    port = await serve_plugin(nursery, fake_kubelet, plugin, metrics)
    assert (await get(port, "/healthz"))[::2] == (200, b"ok\n")

    path = fake_kubelet.socket_dir / PLUGIN_SOCKET
    path.unlink()
    status, _, body = await get(port, "/healthz")
    assert status == 503
    assert body.decode() == (f"{GPU}: socket {path} does not answer: UNAVAILABLE: cannot "
                             f"connect to {path}: [Errno 2] No such file or directory\n")

    plugin.restart("test: serve the socket again")
    await fake_kubelet.wait_registered(GPU, count=2)
    await until_ok(port)


async def test_healthz_fails_after_the_grace_without_a_kubelet_stream_and_recovers(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource,
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "trio_gpu_plugin.metrics")
    plugin, metrics = new_plugin(fake_kubelet, simulated_node)
    port = await serve_plugin(nursery, fake_kubelet, plugin, metrics)
    await until_ok(port, "/readyz")
    assert (await get(port, "/healthz"))[::2] == (200, b"ok\n")

    # Killed, the kubelet leaves kubelet.sock behind: nothing tells the plugin to
    # register again, and nobody watches its devices any more.
    await fake_kubelet.kill()
    service = plugin.services[GPU]
    with trio.fail_after(HANG_GUARD):
        while service.watchers:
            await trio.sleep(0.01)
    status, _, body = await get(port, "/readyz")
    assert status == 503  # readiness: at once
    assert re.fullmatch(rf"{re.escape(GPU)}: no ListAndWatch stream from the kubelet for 0 s: "
                        r".*\n", body.decode()), body
    assert (await get(port, "/healthz"))[::2] == (200, b"ok\n")  # liveness: a grace

    await trio.sleep(LIVENESS_GRACE)
    status, _, body = await get(port, "/healthz")
    assert status == 503
    path = fake_kubelet.socket_dir / PLUGIN_SOCKET
    assert body.decode() == (f"{GPU}: no ListAndWatch stream from the kubelet for "
                             f"{LIVENESS_GRACE:.0f} s: the kubelet is not watching {path}, "
                             f"so it has no devices of {GPU} to allocate\n")
    # The kubelet's probe events show only "statuscode: 503": the log says why.
    failing = [r.getMessage() for r in caplog.records if "/healthz now fails" in r.getMessage()]
    assert len(failing) == 1 and "no ListAndWatch stream from the kubelet" in failing[0]

    await fake_kubelet.restart()
    await fake_kubelet.wait_registered(GPU, count=2)
    await until_ok(port)
    await until_ok(port, "/readyz")
    assert any(r.getMessage() == "/healthz is ok again" for r in caplog.records)


async def test_concurrent_probes_share_one_dial_and_a_slow_one_blocks_nothing_else(
    nursery: trio.Nursery, fake_kubelet: FakeKubelet, simulated_node: SimulatedDeviceSource,
    mock_clock: trio.testing.MockClock,
) -> None:
    # A frozen clock: the check's timeout cannot strike while the test holds it up.
    plugin, metrics = new_plugin(fake_kubelet, simulated_node)
    service = plugin.services[GPU]
    answer = service.get_device_plugin_options
    calls = 0
    release = trio.Event()

    async def counted(request: v1beta1.Empty) -> v1beta1.DevicePluginOptions:
        nonlocal calls
        calls += 1
        if calls > 1:  # the first is the kubelet's, inside Register
            await release.wait()
        return await answer(request)

    service.get_device_plugin_options = counted  # type: ignore[method-assign]
    port = await serve_plugin(nursery, fake_kubelet, plugin, metrics)
    answers: list[tuple[int, bytes]] = []

    async def probe(target: str) -> None:
        status, _, body = await get(port, target)
        answers.append((status, body))

    async with trio.open_nursery() as probes:
        for target in ("/healthz", "/readyz") * 3:
            probes.start_soon(probe, target)
        await trio.testing.wait_all_tasks_blocked()
        assert calls == 2  # six probes, one dial
        assert (await get(port, "/metrics"))[0] == 200  # not held up by the check
        assert answers == []
        release.set()
    assert answers == [(200, b"ok\n")] * 6


# --- probes that say why (the text `kubectl describe pod` shows of a failing probe) --------


async def until_body(port: int, target: str, text: str) -> tuple[int, str]:
    """Probe ``target`` until its answer contains ``text``; that answer."""
    with trio.fail_after(HANG_GUARD):
        while True:
            status, _, body = await get(port, target)
            if text in body.decode():
                return status, body.decode()
            await trio.sleep(0.01)


async def test_probes_say_the_kubelet_socket_does_not_exist(
    nursery: trio.Nursery, served: tuple[Metrics, int], simulated_node: SimulatedDeviceSource,
    socket_dir: pathlib.Path,
) -> None:
    metrics, port = served
    kubelet_socket = socket_dir / "kubelet.sock"  # no kubelet on this node
    plugin = DevicePlugin([Resource(GPU, simulated_node, PLUGIN_SOCKET)],
                          kubelet_socket=kubelet_socket, observer=metrics)
    nursery.start_soon(plugin.run)
    why = f"waiting for the kubelet: {kubelet_socket} does not exist"
    for target in ("/healthz", "/readyz"):
        status, body = await until_body(port, target, why)
        assert status == 503
        assert re.fullmatch(rf"{re.escape(GPU)}: not registered with the kubelet for \d+ s: "
                            rf"{re.escape(why)}\n", body), body


async def test_probes_say_nvml_is_unavailable_and_why(
    nursery: trio.Nursery, served: tuple[Metrics, int], tmp_path: pathlib.Path,
) -> None:
    metrics, port = served
    nvml = SimulatedNVML(node_from("pcie-4"), init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    nvml.write_driver_root(tmp_path)
    # No driver: the node retries, and no resource can be planned before NVML answers.
    node = NvmlNode(nvml, root=tmp_path, checks=HealthChecks(), fail_on_init_error=False,
                    retry_initial=0.01, retry_cap=0.05, observer=metrics)
    nursery.start_soon(node.run)
    for target in ("/healthz", "/readyz"):
        assert await until_body(port, target, "NVML") == (
            503, "NVML unavailable: Driver Not Loaded\n")
    nvml.set_init_error(None)
    with trio.fail_after(HANG_GUARD):
        await node.wait_model()
    # NVML answers; the probes wait for the resources built from it now.
    assert await until_body(port, "/readyz", "starting") == (
        503, "starting: no resource known yet\n")


class RefusingKubelet(FakeKubelet):
    """Refuses every Register with the kubelet's reason."""

    reason = "device manager is not ready"

    async def _register(self, generation: Any, request: v1beta1.RegisterRequest) -> v1beta1.Empty:
        raise RpcError(StatusCode.UNKNOWN, self.reason)


async def test_probes_give_the_kubelets_reason_for_refusing_the_registration(
    nursery: trio.Nursery, served: tuple[Metrics, int], simulated_node: SimulatedDeviceSource,
    socket_dir: pathlib.Path,
) -> None:
    metrics, port = served
    kubelet = RefusingKubelet(socket_dir)
    await nursery.start(kubelet.run)
    plugin = DevicePlugin([Resource(GPU, simulated_node, PLUGIN_SOCKET)],
                          kubelet_socket=kubelet.kubelet_socket, observer=metrics)
    nursery.start_soon(plugin.run)
    for target in ("/healthz", "/readyz"):
        status, body = await until_body(port, target, RefusingKubelet.reason)
        assert status == 503
        assert re.fullmatch(rf"{re.escape(GPU)}: not registered with the kubelet for \d+ s: "
                            rf"the kubelet refused the registration \(retrying\): "
                            rf"{RefusingKubelet.reason}\n", body), body


# --- /metrics ----------------------------------------------------------------------------


async def test_metrics_exposes_every_recorded_metric(served: tuple[Metrics, int]) -> None:
    metrics, port = served
    metrics.registered(GPU)
    metrics.registered(GPU)
    metrics.registered(MIG)
    metrics.kubelet_restart(GPU)
    metrics.rpc("Allocate", GPU, 0.0003, ok=True)
    metrics.rpc("Allocate", GPU, 0.02, ok=True)
    metrics.rpc("Allocate", GPU, 2.0, ok=False)
    metrics.rpc("ListAndWatch", MIG, 0.001, ok=True)
    metrics.nvml_event(79, "xid")
    metrics.nvml_event(79, "xid")
    metrics.nvml_event(None, "ecc-dbe")
    metrics.nvml_event(None, "something-new")
    metrics.health_transition("GPU-0", False, "XID 79")
    metrics.set_devices(GPU, 7, 1)
    metrics.nvml_up(True)

    status, headers, body = await get(port, "/metrics")
    assert status == 200
    assert headers[b"content-type"].startswith(b"text/plain; version=")
    s = samples(body)

    assert s[key("trio_gpu_plugin_registrations_total", resource=GPU)] == 2
    assert s[key("trio_gpu_plugin_registrations_total", resource=MIG)] == 1
    assert s[key("trio_gpu_plugin_kubelet_restarts_total", resource=GPU)] == 1
    assert key("trio_gpu_plugin_kubelet_restarts_total", resource=MIG) not in s

    requests = "trio_gpu_plugin_rpc_requests_total"
    assert s[key(requests, method="Allocate", resource=GPU, code="ok")] == 2
    assert s[key(requests, method="Allocate", resource=GPU, code="error")] == 1
    assert s[key(requests, method="ListAndWatch", resource=MIG, code="ok")] == 1

    def bucket(le: str) -> float:
        return s[key("trio_gpu_plugin_rpc_duration_seconds_bucket",
                     method="Allocate", resource=GPU, le=le)]

    assert bucket("0.0005") == 1
    assert bucket("0.01") == 1
    assert bucket("0.025") == 2
    assert bucket("1.0") == 2
    assert bucket("5.0") == 3
    assert bucket("+Inf") == 3
    les = {dict(labels)["le"] for name, labels in s
           if name == "trio_gpu_plugin_rpc_duration_seconds_bucket"}
    assert les == {"0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
                   "0.25", "1.0", "5.0", "+Inf"}
    assert s[key("trio_gpu_plugin_rpc_duration_seconds_count",
                 method="Allocate", resource=GPU)] == 3
    assert s[key("trio_gpu_plugin_rpc_duration_seconds_sum",
                 method="Allocate", resource=GPU)] == pytest.approx(2.0203)

    events = "trio_gpu_plugin_nvml_events_total"
    assert s[key(events, kind="xid", xid="79")] == 2
    assert s[key(events, kind="ecc-dbe", xid="")] == 1
    assert s[key(events, kind="other", xid="")] == 1  # unknown kinds stay bounded

    transitions = "trio_gpu_plugin_health_transitions_total"
    assert s[key(transitions, to="unhealthy")] == 1
    assert s[key(transitions, to="healthy")] == 0  # pre-created, so rate() works at once

    assert s[key("trio_gpu_plugin_devices", resource=GPU, health="healthy")] == 7
    assert s[key("trio_gpu_plugin_devices", resource=GPU, health="unhealthy")] == 1
    assert s[key("trio_gpu_plugin_nvml_up")] == 1

    # No device IDs or reasons leak into labels.
    assert b"GPU-0" not in body and b"XID 79" not in body

    metrics.nvml_up(False)
    metrics.forget_devices(GPU)
    metrics.forget_devices(GPU)  # idempotent
    s = samples((await get(port, "/metrics"))[2])
    assert s[key("trio_gpu_plugin_nvml_up")] == 0
    assert not any(name == "trio_gpu_plugin_devices" for name, _ in s)


async def test_metrics_is_an_observer_and_feeds_the_probes(
    served: tuple[Metrics, int],
) -> None:
    metrics, port = served
    assert isinstance(metrics, Observer)
    metrics.set_resource(GPU, True, True, "")
    metrics.set_devices(GPU, 2, 0)
    assert (await get(port, "/healthz"))[0] == 200
    metrics.forget_resource(GPU)
    status, _, body = await get(port, "/healthz")
    assert status == 503 and b"starting" in body
    s = samples((await get(port, "/metrics"))[2])
    assert not any(name == "trio_gpu_plugin_devices" for name, _ in s)


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # no "Duplicated timeseries" from a shared registry
    a.registered(GPU)
    assert b"registrations_total{resource=\"nvidia.com/gpu\"} 1.0" in a.render()
    assert b"registrations_total{resource=" not in b.render()


# --- HTTP behaviour ----------------------------------------------------------------------


async def test_not_found_and_method_not_allowed(served: tuple[Metrics, int]) -> None:
    _, port = served
    assert (await get(port, "/"))[0] == 404
    assert (await get(port, "/metrics/x"))[0] == 404
    status, headers, _ = await get(port, "/metrics", method="POST")
    assert status == 405 and headers[b"allow"] == b"GET, HEAD"
    assert (await get(port, "/healthz", method="DELETE"))[0] == 405


async def test_query_string_is_ignored(served: tuple[Metrics, int]) -> None:
    _, port = served
    assert (await get(port, "/metrics?name[]=x"))[0] == 200


async def test_head_has_headers_but_no_body(served: tuple[Metrics, int]) -> None:
    metrics, port = served
    metrics.registered(GPU)
    _, get_headers, get_body = await get(port, "/metrics")
    status, headers, body = await get(port, "/metrics", method="HEAD")
    assert status == 200 and body == b""
    assert headers[b"content-length"] == str(len(get_body)).encode()
    assert headers[b"content-type"] == get_headers[b"content-type"]
    status, headers, body = await get(port, "/healthz", method="HEAD")
    assert status == 503 and body == b"" and int(headers[b"content-length"]) > 0


async def test_keep_alive_serves_several_requests_on_one_connection(
    served: tuple[Metrics, int],
) -> None:
    metrics, port = served
    client = await connect(port)
    async with client.stream:
        assert (await client.request("GET", "/healthz"))[0] == 503
        metrics.health.set_resource(GPU, True, True, "")
        assert (await client.request("GET", "/healthz"))[0] == 200
        assert (await client.request("HEAD", "/metrics"))[0] == 200
        assert (await client.request("GET", "/nope"))[0] == 404
        assert (await client.request("POST", "/readyz", body=b"x" * 100))[0] == 405
        assert (await client.request("GET", "/metrics"))[0] == 200


async def test_malformed_request_is_answered_400_and_closed(
    served: tuple[Metrics, int],
) -> None:
    _, port = served
    answer = await raw(port, b"this is not http\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in answer.lower()


async def test_oversized_headers_and_body_are_refused(served: tuple[Metrics, int]) -> None:
    _, port = served
    big_header = b"x-big: " + b"a" * (MAX_HEADER_BYTES * 2) + b"\r\n"
    answer = await raw(port, b"GET /metrics HTTP/1.1\r\nhost: t\r\n" + big_header + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")

    size = MAX_BODY_BYTES + 1
    answer = await raw(port, b"POST /metrics HTTP/1.1\r\nhost: t\r\ncontent-length: "
                       + str(size).encode() + b"\r\n\r\n" + b"b" * size)
    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_bad_client_does_not_disturb_a_good_one(served: tuple[Metrics, int]) -> None:
    metrics, port = served
    metrics.health.set_resource(GPU, True, True, "")
    good = await connect(port)
    async with good.stream:
        assert (await good.request("GET", "/healthz"))[0] == 200
        # A client stuck halfway through its headers, and one sending garbage, meanwhile.
        async with await trio.open_tcp_stream("127.0.0.1", port) as stuck:
            await stuck.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(raw, port, b"\x00\x01\x02 GARBAGE\r\n\r\n")
                for _ in range(3):
                    assert (await good.request("GET", "/healthz"))[0] == 200
            assert (await good.request("GET", "/metrics"))[0] == 200
            # The stuck client can still finish its request.
            await stuck.send_all(b"\r\n")
            with trio.fail_after(2):
                assert (await stuck.receive_some(65536)).startswith(b"HTTP/1.1 200 ")


async def test_client_that_goes_away_mid_request_is_harmless(
    served: tuple[Metrics, int],
) -> None:
    _, port = served
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /metrics HTT")
    assert (await get(port, "/metrics"))[0] == 200


async def test_idle_connection_is_closed(nursery: trio.Nursery) -> None:
    port = await nursery.start(functools.partial(
        serve_metrics, Metrics(), "127.0.0.1", 0, idle_timeout=0.1))
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        with trio.fail_after(2):
            assert await stream.receive_some(100) == b""
    # Also between keep-alive requests.
    client = await connect(port)
    async with client.stream:
        assert (await client.request("GET", "/healthz"))[0] == 503
        with trio.fail_after(2):
            assert await client.stream.receive_some(100) == b""


# --- parse_address -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9400", ("127.0.0.1", 9400)),
    ("localhost:80", ("localhost", 80)),
    (":9400", ("", 9400)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ("[::1]:9400", ("::1", 9400)),
    ("[::]:1", ("::", 1)),
    ("[fe80::1%eth0]:9400", ("fe80::1%eth0", 9400)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "problem"), [
    ("", "empty"),
    ("9400", "missing ':PORT'"),
    ("localhost", "missing ':PORT'"),
    ("host:", "missing port"),
    ("host:http", "not a number"),
    ("host:+80", "not a number"),
    ("host:٣", "not a number"),
    ("host:0", "out of range"),
    ("host:65536", "out of range"),
    ("::1:9400", "needs brackets"),
    ("[::1:9400", "missing ']'"),
    ("[::1]", "missing ':PORT'"),
    ("[::1]9400", "missing ':PORT'"),
    ("[127.0.0.1]:80", "not an IPv6 address"),
    ("[::1]:", "missing port"),
])
def test_parse_address_names_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_address(text)
