"""protobuf and grpcio, compiled from protos/api.proto: the independent peers we test against.

They are test-only: grpcio-tools compiles ``protos/api.proto`` into a directory under the
system's temporary directory, named for a hash of the .proto and of the tool versions, so
every process (test workers, the clients tests start and kill, ``bench/``) shares one
compilation and nothing is left behind per process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import pathlib
import shutil
import sys
import tempfile
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos" / "api.proto"


def _compiled_dir() -> pathlib.Path:
    import google.protobuf
    import grpc_tools

    key = hashlib.sha256()
    key.update(PROTO.read_bytes())
    key.update(google.protobuf.__version__.encode())
    key.update(getattr(grpc_tools, "__version__", "").encode())
    key.update(pathlib.Path(grpc_tools.__file__).parent.name.encode())
    return pathlib.Path(tempfile.gettempdir()) / f"tgp-pb2-{key.hexdigest()[:16]}"


def _compile(out: pathlib.Path) -> None:
    from grpc_tools import protoc

    staging = pathlib.Path(tempfile.mkdtemp(prefix=out.name + "-", dir=out.parent))
    try:
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"--python_out={staging}",
            f"--grpc_python_out={staging}",
            f"--descriptor_set_out={staging / 'api.desc'}",
            str(PROTO),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
        try:
            os.rename(staging, out)  # atomic: concurrent compilers race harmlessly
        except OSError:
            if not (out / "api.desc").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@functools.cache
def load() -> tuple[types.ModuleType, types.ModuleType]:
    """Compile protos/api.proto with grpcio-tools; return (api_pb2, api_pb2_grpc)."""
    out = _compiled_dir()
    if not (out / "api.desc").exists():
        _compile(out)
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("api_pb2"), importlib.import_module("api_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def descriptor_set() -> bytes:
    """The FileDescriptorSet protoc produced for protos/api.proto."""
    pb2, _ = load()
    return pathlib.Path(pb2.__file__).with_name("api.desc").read_bytes()
