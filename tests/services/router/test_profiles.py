import dataclasses

import pytest

from services.router.profiles import (
    CPU,
    DEVICE_PROFILES,
    JETSON_AGX_ORIN,
    RTX_4090,
    DeviceProfile,
    ExpertSpec,
    device_profile,
)


def test_shipped_profiles_are_named_and_sane():
    assert {"jetson-agx-orin", "rtx-4090", "cpu"} <= set(DEVICE_PROFILES)
    assert 15.0 <= JETSON_AGX_ORIN.power_w <= 60.0  # NVIDIA's AGX Orin power modes
    assert RTX_4090.power_w == 450.0  # nominal board power
    assert CPU.speed_factor == 1.0  # the reference machine
    assert RTX_4090.speed_factor < JETSON_AGX_ORIN.speed_factor < CPU.speed_factor
    for p in DEVICE_PROFILES.values():
        assert p.up_bps > 0 and p.down_bps > 0 and p.rtt_s >= 0 and p.tx_power_w >= 0


def test_profiles_say_they_are_modelled():
    import services.router.profiles as mod

    assert "modelled" in mod.__doc__.lower()
    assert "not measured" in mod.__doc__.lower()


def test_lookup_and_immutability():
    assert device_profile("cpu") is CPU
    with pytest.raises(KeyError, match="known"):
        device_profile("tpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        CPU.power_w = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        DEVICE_PROFILES["x"] = CPU  # type: ignore[index]


@pytest.mark.parametrize(
    "kwargs",
    [{"speed_factor": 0.0}, {"power_w": -1.0}, {"up_bps": 0.0}, {"rtt_s": -0.1}, {"name": ""}],
)
def test_device_profile_validation(kwargs):
    base = dataclasses.asdict(CPU)
    with pytest.raises(ValueError):
        DeviceProfile(**{**base, **kwargs})


def test_expert_spec_validation():
    ExpertSpec("a", CPU, 0.01, 0.001, replicas=2)
    with pytest.raises(ValueError):
        ExpertSpec("a", CPU, -0.01, 0.001)
    with pytest.raises(ValueError):
        ExpertSpec("a", CPU, 0.01, 0.001, replicas=0)
