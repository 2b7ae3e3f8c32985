"""protobuf and grpcio, compiled from protos/api.proto: the independent peers we test against.

They are test-only: grpcio-tools compiles ``protos/api.proto`` into a temporary directory
once per process, and the generated ``api_pb2``/``api_pb2_grpc`` modules are imported
from there.  ``bench/`` uses this module too.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import pathlib
import shutil
import sys
import tempfile
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos" / "api.proto"


@functools.cache
def load() -> tuple[types.ModuleType, types.ModuleType]:
    """Compile protos/api.proto with grpcio-tools; return (api_pb2, api_pb2_grpc)."""
    from grpc_tools import protoc

    out = pathlib.Path(tempfile.mkdtemp(prefix="tgp-pb2-"))
    atexit.register(shutil.rmtree, out, True)
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO.parent}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--descriptor_set_out={out / 'api.desc'}",
        str(PROTO),
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("api_pb2"), importlib.import_module("api_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def descriptor_set() -> bytes:
    """The FileDescriptorSet protoc produced for protos/api.proto."""
    pb2, _ = load()
    return pathlib.Path(pb2.__file__).with_name("api.desc").read_bytes()
