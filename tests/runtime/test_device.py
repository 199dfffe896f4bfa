"""Device selection (tandem.runtime.device) with an injected CUDA probe: auto, cpu, cuda,
cuda:N, and the startup errors for a GPU that is not there."""

from __future__ import annotations

import pytest
import torch

from tandem.runtime.device import (
    CudaProbe,
    DeviceUnavailable,
    device_setting,
    resolve_device,
)

NO_GPU = CudaProbe(available=False, count=0, torch_cuda=None)
TWO_GPUS = CudaProbe(available=True, count=2, torch_cuda="13.0", names=("H100", "L4"))


def _probe(p: CudaProbe):
    return lambda: p


def test_cpu_never_asks_for_cuda():
    def boom() -> CudaProbe:
        raise AssertionError("probed")

    d = resolve_device("cpu", boom)
    assert d.kind == "cpu" and d.torch_device == torch.device("cpu") and not d.is_cuda


def test_auto_without_gpu_is_cpu():
    d = resolve_device("auto", _probe(NO_GPU))
    assert d.kind == "cpu" and d.requested == "auto"
    assert resolve_device(None, _probe(NO_GPU)).kind == "cpu"


def test_auto_with_gpu_is_cuda0():
    d = resolve_device("auto", _probe(TWO_GPUS))
    assert d.is_cuda and d.index == 0 and d.name == "H100"
    assert d.torch_device == torch.device("cuda:0")


def test_cuda_index():
    d = resolve_device("CUDA:1", _probe(TWO_GPUS))
    assert d.torch_device == torch.device("cuda:1") and d.name == "L4"


def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(DeviceUnavailable) as err:
        resolve_device("cuda", _probe(NO_GPU))
    msg = str(err.value)
    assert "CPU-only build" in msg and "--device cpu" in msg and "TANDEM_DEVICE" in msg


def test_cuda_build_without_driver_says_so():
    probe = CudaProbe(available=False, count=0, torch_cuda="12.4")
    with pytest.raises(DeviceUnavailable, match=r"CUDA 12\.4.*is_available\(\) is False"):
        resolve_device("cuda:0", _probe(probe))


def test_missing_ordinal():
    with pytest.raises(DeviceUnavailable, match="no GPU 2"):
        resolve_device("cuda:2", _probe(TWO_GPUS))


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0", "auto:1", "tpu"])
def test_malformed(spec):
    with pytest.raises(ValueError):
        resolve_device(spec, _probe(TWO_GPUS))


def test_env_default(monkeypatch):
    monkeypatch.delenv("TANDEM_DEVICE", raising=False)
    assert device_setting() == "auto"
    monkeypatch.setenv("TANDEM_DEVICE", "cpu")
    assert device_setting() == "cpu"


def test_real_probe_runs():
    """On this machine's torch: whatever it finds, auto resolves without error."""
    assert resolve_device("auto").kind in ("cpu", "cuda")
