"""The one narrow NVML interface everything else uses.

:class:`NVML` names the subset of ``pynvml`` (module of the ``nvidia-ml-py``
distribution) that discovery and health checking call, with pynvml's own names, argument
orders and return shapes.  Two things satisfy it: the real ``pynvml`` module
(:func:`load_pynvml`) and :class:`~trio_gpu_plugin.SimulatedNVML`, which raises pynvml's
own ``NVMLError_*`` classes, so the same code runs on a GPU node and on a laptop.

Every function here blocks (NVML takes locks in the driver); callers run them in
``trio.to_thread`` (see ``_nvml_node``).  Handles are opaque: compare devices by UUID.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Final, Protocol

import pynvml

__all__ = [
    "EVENT_DOUBLE_BIT_ECC",
    "EVENT_GPU_UNAVAILABLE",
    "EVENT_XID",
    "NO_INSTANCE",
    "NVML",
    "NVMLError",
    "load_pynvml",
    "text",
]

NVMLError = pynvml.NVMLError

#: Event types (nvml.h ``nvmlEventType*``).
EVENT_SINGLE_BIT_ECC: Final = 0x1
EVENT_DOUBLE_BIT_ECC: Final = 0x2
EVENT_XID: Final = 0x8
EVENT_GPU_UNAVAILABLE: Final = 0x4000
#: A GPU or compute instance ID meaning "the whole GPU, no MIG instance" in event data.
NO_INSTANCE: Final = 0xFFFFFFFF

#: NVML errors that mean NVML itself is unusable, not one device.
NVML_GONE_ERRORS: Final = (
    pynvml.NVML_ERROR_UNINITIALIZED,
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
)


def text(value: str | bytes) -> str:
    """A string NVML returned: pynvml decodes some (function results) but not others
    (``char`` arrays inside structures, such as ``busId``)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def nvml_gone(error: BaseException) -> bool:
    """Whether ``error`` says NVML as a whole (not one GPU) stopped working."""
    return isinstance(error, NVMLError) and getattr(error, "value", None) in NVML_GONE_ERRORS


class NVML(Protocol):
    """The NVML calls the plugin makes, exactly as ``pynvml`` spells them.

    Return shapes follow pynvml: objects with the C structure's field names
    (``nvmlDeviceGetMemoryInfo(h).total``, ``nvmlDeviceGetPciInfo(h).busId``,
    ``nvmlEventSetWait_v2(s, ms).eventData`` ...), lists and tuples where pynvml returns
    them.  Failures raise ``pynvml.NVMLError`` subclasses (``NVMLError_Timeout`` for an
    event wait that timed out, ``NVMLError_NotFound`` for an empty MIG slot...).
    """

    # Library
    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: ...

    # Devices
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetIndex(self, handle: Any) -> int: ...
    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]: ...
    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int: ...
    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: Any, link: int) -> Any: ...
    def nvmlDeviceGetTopologyCommonAncestor(self, handle1: Any, handle2: Any) -> int: ...

    # MIG
    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]: ...
    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int: ...
    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any: ...
    def nvmlDeviceIsMigDeviceHandle(self, handle: Any) -> int: ...
    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any) -> Any: ...
    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int: ...
    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int: ...
    def nvmlDeviceGetAttributes(self, handle: Any) -> Any: ...
    def nvmlDeviceGetGpuInstanceById(self, handle: Any, gpu_instance_id: int) -> Any: ...
    def nvmlGpuInstanceGetInfo(self, gpu_instance: Any) -> Any: ...
    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: Any, profile: int) -> Any: ...
    def nvmlGpuInstanceGetComputeInstanceById(self, gpu_instance: Any, compute_instance_id: int) -> Any: ...
    def nvmlComputeInstanceGetInfo(self, compute_instance: Any) -> Any: ...
    def nvmlGpuInstanceGetComputeInstanceProfileInfo(
        self, gpu_instance: Any, profile: int, eng_profile: int) -> Any: ...

    # Events
    def nvmlEventSetCreate(self) -> Any: ...
    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int: ...
    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None: ...
    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> Any: ...
    def nvmlEventSetFree(self, event_set: Any) -> None: ...

    # Memory health
    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int: ...
    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]: ...


#: Where NVIDIA's plugin looks for the library under a mounted driver root, in order.
LIBRARY_DIRS: Final = ("usr/lib64", "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu",
                       "lib64", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu")


def find_library(driver_root: str) -> str | None:
    """``libnvidia-ml.so.1`` under a mounted driver root (symlinks resolved), as NVIDIA's
    plugin looks for it; ``None`` if the root is ``/`` or holds none (the dynamic
    loader's search path applies then)."""
    if not driver_root or os.path.abspath(driver_root) == "/":
        return None
    for directory in LIBRARY_DIRS:
        candidate = os.path.join(driver_root, directory, "libnvidia-ml.so.1")
        if os.path.exists(candidate):
            return os.path.realpath(candidate)
    return None


def load_pynvml(driver_root: str = "/") -> NVML:
    """The real NVML: the ``pynvml`` module.

    ``nvmlInit`` loads ``libnvidia-ml.so.1`` through the dynamic loader; when the host's
    driver root is mounted elsewhere (``--driver-root-ctr-path``, ``/driver-root`` in
    NVIDIA's DaemonSet) and holds the library, that one is loaded instead.
    """
    library = find_library(driver_root)
    if library is not None and getattr(pynvml, "nvmlLib", None) is None:
        try:
            # pynvml loads its library only when none is loaded yet: hand it this one.
            pynvml.nvmlLib = ctypes.CDLL(library)
        except OSError:
            pass  # nvmlInit then tries the loader's path and reports what it finds
    nvml: NVML = pynvml
    return nvml
