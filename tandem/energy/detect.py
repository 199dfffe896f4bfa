"""Pick the meter that exists here: NVML (when computing on an NVIDIA GPU), the Jetson
rails, RAPL, else the modelled fallback (which says so). Every root is injectable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tandem.energy import jetson, nvml, rapl
from tandem.energy.meter import EnergyMeter, ModelledMeter

DEFAULT_MODELLED_POWER_W = 15.0  # an assumption, labelled "modelled" wherever it is used


def detect_meter(
    *,
    gpu_index: int | None = None,
    gpu_name: str = "",
    nvml_loader: Callable[[], nvml.NvmlLike | None] = nvml.load_nvml,
    i2c_root: Path = jetson.DEFAULT_ROOT,
    powercap_root: Path = rapl.DEFAULT_ROOT,
    modelled_power_w: float = DEFAULT_MODELLED_POWER_W,
    start_sampler: bool = True,
) -> EnergyMeter:
    """`gpu_index`: the CUDA device this process computes on (None: the CPU); its NVML
    counter is preferred. Then Jetson rails (the whole module, GPU included), then RAPL
    (CPU packages), then `ModelledMeter(modelled_power_w)`."""
    if gpu_index is not None:
        meter = nvml.find_nvml(nvml_loader(), gpu_index, gpu_name)
        if meter is not None:
            return meter
    found = jetson.find_jetson(i2c_root)
    if found is not None:
        return found.start() if start_sampler else found
    found_rapl = rapl.find_rapl(powercap_root)
    if found_rapl is not None:
        return found_rapl
    return ModelledMeter(modelled_power_w)


def describe(meter: EnergyMeter) -> str:
    fn = getattr(meter, "describe", None)
    return fn() if fn else meter.source
