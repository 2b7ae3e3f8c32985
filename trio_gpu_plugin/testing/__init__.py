"""Test kit for device-plugin tests: a fake kubelet that behaves like the real one.

:class:`FakeKubelet` serves ``kubelet.sock``, dials plugins back, keeps their
ListAndWatch streams, and plays admission and container start with the kubelet's exact
error texts; see ``trio_gpu_plugin/testing/_fake_kubelet.py`` for the rules it follows.
Nothing in the plugin itself imports this package.
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

__all__ = [
    "Admission",
    "AdmissionError",
    "FakeKubelet",
    "PreStartError",
    "RegistrationRecord",
    "ResourceState",
    "StreamEnd",
]
