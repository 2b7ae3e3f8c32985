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
import errno
import logging
import os
from collections.abc import Sequence
from typing import Any, Final, Protocol

import pynvml

__all__ = [
    "EVENT_DOUBLE_BIT_ECC",
    "EVENT_GPU_UNAVAILABLE",
    "EVENT_RECOVERY_ACTION",
    "EVENT_XID",
    "FIELD_RECOVERY_ACTION",
    "RECOVERY_ACTIONS",
    "NO_INSTANCE",
    "NVML",
    "NVMLError",
    "load_pynvml",
    "text",
]

log = logging.getLogger("trio_gpu_plugin.nvml")

NVMLError = pynvml.NVMLError

#: Event types (nvml.h ``nvmlEventType*``).
EVENT_SINGLE_BIT_ECC: Final = 0x1
EVENT_DOUBLE_BIT_ECC: Final = 0x2
EVENT_XID: Final = 0x8
EVENT_GPU_UNAVAILABLE: Final = 0x4000
#: The driver's recovery action for the GPU changed (``nvmlEventTypeGpuRecoveryAction``).
EVENT_RECOVERY_ACTION: Final = 0x8000
#: Field ``NVML_FI_DEV_GET_GPU_RECOVERY_ACTION``: what the driver says the GPU needs
#: after a fault (NVIDIA's XID catalog); newer drivers answer it, older ones report the
#: field NOT_SUPPORTED.
FIELD_RECOVERY_ACTION: Final = 230
#: ``NVML_GPU_RECOVERY_ACTION_*`` values (pynvml 13.615) -> the names logs and metrics use.
RECOVERY_ACTIONS: Final = {
    0: "NONE",
    1: "GPU_RESET",
    2: "NODE_REBOOT",
    3: "DRAIN_P2P",
    4: "DRAIN_AND_RESET",
    5: "RECOVER_IMEX_DOMAIN",
    6: "BUS_RESET",
    7: "SYSTEM_REBOOT",
}
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


#: NVML errors that concern one device (the one a call named), not NVML as a whole: the
#: session goes on for the other GPUs.
DEVICE_ERRORS: Final = (
    pynvml.NVML_ERROR_GPU_IS_LOST,
    pynvml.NVML_ERROR_RESET_REQUIRED,
    pynvml.NVML_ERROR_GPU_NOT_FOUND,
)


def text(value: str | bytes) -> str:
    """A string NVML returned: pynvml decodes some (function results) but not others
    (``char`` arrays inside structures, such as ``busId``)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def nvml_gone(error: BaseException) -> bool:
    """Whether ``error`` says NVML as a whole (not one GPU) stopped working."""
    return isinstance(error, NVMLError) and getattr(error, "value", None) in NVML_GONE_ERRORS


def error_code(error: BaseException) -> int | None:
    """The ``NVML_ERROR_*`` code of an NVML error, ``None`` for anything else."""
    value = getattr(error, "value", None) if isinstance(error, NVMLError) else None
    return value if isinstance(value, int) else None


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
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, errorType: int, counterType: int) -> int: ...

    # Field values (the driver's recovery action)
    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: Sequence[Any]) -> Any: ...


#: Where NVIDIA's plugin looks for the library under a mounted driver root, in order.
LIBRARY_DIRS: Final = ("usr/lib64", "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu",
                       "lib64", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu")


def resolve_in_root(root: str, path: str, *, max_links: int = 40) -> str:
    """``path`` (a file under ``root``) with its symlinks followed *inside* ``root``.

    A driver root is the host's filesystem mounted elsewhere (``/driver-root``): an
    absolute link there, ``libnvidia-ml.so.1 -> /usr/lib64/libnvidia-ml.so.550.54.15``,
    names a host path, which is under ``root`` here, while ``os.path.realpath`` would
    follow it to the container's own ``/usr/lib64``.  So absolute link targets start
    again at ``root``, and ``..`` never climbs above it, as in a chroot.

    Raises:
        ValueError: ``path`` is not under ``root``.
        OSError: ``ELOOP`` after ``max_links`` links.
    """
    root = os.path.abspath(root)
    relative = os.path.relpath(os.path.abspath(path), root)
    if relative == ".." or relative.startswith(".." + os.sep):
        raise ValueError(f"{path} is not under {root}")
    pending = relative.split(os.sep)
    resolved = root
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            resolved = root if resolved == root else os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        if not os.path.islink(candidate):
            resolved = candidate
            continue
        links += 1
        if links > max_links:
            raise OSError(errno.ELOOP, f"more than {max_links} symbolic links under {root}", path)
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = root
        pending = target.split("/") + pending
    return resolved


def find_library(driver_root: str) -> str | None:
    """``libnvidia-ml.so.1`` under a mounted driver root (symlinks resolved inside the
    root), as NVIDIA's plugin looks for it; ``None`` if the root is ``/`` or holds none
    (the dynamic loader's search path applies then)."""
    if not driver_root or os.path.abspath(driver_root) == "/":
        return None
    for directory in LIBRARY_DIRS:
        candidate = os.path.join(driver_root, directory, "libnvidia-ml.so.1")
        if os.path.lexists(candidate):
            try:
                resolved = resolve_in_root(driver_root, candidate)
            except OSError as exc:
                log.warning("NVML: cannot resolve %s: %s; looking further", candidate, exc)
                continue
            if os.path.exists(resolved):
                return resolved
            log.warning("NVML: %s is a link to %s, which does not exist under %s; looking "
                        "further", candidate, resolved, driver_root)
    return None


def loaded_library(fragment: str = "libnvidia-ml") -> str | None:
    """The file of the first loaded shared object whose path holds ``fragment`` (from
    ``/proc/self/maps``), ``None`` if none is loaded or the map cannot be read."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if fragment in path and path.startswith("/"):
                    return path
    except OSError:
        return None
    return None


def load_pynvml(driver_root: str = "/") -> NVML:
    """The real NVML: the ``pynvml`` module.

    ``nvmlInit`` loads ``libnvidia-ml.so.1`` through the dynamic loader; when the host's
    driver root is mounted elsewhere (``--driver-root-ctr-path``, ``/driver-root`` in
    NVIDIA's DaemonSet) and holds the library, that one is loaded instead.  Which
    library is used, and why the driver root's was not, is logged: a node whose
    container image carries its own ``libnvidia-ml.so.1`` would otherwise run a library
    that does not match the host's kernel module, silently.
    """
    if getattr(pynvml, "nvmlLib", None) is not None:
        log.debug("NVML: library already loaded (%s)", loaded_library() or "path unknown")
        nvml: NVML = pynvml
        return nvml
    if driver_root and os.path.abspath(driver_root) != "/":
        library = find_library(driver_root)
        if library is None:
            log.warning("NVML: no libnvidia-ml.so.1 under the driver root %s (looked in %s); "
                        "falling back to the dynamic loader's search path", driver_root,
                        ", ".join(LIBRARY_DIRS))
        else:
            try:
                # pynvml loads its library only when none is loaded yet: hand it this one.
                pynvml.nvmlLib = ctypes.CDLL(library)
            except OSError as exc:
                log.warning("NVML: cannot load %s from the driver root %s: %s; falling back "
                            "to the dynamic loader's search path", library, driver_root, exc)
            else:
                log.info("NVML: using %s from the driver root %s", library, driver_root)
    nvml = pynvml
    return nvml


def describe_loaded() -> str:
    """Which NVML library this process runs, for the start-up log line."""
    return loaded_library() or "libnvidia-ml.so.1 (path unknown)"
