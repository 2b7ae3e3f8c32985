"""Shared fixtures: protobuf/grpcio peers generated from protos/api.proto at test time."""

from __future__ import annotations

import pathlib
import types

import pytest

from tests import peers


@pytest.fixture(scope="session")
def pb2() -> types.ModuleType:
    """protobuf's generated classes for protos/api.proto (module ``api_pb2``)."""
    return peers.load()[0]


@pytest.fixture(scope="session")
def pb2_grpc() -> types.ModuleType:
    """grpcio's generated stubs and servicers for protos/api.proto (``api_pb2_grpc``)."""
    return peers.load()[1]


@pytest.fixture
def socket_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A short directory for Unix sockets (sun_path holds 107 bytes; pytest's tmp_path can
    be longer than that)."""
    import tempfile

    path = pathlib.Path(tempfile.mkdtemp(prefix="tgp-", dir="/tmp"))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)
