"""NVIDIA GPUs: NVML's total energy counter (nvmlDeviceGetTotalEnergyConsumption,
millijoules since the driver loaded; Volta and newer). Through pynvml (the nvidia-ml-py
package) when installed, else a small ctypes binding of libnvidia-ml.so.1. Tests pass a
fake object with the same three calls."""

from __future__ import annotations

import ctypes
from typing import Any, Protocol

SOURCE = "measured:nvml"


class NvmlLike(Protocol):
    def nvmlInit(self) -> None: ...  # noqa: N802 (NVML's own names)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...  # noqa: N802

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int: ...  # noqa: N802


class NvmlMeter:
    source = SOURCE

    def __init__(self, nvml: NvmlLike, index: int = 0, name: str = "") -> None:
        self._nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.index, self.name = index, name
        self._origin_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def read_joules(self) -> float:
        now = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        return (now - self._origin_mj) / 1e3

    def describe(self) -> str:
        return f"measured: NVML energy counter of GPU {self.index} {self.name}".rstrip()


class _CtypesNvml:
    """The three NVML calls through ctypes (no Python package needed)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise OSError(f"NVML {what} failed with status {rc}")

    def nvmlInit(self) -> None:  # noqa: N802
        self._check(self._lib.nvmlInit_v2(), "init")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> ctypes.c_void_p:  # noqa: N802
        handle = ctypes.c_void_p()
        rc = self._lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle))
        self._check(rc, "device handle")
        return handle

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: ctypes.c_void_p) -> int:  # noqa: N802
        mj = ctypes.c_ulonglong()
        rc = self._lib.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(mj))
        self._check(rc, "total energy")
        return int(mj.value)


def load_nvml() -> NvmlLike | None:
    """pynvml if importable, else libnvidia-ml.so.1 through ctypes, initialised; or None."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 (absent, or no driver: both mean "no NVML")
        pass
    try:
        nvml = _CtypesNvml(ctypes.CDLL("libnvidia-ml.so.1"))
        nvml.nvmlInit()
        return nvml
    except OSError:
        return None


def find_nvml(nvml: NvmlLike | None, index: int = 0, name: str = "") -> NvmlMeter | None:
    """A meter on GPU `index` if NVML answers its energy counter, else None."""
    if nvml is None:
        return None
    try:
        return NvmlMeter(nvml, index, name)
    except Exception:  # noqa: BLE001 (no such GPU, or the counter is unsupported)
        return None
