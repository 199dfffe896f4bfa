"""Energy meters against fake sources: sysfs trees in tmp_path (RAPL, both Jetson driver
layouts), a fake NVML object, a fake clock; and detect_meter's order of preference."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.energy.detect import detect_meter
from tandem.energy.jetson import JetsonMeter, discover_rails, find_jetson
from tandem.energy.meter import ModelledMeter, measure
from tandem.energy.nvml import NvmlMeter, find_nvml
from tandem.energy.rapl import find_rapl


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


def _rapl_tree(root: Path, energy: dict[str, int], max_uj: int = 262143328850) -> Path:
    for name, uj in energy.items():
        _write(root / name / "energy_uj", uj)
        _write(root / name / "max_energy_range_uj", max_uj)
        _write(root / name / "name", "package-0" if name.count(":") == 1 else "core")
    return root


# --- RAPL ---------------------------------------------------------------------------------


def test_rapl_sums_packages_not_subdomains(tmp_path):
    root = _rapl_tree(
        tmp_path, {"intel-rapl:0": 1_000_000, "intel-rapl:1": 5_000_000, "intel-rapl:0:0": 7}
    )
    meter = find_rapl(root)
    assert meter is not None and meter.source == "measured:rapl"
    assert meter.read_joules() == 0.0
    _write(root / "intel-rapl:0" / "energy_uj", 3_500_000)  # +2.5 J
    _write(root / "intel-rapl:1" / "energy_uj", 5_500_000)  # +0.5 J
    _write(root / "intel-rapl:0:0" / "energy_uj", 9_999_999)  # a part of package 0: ignored
    assert meter.read_joules() == pytest.approx(3.0)


def test_rapl_wraparound(tmp_path):
    root = _rapl_tree(tmp_path, {"intel-rapl:0": 999_000}, max_uj=999_999)
    meter = find_rapl(root)
    with measure(meter) as span:
        _write(root / "intel-rapl:0" / "energy_uj", 1_000)  # wrapped: 999 + 1 + 1000 uJ
    assert span.joules == pytest.approx(2_000 / 1e6)
    assert span.measured and span.source == "measured:rapl"


def test_rapl_absent_or_unreadable(tmp_path):
    assert find_rapl(tmp_path / "nope") is None
    _write(tmp_path / "intel-rapl:0" / "energy_uj", "")  # e.g. a root-only file read as ""
    _write(tmp_path / "intel-rapl:0" / "max_energy_range_uj", 10)
    assert find_rapl(tmp_path) is None


# --- NVML -------------------------------------------------------------------------------


class FakeNvml:
    def __init__(self, mj: int = 50_000) -> None:
        self.mj = mj
        self.asked: list[int] = []

    def nvmlInit(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int):  # noqa: N802
        if index > 0:
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        self.asked.append(index)
        return ("gpu", index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle) -> int:  # noqa: N802
        assert handle == ("gpu", 0)
        return self.mj


def test_nvml_counts_millijoules_from_start():
    nv = FakeNvml(mj=123_456)
    meter = NvmlMeter(nv, 0, "H100")
    assert meter.read_joules() == 0.0
    with measure(meter) as span:
        nv.mj += 2_500
    assert span.joules == pytest.approx(2.5) and span.source == "measured:nvml"
    assert "H100" in meter.describe()


def test_nvml_missing_gpu_or_library():
    assert find_nvml(None) is None
    assert find_nvml(FakeNvml(), index=3) is None


# --- Jetson -----------------------------------------------------------------------------


def _orin_hwmon(root: Path, mv=(5000, 5000, 5000), ma=(2000, 600, 400)) -> Path:
    hw = root / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    for n, label in enumerate(("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"), start=1):
        _write(hw / f"in{n}_label", label)
        _write(hw / f"in{n}_input", mv[n - 1])
        _write(hw / f"curr{n}_input", ma[n - 1])
    _write(hw / "in7_label", "sum of shunt voltages")  # no current: not a rail
    _write(hw / "in7_input", 40)
    return hw


def test_jetson_hwmon_uses_the_input_rail_and_integrates(tmp_path):
    hw = _orin_hwmon(tmp_path)
    rails = discover_rails(tmp_path)
    assert [r.label for r in rails] == ["VDD_IN"]  # the total; the others are parts of it
    clock = Clock()
    meter = JetsonMeter(rails, clock=clock)  # 5 V * 2 A = 10 W
    with measure(meter, clock) as span:
        clock.t += 2.0
        _write(hw / "curr1_input", 4000)  # 20 W at the end: trapezoid 2 s * 15 W
    assert span.joules == pytest.approx(30.0) and span.seconds == pytest.approx(2.0)
    assert span.source == "measured:jetson"


def test_jetson_iio_layout_sums_rails_without_an_input_rail(tmp_path):
    dev = tmp_path / "ina3221x" / "0-0040" / "iio:device0"
    for i, (name, mw) in enumerate((("GPU", 3000), ("CPU", 1500), ("SOC", 500))):
        _write(dev / f"rail_name_{i}", name)
        _write(dev / f"in_power{i}_input", mw)
    clock = Clock()
    meter = find_jetson(tmp_path, clock=clock)
    assert meter is not None and sorted(r.label for r in meter.rails) == ["CPU", "GPU", "SOC"]
    j0 = meter.read_joules()
    clock.t += 0.5
    assert meter.read_joules() - j0 == pytest.approx(0.5 * 5.0)


def test_jetson_sampler_thread_integrates(tmp_path):
    _orin_hwmon(tmp_path)
    meter = find_jetson(tmp_path, period_s=0.01)
    meter.start()
    try:
        import time

        time.sleep(0.1)
        assert meter.read_joules() > 0.5  # 10 W for ~0.1 s
    finally:
        meter.stop()


# --- modelled and detection -------------------------------------------------------------


def test_modelled_says_so():
    clock = Clock()
    meter = ModelledMeter(12.0, clock)
    with measure(meter, clock) as span:
        clock.t += 0.25
    assert span.joules == pytest.approx(3.0)
    assert span.source == "modelled" and not span.measured
    with pytest.raises(ValueError):
        ModelledMeter(-1.0)


def _detect(tmp_path, **kw):
    base = dict(
        i2c_root=tmp_path / "i2c",
        powercap_root=tmp_path / "powercap",
        nvml_loader=lambda: None,
        start_sampler=False,
    )
    return detect_meter(**{**base, **kw})


def test_detect_prefers_nvml_on_a_gpu_then_jetson_then_rapl(tmp_path):
    _rapl_tree(tmp_path / "powercap", {"intel-rapl:0": 10})
    assert _detect(tmp_path).source == "measured:rapl"
    _orin_hwmon(tmp_path / "i2c")
    assert _detect(tmp_path).source == "measured:jetson"
    nv = FakeNvml()
    assert _detect(tmp_path, gpu_index=0, nvml_loader=lambda: nv).source == "measured:nvml"
    # computing on the CPU: the GPU's counter is not this process's energy
    assert _detect(tmp_path, gpu_index=None, nvml_loader=lambda: nv).source == "measured:jetson"


def test_detect_falls_back_to_modelled(tmp_path):
    meter = _detect(tmp_path, gpu_index=0, modelled_power_w=7.0)
    assert isinstance(meter, ModelledMeter) and meter.power_w == 7.0
    assert "nothing measured" in meter.describe()


def test_this_machine(capsys):
    """Whatever this machine offers, detection answers (printed for the record)."""
    meter = detect_meter(start_sampler=False)
    with capsys.disabled():
        print(f"\nenergy source here: {meter.source}")
    assert meter.source in ("modelled", "measured:rapl", "measured:jetson", "measured:nvml")
