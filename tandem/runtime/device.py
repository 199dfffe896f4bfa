"""Which device a service computes on: `--device auto|cpu|cuda|cuda:N` (TANDEM_DEVICE).

`auto` takes CUDA when torch sees a GPU, else the CPU. Asking for CUDA where torch sees
none is a startup error (`DeviceUnavailable`) that says what torch found, not a silent
fall back to the CPU. The CUDA check is injectable (`cuda_probe`) so tests run anywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV_VAR = "TANDEM_DEVICE"
CHOICES = ("auto", "cpu", "cuda")  # plus cuda:N
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceUnavailable(RuntimeError):
    """The requested device does not exist here (raised at startup)."""


@dataclass(frozen=True)
class CudaProbe:
    """What torch reports about CUDA on this machine."""

    available: bool
    count: int
    torch_cuda: str | None  # torch.version.cuda: None on a CPU-only build of torch
    names: tuple[str, ...] = ()

    def describe(self) -> str:
        build = (
            f"torch {torch.__version__} built with CUDA {self.torch_cuda}"
            if self.torch_cuda
            else f"torch {torch.__version__} is a CPU-only build"
        )
        if not self.available:
            return f"{build}; torch.cuda.is_available() is False"
        return f"{build}; {self.count} GPU(s): {', '.join(self.names) or '?'}"


def probe_cuda() -> CudaProbe:
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    names = tuple(torch.cuda.get_device_name(i) for i in range(count))
    return CudaProbe(available, count, torch.version.cuda, names)


@dataclass(frozen=True)
class DeviceChoice:
    """The resolved device: `torch_device` is what tensors are put on."""

    requested: str  # as asked: auto, cpu, cuda, cuda:1
    kind: str  # "cpu" | "cuda"
    index: int | None  # CUDA ordinal; None on the CPU
    name: str  # the GPU's name, or "cpu"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind if self.index is None else f"{self.kind}:{self.index}")

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """Weights' dtype: bf16 on both (the CPU path has always served bf16)."""
        return torch.bfloat16


CPU = DeviceChoice("cpu", "cpu", None, "cpu")


def resolve_device(
    spec: str | None = "auto", cuda_probe: Callable[[], CudaProbe] = probe_cuda
) -> DeviceChoice:
    """`auto` | `cpu` | `cuda` | `cuda:N` -> a DeviceChoice; raises ValueError for a
    malformed spec and DeviceUnavailable for CUDA where there is none (or no GPU N)."""
    requested = (spec or "auto").strip().lower()
    m = _SPEC.match(requested)
    if m is None:
        raise ValueError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu" or (kind == "auto" and index is not None):
        if index is not None:
            raise ValueError(f"device {spec!r}: only cuda takes an index")
        return CPU
    probe = cuda_probe()
    if kind == "auto":
        if not probe.available or probe.count < 1:
            return DeviceChoice(requested, "cpu", None, "cpu")
        return DeviceChoice(requested, "cuda", 0, probe.names[0] if probe.names else "cuda")
    if not probe.available or probe.count < 1:
        raise DeviceUnavailable(
            f"--device {requested} ({ENV_VAR}) asks for a GPU, but none is usable: "
            f"{probe.describe()}. Use --device cpu (or auto) on this machine."
        )
    ordinal = int(index) if index is not None else 0
    if ordinal >= probe.count:
        raise DeviceUnavailable(f"--device {requested}: no GPU {ordinal}; {probe.describe()}")
    name = probe.names[ordinal] if ordinal < len(probe.names) else "cuda"
    return DeviceChoice(requested, "cuda", ordinal, name)


def device_setting(default: str = "auto") -> str:
    """The --device default a service's parser uses: TANDEM_DEVICE, else `default`."""
    return os.environ.get(ENV_VAR, default)
