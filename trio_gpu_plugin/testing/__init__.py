"""Test kit for device-plugin tests: a fake kubelet that behaves like the real one, and
simulated GPU nodes.

:class:`FakeKubelet` serves ``kubelet.sock``, dials plugins back, keeps their
ListAndWatch streams, and plays admission and container start with the kubelet's exact
error texts; see ``trio_gpu_plugin/testing/_fake_kubelet.py`` for the rules it follows.
:data:`PRESETS` is the one registry of named simulated nodes, the one ``--simulate``
takes (``SimNodeSpec`` by name, for :class:`SimulatedNVML`).
:class:`SimulatedDeviceSource` is a device source with health changes on demand.
The pytest fixtures ``fake_kubelet``, ``simulated_node`` and ``nvml_node`` come with the
package (a ``pytest11`` entry point); they are async, so they need pytest-trio (the
``testing`` extra) and trio mode (``trio_mode = true``) or the ``@pytest.mark.trio``
mark.  The plugin runtime never imports this package (the demo does).
"""

from ._fake_kubelet import (
    Admission as Admission,
    AdmissionError as AdmissionError,
    FakeKubelet as FakeKubelet,
    PreStartError as PreStartError,
    RegistrationRecord as RegistrationRecord,
    ResourceState as ResourceState,
    StreamEnd as StreamEnd,
)
from .._nvml_sim import (
    PRESETS as PRESETS,
    SimGpuSpec as SimGpuSpec,
    SimNodeSpec as SimNodeSpec,
    SimulatedNVML as SimulatedNVML,
)
from .._simulated import (
    SimulatedDeviceSource as SimulatedDeviceSource,
    SimulatedGPU as SimulatedGPU,
)

__all__ = [
    "Admission",
    "AdmissionError",
    "FakeKubelet",
    "PRESETS",
    "PreStartError",
    "RegistrationRecord",
    "ResourceState",
    "SimGpuSpec",
    "SimNodeSpec",
    "SimulatedDeviceSource",
    "SimulatedGPU",
    "SimulatedNVML",
    "StreamEnd",
]
