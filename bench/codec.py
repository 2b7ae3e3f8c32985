"""Our protobuf codec against protobuf's upb backend and its pure-Python backend.

What is measured, per message and operation, as the median time of one operation:

* messages: ``ListAndWatchResponse`` with 8 and with 1,000 devices (ID ``GPU-<36 chars>``,
  health ``Healthy``, a topology with one NUMA node ``i % 2``), and an ``AllocateResponse``
  with 8 ``ContainerAllocateResponse`` (4 envs, 2 mounts, 3 device specs, 2 annotations,
  2 CDI devices each);
* ``build+encode``: construct the message objects from plain Python data (tuples, dicts),
  then ``SerializeToString()``.  Ours uses its dataclass constructors; protobuf uses the
  idiomatic fast path, ``repeated.add(...)`` and ``map.update(...)`` on a fresh message
  (two to three times faster on upb than passing nested messages to constructors, which
  copies them);
* ``decode+read``: ``FromString(bytes)``, then read every field of every (sub)message
  (lengths of strings, integers, booleans summed into a checksum).  The reading code is
  the same function for all three: our attribute names are protobuf's, so protobuf reads
  through its generated accessors and ours through plain attributes.

Who runs where:

* the main process runs ours and protobuf/upb (it checks that
  ``api_implementation.Type() == "upb"``), one timing sample of each in turn, the order
  alternating between rounds, so both see the same machine noise;
* a worker subprocess, started with ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``
  (it checks ``Type() == "python"``), runs protobuf's pure-Python backend interleaved
  with ours in the same way.  The ``pure-py/ours`` speedup comes from that pairing, so it
  too compares two implementations timed side by side in one process.

Before anything is timed, every implementation's output of the exact functions being
timed is checked against the others: each one decodes every other one's bytes to a
message equal to its own, and the decode+read checksums of all three agree with one
computed from the plain data.  Nothing wrong is ever timed.

How to read it: ``ours/upb`` below 1 means ours is faster than upb; ``pure-py/ours``
is how many times faster ours is than the pure-Python backend.  Each time is the
median over ``--rounds`` samples, each sample a loop long enough (``--min-sample-ms``)
for the clock to be precise; each ratio is the median of the per-round ratios (the
samples of one round run back to back, so slow drift of a noisy machine cancels out);
the garbage collector stays on while timing, as in
production (``--no-gc`` turns it off), and is run before each block.  The targets at
the end are printed as PASS/FAIL; the exit status is 0 either way unless ``--check``.

Run from the repository root:  PYTHONPATH=. python bench/codec.py [--quick] [--check]
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKER_FLAG = "--worker"
ENV_KEY = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"

# --- plain data --------------------------------------------------------------------------


def devices_data(n: int) -> list[tuple[str, str, int]]:
    # "GPU-" + a 36-character UUID-shaped string, as nvidia-smi prints them.
    return [
        (f"GPU-{i:08x}-{(i * 7919) & 0xFFFF:04x}-4a2b-9c3d-{(i * 104729) & 0xFFFFFFFFFFFF:012x}",
         "Healthy", i % 2)
        for i in range(n)
    ]


def allocate_data(n: int) -> list[dict[str, Any]]:
    containers = []
    for c in range(n):
        uuids = f"GPU-{c:08x}-1111-4a2b-9c3d-0123456789ab"
        containers.append({
            "envs": {
                "NVIDIA_VISIBLE_DEVICES": uuids,
                "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
                "NVIDIA_REQUIRE_CUDA": "cuda>=12.0",
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            },
            "mounts": [
                ("/usr/bin/nvidia-smi", "/usr/bin/nvidia-smi", True),
                (f"/run/nvidia/container-{c}", f"/var/run/nvidia/container-{c}", False),
            ],
            "devices": [
                ("/dev/nvidia0", "/dev/nvidia0", "rw"),
                ("/dev/nvidiactl", "/dev/nvidiactl", "rw"),
                ("/dev/nvidia-uvm", "/dev/nvidia-uvm", "rw"),
            ],
            "annotations": {
                "cdi.k8s.io/nvidia-device-plugin": f"nvidia.com/gpu={uuids}",
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            },
            "cdi": [f"nvidia.com/gpu={uuids}", "nvidia.com/gpu=all"],
        })
    return containers


def expected_devices(data: list[tuple[str, str, int]]) -> int:
    return sum(len(i) + len(h) + n for i, h, n in data)


def expected_allocate(data: list[dict[str, Any]]) -> int:
    total = 0
    for c in data:
        total += sum(len(k) + len(v) for k, v in c["envs"].items())
        total += sum(len(cp) + len(hp) + ro for cp, hp, ro in c["mounts"])
        total += sum(len(cp) + len(hp) + len(p) for cp, hp, p in c["devices"])
        total += sum(len(k) + len(v) for k, v in c["annotations"].items())
        total += sum(len(n) for n in c["cdi"])
    return total


CASES: list[tuple[str, str, Any]] = [
    ("ListAndWatch 8 dev", "law", devices_data(8)),
    ("ListAndWatch 1000 dev", "law", devices_data(1000)),
    ("Allocate 8 ctr", "alloc", allocate_data(8)),
]
TARGET_CASE = "ListAndWatch 1000 dev"
OPS = ("build+encode", "decode+read")


# --- reading (shared: same attribute names in ours and protobuf) ---------------------------


def read_devices(m: Any) -> int:
    total = 0
    for d in m.devices:
        total += len(d.ID) + len(d.health)
        for node in d.topology.nodes:
            total += node.ID
    return total


def read_allocate(m: Any) -> int:
    total = 0
    for c in m.container_responses:
        for k, v in c.envs.items():
            total += len(k) + len(v)
        for mount in c.mounts:
            total += len(mount.container_path) + len(mount.host_path) + mount.read_only
        for dev in c.devices:
            total += len(dev.container_path) + len(dev.host_path) + len(dev.permissions)
        for k, v in c.annotations.items():
            total += len(k) + len(v)
        for cdi in c.cdi_devices:
            total += len(cdi.name)
    return total


# --- implementations ---------------------------------------------------------------------


class Impl:
    """build+encode and decode+read for one implementation, per message kind."""

    name: str
    classes: dict[str, Any]  # kind -> top-level message class

    def build(self, kind: str, data: Any) -> bytes:
        raise NotImplementedError

    def decode_read(self, kind: str, payload: bytes) -> int:
        cls = self.classes[kind]
        reader = read_devices if kind == "law" else read_allocate
        return reader(cls.FromString(payload))

    def parse(self, kind: str, payload: bytes) -> Any:
        return self.classes[kind].FromString(payload)

    def fns(self, kind: str, data: Any, payload: bytes) -> dict[str, Callable[[], object]]:
        """Zero-argument callables, one per operation: exactly what gets timed."""
        build, decode_read = self.build, self.decode_read
        return {
            "build+encode": lambda: build(kind, data),
            "decode+read": lambda: decode_read(kind, payload),
        }


class Ours(Impl):
    name = "ours"

    def __init__(self) -> None:
        from trio_gpu_plugin.proto import v1beta1

        self.v = v1beta1
        self.classes = {"law": v1beta1.ListAndWatchResponse, "alloc": v1beta1.AllocateResponse}

    def build(self, kind: str, data: Any) -> bytes:
        v = self.v
        if kind == "law":
            Device, TopologyInfo, NUMANode = v.Device, v.TopologyInfo, v.NUMANode
            law: bytes = v.ListAndWatchResponse(devices=[
                Device(ID=i, health=h, topology=TopologyInfo(nodes=[NUMANode(ID=n)]))
                for i, h, n in data
            ]).SerializeToString()
            return law
        Mount, DeviceSpec, CDIDevice = v.Mount, v.DeviceSpec, v.CDIDevice
        alloc: bytes = v.AllocateResponse(container_responses=[
            v.ContainerAllocateResponse(
                envs=dict(c["envs"]),
                mounts=[Mount(container_path=cp, host_path=hp, read_only=ro)
                        for cp, hp, ro in c["mounts"]],
                devices=[DeviceSpec(container_path=cp, host_path=hp, permissions=p)
                         for cp, hp, p in c["devices"]],
                annotations=dict(c["annotations"]),
                cdi_devices=[CDIDevice(name=n) for n in c["cdi"]],
            )
            for c in data
        ]).SerializeToString()
        return alloc


class Protobuf(Impl):
    def __init__(self) -> None:
        from google.protobuf.internal import api_implementation

        from tests import peers

        self.name = api_implementation.Type()
        self.pb2, _ = peers.load()
        self.classes = {"law": self.pb2.ListAndWatchResponse, "alloc": self.pb2.AllocateResponse}

    def build(self, kind: str, data: Any) -> bytes:
        pb2 = self.pb2
        if kind == "law":
            m = pb2.ListAndWatchResponse()
            add = m.devices.add
            for i, h, n in data:
                add(ID=i, health=h).topology.nodes.add(ID=n)
            law: bytes = m.SerializeToString()
            return law
        m = pb2.AllocateResponse()
        add = m.container_responses.add
        for c in data:
            r = add()
            r.envs.update(c["envs"])
            mount = r.mounts.add
            for cp, hp, ro in c["mounts"]:
                mount(container_path=cp, host_path=hp, read_only=ro)
            dev = r.devices.add
            for cp, hp, p in c["devices"]:
                dev(container_path=cp, host_path=hp, permissions=p)
            r.annotations.update(c["annotations"])
            cdi = r.cdi_devices.add
            for n in c["cdi"]:
                cdi(name=n)
        alloc: bytes = m.SerializeToString()
        return alloc


# --- verification ------------------------------------------------------------------------


class Mismatch(AssertionError):
    pass


def expected(kind: str, data: Any) -> int:
    return expected_devices(data) if kind == "law" else expected_allocate(data)


def verify(impls: list[Impl], kind: str, data: Any, foreign: dict[str, bytes]) -> dict[str, bytes]:
    """Check that every implementation decodes every other one's bytes to equal content.

    ``foreign`` holds bytes made by implementations that live in another process.
    Returns the bytes each local implementation's timed build+encode produced.
    """
    produced: dict[str, bytes] = {}
    for impl in impls:
        payload = impl.fns(kind, data, b"")["build+encode"]()
        assert isinstance(payload, bytes)
        produced[impl.name] = payload
    everything = {**foreign, **produced}
    want = expected(kind, data)
    for impl in impls:
        own = impl.parse(kind, produced[impl.name])
        for maker, payload in everything.items():
            if impl.parse(kind, payload) != own:
                raise Mismatch(f"{impl.name} decodes {maker}'s bytes to different content")
            got = impl.fns(kind, data, payload)["decode+read"]()
            if got != want:
                raise Mismatch(f"{impl.name} decode+read of {maker}'s bytes: checksum {got}, "
                               f"expected {want}")
    return produced


# --- timing ------------------------------------------------------------------------------


def calibrate(fn: Callable[[], object], min_sample_s: float) -> int:
    """Warm up ``fn`` and return the loop count that makes one sample >= min_sample_s."""
    fn()
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_sample_s / 4:
            return max(1, math.ceil(number * min_sample_s / elapsed))
        number *= 4


def sample(fn: Callable[[], object], number: int, gc_off: bool) -> float:
    if gc_off:
        gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number
    finally:
        if gc_off:
            gc.enable()


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, min_sample_s: float,
                     gc_off: bool) -> dict[str, list[float]]:
    """Seconds per call of each fn, per round; one sample of each per round, order alternating."""
    gc.collect()
    numbers = {name: calibrate(fn, min_sample_s) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append(sample(fns[name], numbers[name], gc_off))
    gc.collect()
    return times


def run_all(impls: list[Impl], payloads: dict[str, bytes], args: argparse.Namespace,
            ) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{case: {op: {impl name: [seconds per call, one per round]}}}."""
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for case, kind, data in CASES:
        results[case] = {}
        for op in OPS:
            fns = {impl.name: impl.fns(kind, data, payloads[case])[op] for impl in impls}
            results[case][op] = time_interleaved(fns, args.rounds, args.min_sample_ms / 1000,
                                                 args.no_gc)
    return results


# --- worker (pure-Python backend) -------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    from google.protobuf.internal import api_implementation

    kind_name = api_implementation.Type()
    if kind_name != "python":
        raise SystemExit(f"worker: protobuf backend is {kind_name!r}, expected 'python'")
    request = json.load(sys.stdin)
    impls: list[Impl] = [Ours(), Protobuf()]
    own_bytes: dict[str, str] = {}
    payloads: dict[str, bytes] = {}
    for case, kind, data in CASES:
        foreign = {name: base64.b64decode(b) for name, b in request["bytes"][case].items()}
        produced = verify(impls, kind, data, foreign)
        own_bytes[case] = base64.b64encode(produced["python"]).decode()
        payloads[case] = produced["ours"]
    results = run_all(impls, payloads, args)
    json.dump({"type": kind_name, "pid": os.getpid(), "bytes": own_bytes, "results": results},
              sys.stdout)


def run_worker(args: argparse.Namespace, local_bytes: dict[str, dict[str, bytes]]) -> Any:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), WORKER_FLAG,
           "--rounds", str(args.rounds), "--min-sample-ms", str(args.min_sample_ms)]
    if args.no_gc:
        cmd.append("--no-gc")
    env = {**os.environ, ENV_KEY: "python",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    request = {"bytes": {case: {name: base64.b64encode(b).decode() for name, b in per.items()}
                         for case, per in local_bytes.items()}}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            cwd=ROOT, text=True)
    try:
        out, _ = proc.communicate(json.dumps(request), timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"pure-Python worker failed (exit {proc.returncode})")
    return json.loads(out)


# --- report ------------------------------------------------------------------------------


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-round ratios: robust to drift that spans several rounds."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.3f} ms"
    return f"{seconds * 1e6:8.2f} µs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="few, short samples: a smoke run (figures are rough)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target FAILs")
    parser.add_argument("--rounds", type=int, default=None,
                        help="samples per implementation and operation (default 41, quick 5)")
    parser.add_argument("--min-sample-ms", type=float, default=None,
                        help="minimum duration of one sample (default 10, quick 5)")
    parser.add_argument("--no-gc", action="store_true",
                        help="disable the garbage collector inside timed loops")
    parser.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 5 if args.quick else 41
    if args.min_sample_ms is None:
        args.min_sample_ms = 5.0 if args.quick else 10.0

    if args.worker:
        worker(args)
        return 0

    if os.environ.get(ENV_KEY, "upb") != "upb":
        print(f"unset {ENV_KEY} (it is {os.environ[ENV_KEY]!r}): the main process must use upb",
              file=sys.stderr)
        return 2
    import google.protobuf
    from google.protobuf.internal import api_implementation

    if api_implementation.Type() != "upb":
        print(f"protobuf backend is {api_implementation.Type()!r}, expected 'upb'",
              file=sys.stderr)
        return 2

    started = time.perf_counter()
    print(f"# {platform.platform()} / {platform.python_implementation()} "
          f"{platform.python_version()} / {os.cpu_count()} CPUs / protobuf "
          f"{google.protobuf.__version__}")
    print(f"# {args.rounds} rounds x >= {args.min_sample_ms:g} ms per sample, "
          f"gc {'off' if args.no_gc else 'on'} while timing; medians of one operation")

    impls: list[Impl] = [Ours(), Protobuf()]
    assert impls[1].name == "upb"
    local_bytes: dict[str, dict[str, bytes]] = {}
    for case, kind, data in CASES:
        local_bytes[case] = verify(impls, kind, data, {})
    # The worker checks ours' and upb's bytes; we check the pure-Python backend's after.
    main_results = run_all(impls, {c: b["ours"] for c, b in local_bytes.items()}, args)
    gc.collect()
    worker_out = run_worker(args, local_bytes)
    assert worker_out["type"] == "python"
    for case, kind, data in CASES:
        verify(impls, kind, data, {"python": base64.b64decode(worker_out["bytes"][case])})
    differ = [
        case for case, _, _ in CASES
        if len({*local_bytes[case].values(), base64.b64decode(worker_out["bytes"][case])}) > 1
    ]
    print(f"# verified: ours, upb and pure-Python (worker pid {worker_out['pid']}, "
          f"api_implementation.Type() == 'python') each decode the others' bytes to equal "
          f"content and read the expected checksum")
    print("# bytes identical across the three" + (
        f" except {', '.join(differ)} (map entries in another order; upb writes maps in "
        f"hash order)" if differ else ""))
    print()

    header = (f"{'case':<22} {'op':<13} {'ours':>11} {'upb':>11} {'pure-py':>11} "
              f"{'ours/upb':>9} {'pure-py/ours':>13} {'(ours in worker)':>17}")
    print(header)
    print("-" * len(header))
    ratios: dict[tuple[str, str], tuple[float, float]] = {}
    for case, _, data in CASES:
        for op in OPS:
            m = main_results[case][op]
            w = worker_out["results"][case][op]
            vs_upb = paired_ratio(m["ours"], m["upb"])
            speedup = paired_ratio(w["python"], w["ours"])
            ratios[case, op] = (vs_upb, speedup)
            med = statistics.median
            print(f"{case:<22} {op:<13} {fmt_time(med(m['ours']))} {fmt_time(med(m['upb']))} "
                  f"{fmt_time(med(w['python']))} {vs_upb:8.2f}x {speedup:12.1f}x "
                  f"{fmt_time(med(w['ours'])):>17}")
    print()
    print("Times: medians.  Ratios: medians of per-round ratios (the two samples of a round "
          "run back to back).\nours/upb < 1 means ours is faster.  pure-py/ours: how many "
          "times ours is faster than protobuf's pure-Python backend, both timed in the worker.")
    print()

    print("targets:")
    failed = False
    for op in OPS:
        vs_upb, speedup = ratios[TARGET_CASE, op]
        ok = vs_upb <= 1.5
        failed |= not ok
        print(f"  {TARGET_CASE} {op:<13} ours <= 1.5x upb time:         "
              f"{vs_upb:6.2f}x  {'PASS' if ok else 'FAIL'}")
    for op in OPS:
        vs_upb, speedup = ratios[TARGET_CASE, op]
        ok = speedup >= 10
        failed |= not ok
        print(f"  {TARGET_CASE} {op:<13} ours >= 10x faster than pure-py: "
              f"{speedup:6.1f}x  {'PASS' if ok else 'FAIL'}")
    print("  (for information, pure-py/ours elsewhere: "
          + ", ".join(f"{case} {op} {ratios[case, op][1]:.1f}x"
                      for case, _, _ in CASES for op in OPS if case != TARGET_CASE) + ")")
    print(f"# total {time.perf_counter() - started:.1f} s")
    return 1 if (failed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
