"""The plugin as operators run it: health and metrics endpoints scraped over loopback
while a fake kubelet registers it and a GPU throws an XID."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys

import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_gpu_plugin.testing import FakeKubelet

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUARD = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_healthz_readyz_and_metrics_follow_registration_and_an_xid(
        fake_kubelet: FakeKubelet, socket_dir: pathlib.Path) -> None:
    port = free_port()
    control = str(socket_dir / "control.sock")
    env = {k: v for k, v in os.environ.items() if k != "SIMULATE"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_gpu_plugin", "--kubelet-socket", str(fake_kubelet.kubelet_socket),
         "--simulate", "pcie-4", "--simulate-control", control,
         "--metrics-address", f"127.0.0.1:{port}"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    assert process.stderr is not None
    logs = b""

    async def collect() -> None:
        nonlocal logs
        assert process.stderr is not None
        while chunk := await process.stderr.receive_some():
            logs += chunk
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        await scrape_and_break(fake_kubelet, process, port, control)
    await process.stderr.aclose()
    # One line a person can act on for each event: registration, the restart and its
    # trigger, the health transition with its XID and meaning.
    text = logs.decode()
    assert "nvidia.com/gpu: registered with the kubelet as" in text
    assert "nvidia.com/gpu: starting over:" in text and "(the kubelet restarted)" in text
    assert "GPU 1 (GPU-" in text and "is unhealthy: XID 79 (GPU has fallen off the bus)" in text
    assert text.count("is unhealthy") == 1


async def scrape_and_break(fake_kubelet: FakeKubelet, process: trio.Process, port: int,
                           control: str) -> None:
    try:
        await fake_kubelet.wait_registered("nvidia.com/gpu", timeout=GUARD)
        with trio.fail_after(GUARD):
            while (await get(port, "/healthz"))[0] != 200:
                await trio.sleep(0.05)
        assert await get(port, "/readyz") == (200, "ok\n")
        status, body = await get(port, "/metrics")
        assert status == 200
        values = samples(body)
        assert values[("trio_gpu_plugin_devices", (("health", "healthy"), ("resource", "nvidia.com/gpu")))] == 4
        assert values[("trio_gpu_plugin_registrations_total", (("resource", "nvidia.com/gpu"),))] == 1
        await fake_kubelet.admit("nvidia.com/gpu", 1)
        from trio_gpu_plugin._control import send_control

        await send_control(control, {"op": "xid", "gpu": 1, "xid": 79})
        await fake_kubelet.wait_until(lambda: fake_kubelet.resources["nvidia.com/gpu"].allocatable == 3)
        values = samples((await get(port, "/metrics"))[1])
        assert values[("trio_gpu_plugin_devices", (("health", "unhealthy"), ("resource", "nvidia.com/gpu")))] == 1
        assert values[("trio_gpu_plugin_nvml_events_total", (("kind", "xid"), ("xid", "79")))] == 1
        assert values[("trio_gpu_plugin_health_transitions_total", (("to", "unhealthy"),))] == 1
        assert values[("trio_gpu_plugin_rpc_requests_total",
                       (("code", "ok"), ("method", "Allocate"), ("resource", "nvidia.com/gpu")))] == 1
        await fake_kubelet.restart()
        await fake_kubelet.wait_registered("nvidia.com/gpu", count=2, timeout=GUARD)
        with trio.fail_after(GUARD):
            while True:
                values = samples((await get(port, "/metrics"))[1])
                if values.get(("trio_gpu_plugin_kubelet_restarts_total", (("resource", "nvidia.com/gpu"),))):
                    break
                await trio.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(GUARD):
            assert await process.wait() == 0
