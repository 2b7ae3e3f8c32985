"""Test kit for device-plugin tests: a fake kubelet that behaves like the real one, and a
simulated GPU node.

:class:`FakeKubelet` serves ``kubelet.sock``, dials plugins back, keeps their
ListAndWatch streams, and plays admission and container start with the kubelet's exact
error texts; see ``trio_gpu_plugin/testing/_fake_kubelet.py`` for the rules it follows.
:class:`SimulatedDeviceSource` is a device source with health changes on demand.
The pytest fixtures ``fake_kubelet`` and ``simulated_node`` come with the package (a
``pytest11`` entry point).  The plugin runtime never imports this package (the demo does).
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
from .._simulated import (
    PRESETS as PRESETS,
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
    "SimulatedDeviceSource",
    "SimulatedGPU",
    "StreamEnd",
]
