"""pytest fixtures of the test kit, registered through the ``pytest11`` entry point.

Any project that installs trio-gpu-plugin gets them (async fixtures need pytest-trio):

* ``simulated_node``: a :class:`SimulatedDeviceSource` with the ``dgx-a100`` preset;
* ``fake_kubelet``: a running :class:`FakeKubelet` in a fresh, short socket directory
  (AF_UNIX paths are limited to 107 bytes, so not under pytest's tmp_path).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator

import pytest
import trio

from .._simulated import SimulatedDeviceSource
from ._fake_kubelet import FakeKubelet


@pytest.fixture
def simulated_node() -> SimulatedDeviceSource:
    """A simulated 8-GPU node (``dgx-a100``: two NUMA nodes of four GPUs)."""
    return SimulatedDeviceSource.preset("dgx-a100")


@pytest.fixture
async def fake_kubelet(nursery: trio.Nursery) -> AsyncIterator[FakeKubelet]:
    """A fake kubelet serving ``kubelet.sock`` in a temporary directory."""
    directory = tempfile.mkdtemp(prefix="tgp-kubelet-", dir="/tmp")
    try:
        kubelet = FakeKubelet(directory)
        await nursery.start(kubelet.run)
        yield kubelet
    finally:
        shutil.rmtree(directory, ignore_errors=True)
