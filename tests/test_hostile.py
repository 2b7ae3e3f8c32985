"""The hostile-input bench (``bench/hostile.py``) cut down to CI size: ~2,000 random and
mutated gRPC frames, protobuf payloads, headers and raw garbage against a real plugin over
its socket; every case classified and answered as the specs say (a malformed header block
resets only its stream, a bad content-type is 415, a bad grpc-timeout 400, ...), none
hangs, the plugin keeps serving, nothing leaks."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "hostile.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_hostile", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hostile = _load()


async def test_hostile_input_fails_alone_and_the_plugin_keeps_serving() -> None:
    report = await hostile.hostile(2000, seed=7, batch=500)
    text = hostile.format_report(report)
    assert report.cases == 2000, text
    assert report.classified == 2000, text  # no hang, no response without grpc-status
    assert not any(o.startswith("FAIL") for o in report.outcomes), text
    assert report.health_checks == 4, text
    # Includes: each case got an outcome it allows, still serving, kubelet still connected.
    assert report.failures == [], text
    assert abs(report.fd_delta) <= hostile.FD_SLACK, text
    assert report.watchers_after == 1, text
    # The mix reached every class of answer.
    for outcome in ("status-OK", "status-INVALID_ARGUMENT", "status-INTERNAL",
                    "status-RESOURCE_EXHAUSTED", "status-UNIMPLEMENTED", "status-DEADLINE_EXCEEDED",
                    "rst-PROTOCOL_ERROR", "http-415/status-INTERNAL", "http-400/status-INTERNAL",
                    "http-405/status-INTERNAL", "closed"):
        assert report.outcomes[outcome] > 0, text
    # Only garbage closes a connection; a malformed request resets its own stream.
    assert all(key.startswith("garbage") for key in report.by_kind if key.endswith(":closed")), text
