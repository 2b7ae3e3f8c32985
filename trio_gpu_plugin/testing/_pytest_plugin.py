"""pytest fixtures of the test kit, registered through the ``pytest11`` entry point.

Any project that installs trio-gpu-plugin gets them.  ``fake_kubelet`` and ``nvml_node``
are async fixtures: they need pytest-trio (``pip install 'trio-gpu-plugin[testing]'``)
and tests run by it, so set ``trio_mode = true`` in the pytest configuration or mark each
test ``@pytest.mark.trio``:

* ``simulated_node``: a :class:`SimulatedDeviceSource` with the ``dgx-a100`` preset;
* ``nvml_node``: a running :class:`~trio_gpu_plugin.NvmlNode` over a simulated
  ``dgx-a100`` NVML (the production discovery and health code); break its GPUs through
  ``nvml_node.nvml`` (``.xid(3, 79)``, ``.lose(2)``, ``.recover(2)`` ...);
* ``fake_kubelet``: a running :class:`FakeKubelet` in a fresh, short socket directory
  (AF_UNIX paths are limited to 107 bytes, so not under pytest's tmp_path).
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
from collections.abc import AsyncIterator

import pytest
import trio

from .._health import HealthChecks
from .._nvml_sim import PRESETS, SimulatedNVML
from .._nvml_source import NvmlNode
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


@pytest.fixture
async def nvml_node(nursery: trio.Nursery, tmp_path: pathlib.Path) -> NvmlNode:
    """A running NVML node over a simulated ``dgx-a100``; health checks as NVIDIA's
    defaults, a 0.2 s recovery window and probes every 50 ms so tests run fast."""
    nvml = SimulatedNVML(PRESETS["dgx-a100"])
    root = tmp_path / "driver-root"
    nvml.write_driver_root(root)
    node = NvmlNode(nvml, root=root, checks=HealthChecks(), recovery_window=0.2,
                    probe_interval=0.05)
    await nursery.start(node.run)
    return node
