"""Round-trip latency of one Allocate call: our trio server against a grpcio server.

What is measured: a grpcio client in its own process (``grpc.insecure_channel`` on a
Unix socket, ``api_pb2_grpc.DevicePluginStub``) makes ``--warmup`` Allocate calls that
are not timed, then ``--calls`` timed ones, one after the other, each timed with
``time.perf_counter_ns`` around the blocking stub call; it prints the latencies as JSON.
The request holds one container with two device IDs (what the kubelet sends); the
answer is one ContainerAllocateResponse with three envs and three device specs, built
from the request by the same logic on both servers:

* ours: ``serve_unix`` in this process, under ``trio.run``, with an ``async`` handler
  building ``trio_gpu_plugin.proto.v1beta1`` messages;
* grpcio: ``grpc.server`` with a ``ThreadPoolExecutor`` in a separate process on another
  Unix socket, with the same handler written against the protoc-generated ``api_pb2``.

So each figure is client encode + HTTP/2 + socket + server decode, handler, encode +
socket + client decode, with the same client code for both servers: the difference
between the two rows is the server.  Rounds alternate (ours, grpcio, ours, grpcio with
the default ``--rounds 2``), each with a fresh client process and connection, so slow
drift of a noisy machine hits both.  Before the timed rounds, the first answer of each
server is checked to decode to the same message, so both do the same work.

How to read it: p50/p90/p99 are percentiles of all timed calls of one server pooled over
its rounds (nearest rank); ``ours/grpcio`` below 1 means our server answers faster.  The
per-round p50 column shows how much the machine drifted.  ``server CPU`` is the
user+system CPU time the server process spent per call (all threads, from /proc), the
clearest measure of the servers' own cost; ``client CPU`` the same for the client.
Timings depend on the machine (print line on top); compare the ratios, not the absolute
figures, across machines.

Run from the repository root:  PYTHONPATH=. python bench/rpc.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

import trio

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trio_gpu_plugin import Service, serve_unix  # noqa: E402
from trio_gpu_plugin.proto import v1beta1  # noqa: E402

DEVICE_IDS = [
    "GPU-6b5ac1d2-7c91-4a2b-9c3d-0123456789ab",
    "GPU-0f3e2d1c-5b4a-4a2b-9c3d-ba9876543210",
]
MAX_UNIX_PATH = 107

# The timed client: argv = socket path, warm-up calls, timed calls, device IDs (JSON).
CLIENT = textwrap.dedent("""
    import gc, json, sys, time, grpc
    from tests import peers
    pb2, pb2_grpc = peers.load()
    path, warmup, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    request = pb2.AllocateRequest(container_requests=[
        pb2.ContainerAllocateRequest(devices_ids=json.loads(sys.argv[4]))])
    with grpc.insecure_channel("unix://" + path) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = pb2_grpc.DevicePluginStub(channel)
        first = stub.Allocate(request, timeout=10)
        for _ in range(warmup):
            stub.Allocate(request, timeout=10)
        gc.collect()
        clock = time.perf_counter_ns
        latencies = []
        cpu0 = time.process_time()
        for _ in range(calls):
            t0 = clock()
            stub.Allocate(request, timeout=10)
            latencies.append(clock() - t0)
        cpu = time.process_time() - cpu0
    json.dump({"first": first.SerializeToString().hex(), "latencies_ns": latencies,
               "client_cpu_s": cpu}, sys.stdout)
""")

# The grpcio server: argv = socket path; prints "ready", serves until stdin closes.
GRPC_SERVER = textwrap.dedent("""
    import sys, concurrent.futures, grpc
    from tests import peers
    pb2, pb2_grpc = peers.load()

    class DevicePlugin(pb2_grpc.DevicePluginServicer):
        def Allocate(self, request, context):
            response = pb2.AllocateResponse()
            for container in request.container_requests:
                ids = list(container.devices_ids)
                answer = response.container_responses.add()
                answer.envs["NVIDIA_VISIBLE_DEVICES"] = ",".join(ids)
                answer.envs["NVIDIA_DRIVER_CAPABILITIES"] = "compute,utility"
                answer.envs["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
                for k in range(len(ids)):
                    node = f"/dev/nvidia{k}"
                    answer.devices.add(container_path=node, host_path=node, permissions="rw")
                answer.devices.add(container_path="/dev/nvidiactl", host_path="/dev/nvidiactl",
                                   permissions="rw")
            return response

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    pb2_grpc.add_DevicePluginServicer_to_server(DevicePlugin(), server)
    if server.add_insecure_port("unix:" + sys.argv[1]) == 0:
        sys.exit("cannot bind " + sys.argv[1])
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop(0)
""")


class Counter:
    """Our Allocate handler; counts calls so each round can be checked against the client."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: v1beta1.AllocateRequest) -> v1beta1.AllocateResponse:
        self.calls += 1
        answers = []
        for container in request.container_requests:
            ids = container.devices_ids
            devices = [
                v1beta1.DeviceSpec(container_path=f"/dev/nvidia{k}", host_path=f"/dev/nvidia{k}",
                                   permissions="rw")
                for k in range(len(ids))
            ]
            devices.append(v1beta1.DeviceSpec(container_path="/dev/nvidiactl",
                                              host_path="/dev/nvidiactl", permissions="rw"))
            answers.append(v1beta1.ContainerAllocateResponse(
                envs={
                    "NVIDIA_VISIBLE_DEVICES": ",".join(ids),
                    "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
                    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                },
                devices=devices,
            ))
        return v1beta1.AllocateResponse(container_responses=answers)


class LogCount(logging.Handler):
    """Counts warnings and errors our server logs (and still prints them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.levelname}: {record.getMessage()}")


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


async def run_client(path: str, warmup: int, calls: int) -> dict[str, Any]:
    with trio.fail_after(600):
        proc = await trio.run_process(
            [sys.executable, "-c", CLIENT, path, str(warmup), str(calls), json.dumps(DEVICE_IDS)],
            cwd=ROOT, env=child_env(), capture_stdout=True, capture_stderr=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"client against {path} failed (exit {proc.returncode}):\n"
                           + proc.stderr.decode(errors="replace")[-4000:])
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


async def expected_response() -> v1beta1.AllocateResponse:
    request = v1beta1.AllocateRequest(
        container_requests=[v1beta1.ContainerAllocateRequest(devices_ids=list(DEVICE_IDS))])
    return await Counter()(request)


async def bench(args: argparse.Namespace, sock_dir: str) -> dict[str, list[dict[str, Any]]]:
    paths = {"ours": os.path.join(sock_dir, "ours.sock"),
             "grpcio": os.path.join(sock_dir, "grpc.sock")}
    for path in paths.values():
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise SystemExit(f"socket path too long: {path}")
    handler = Counter()
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "grpcio": []}
    server = subprocess.Popen([sys.executable, "-c", GRPC_SERVER, paths["grpcio"]], cwd=ROOT,
                              env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        with trio.fail_after(60):
            line = await trio.to_thread.run_sync(server.stdout.readline)
        if line.strip() != b"ready":
            raise RuntimeError(f"grpcio server did not start (exit {server.poll()})")
        async with trio.open_nursery() as nursery:
            await nursery.start(
                serve_unix, paths["ours"],
                [Service(v1beta1.DEVICE_PLUGIN, {"Allocate": handler})])
            want = await expected_response()
            for r in range(args.rounds):
                for name in ("ours", "grpcio"):
                    before = handler.calls
                    server_pid = os.getpid() if name == "ours" else server.pid
                    cpu_before = cpu_seconds(server_pid)
                    result = await run_client(paths[name], args.warmup, args.calls)
                    result["server_cpu_s"] = cpu_seconds(server_pid) - cpu_before
                    first = v1beta1.AllocateResponse.FromString(bytes.fromhex(result["first"]))
                    if first != want:
                        raise RuntimeError(f"{name} answered {first!r}, expected {want!r}")
                    if name == "ours" and handler.calls - before != 1 + args.warmup + args.calls:
                        raise RuntimeError(f"our handler ran {handler.calls - before} times, "
                                           f"expected {1 + args.warmup + args.calls}")
                    results[name].append(result)
                    p50 = statistics.median(result["latencies_ns"]) / 1000
                    print(f"  round {r + 1} {name:<7} p50 {p50:8.1f} µs", flush=True)
            nursery.cancel_scope.cancel()
    finally:
        # Closing its stdin stops the grpcio server cleanly; kill it if it lingers.
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few calls: a smoke run")
    parser.add_argument("--calls", type=int, default=None,
                        help="timed calls per round (default 2000, quick 200)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first (default 200, quick 20)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per server, alternating ours/grpcio (default 2)")
    args = parser.parse_args()
    if args.calls is None:
        args.calls = 200 if args.quick else 2000
    if args.warmup is None:
        args.warmup = 20 if args.quick else 200

    import google.protobuf
    import grpc
    from google.protobuf.internal import api_implementation

    print(f"# {platform.platform()} / {cpu_model()} / {os.cpu_count()} CPUs / "
          f"{platform.python_implementation()} {platform.python_version()}")
    print(f"# trio {trio.__version__}, grpcio {grpc.__version__}, protobuf "
          f"{google.protobuf.__version__} ({api_implementation.Type()}) in the client and "
          f"grpcio server")
    print(f"# Allocate, 1 container x {len(DEVICE_IDS)} device IDs; {args.rounds} rounds per "
          f"server x {args.calls} timed calls after {args.warmup} warm-up calls, one client "
          f"process per round")

    log_count = LogCount()
    logging.getLogger("trio_gpu_plugin").addHandler(log_count)
    logging.basicConfig(level=logging.WARNING, format="server log: %(levelname)s %(message)s")
    sock_dir = tempfile.mkdtemp(prefix="tgp-rpc-", dir="/tmp")
    try:
        results = trio.run(bench, args, sock_dir)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)

    print()
    stats: dict[str, dict[str, float]] = {}
    header = (f"{'server':<8} {'calls':>6} {'p50':>10} {'p90':>10} {'p99':>10} {'max':>10}"
              f" {'server CPU':>11} {'client CPU':>11}   per-round p50")
    print(header)
    print("-" * len(header))
    served = 1 + args.warmup + args.calls
    for name, rounds in results.items():
        pooled = sorted(x / 1000 for r in rounds for x in r["latencies_ns"])
        stats[name] = {p: percentile(pooled, q) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
        stats[name]["server CPU"] = (
            sum(r["server_cpu_s"] for r in rounds) / (served * len(rounds)) * 1e6)
        stats[name]["client CPU"] = (
            sum(r["client_cpu_s"] for r in rounds) / (args.calls * len(rounds)) * 1e6)
        per_round = ", ".join(f"{statistics.median(r['latencies_ns']) / 1000:.1f}" for r in rounds)
        print(f"{name:<8} {len(pooled):>6} " + " ".join(
            f"{stats[name][p]:7.1f} µs" for p in ("p50", "p90", "p99"))
              + f" {pooled[-1]:7.1f} µs {stats[name]['server CPU']:8.1f} µs "
              f"{stats[name]['client CPU']:8.1f} µs   {per_round} µs")
    print("(latencies: client-side round trips; CPU: user+system time per call of the server "
          "process, all threads, warm-up included, and of the client process over its timed "
          "calls; /proc tick resolution)")
    print()
    print("ours/grpcio: " + "   ".join(
        f"{p} {stats['ours'][p] / stats['grpcio'][p]:.2f}x"
        for p in ("p50", "p90", "p99", "server CPU"))
          + "   (< 1: ours is faster / cheaper)")
    print(f"our server logged {len(log_count.records)} warnings/errors"
          + ("" if not log_count.records else ":\n  " + "\n  ".join(log_count.records[:10])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
