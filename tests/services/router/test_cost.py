import pytest

from services.router.cost import (
    Category,
    expected_energy,
    expert_cost,
    mean_energy,
    subset_cost,
    t_comp,
    t_tx,
)
from services.router.profiles import DeviceProfile, ExpertSpec

DEV = DeviceProfile(
    "dev",
    power_w=10.0,
    tx_power_w=2.0,
    speed_factor=0.5,
    up_bps=8000.0,
    down_bps=16000.0,
    rtt_s=0.1,
)
SLOW = DeviceProfile(
    "slow", power_w=100.0, tx_power_w=1.0, speed_factor=2.0, up_bps=8e6, down_bps=8e6, rtt_s=0.0
)
CAT = Category("prose", prompt_tokens=100, output_tokens=50, bytes_per_token=4.0)
A = ExpertSpec("a", DEV, decode_s_per_token=0.02, prefill_s_per_token=0.001)
B = ExpertSpec("b", SLOW, decode_s_per_token=0.01, prefill_s_per_token=0.0)


def test_hand_computed_expert_cost():
    # compute: (100 * 0.001 + 50 * 0.02) * 0.5 = 0.55 s
    assert t_comp(A, CAT) == pytest.approx(0.55)
    # tx: 400 B * 8 / 8000 + 200 B * 8 / 16000 + 0.1 = 0.4 + 0.1 + 0.1 = 0.6 s
    assert t_tx(A, CAT) == pytest.approx(0.6)
    c = expert_cost(A, CAT)
    assert c.delay_s == pytest.approx(1.15)
    assert c.energy_j == pytest.approx(10 * 0.55 + 2 * 0.6)  # 6.7 J


def test_hand_computed_subset_cost():
    # b: compute 50 * 0.01 * 2 = 1.0 s; tx 3200/8e6 + 1600/8e6 = 0.0006 s
    cb = expert_cost(B, CAT)
    assert cb.t_comp_s == pytest.approx(1.0)
    assert cb.t_tx_s == pytest.approx(0.0006)
    s = subset_cost([A, B], CAT, t_agg_s=0.05)
    assert s.experts == frozenset({"a", "b"})
    assert s.delay_s == pytest.approx(max(1.15, 1.0006) + 0.05)
    assert s.energy_j == pytest.approx(6.7 + 100 * 1.0 + 1 * 0.0006)
    empty = subset_cost([], CAT, t_agg_s=0.05)
    assert empty.delay_s == 0.0 and empty.energy_j == 0.0


def test_expected_energy_weights_by_topk_frequency():
    ea, eb = expert_cost(A, CAT).energy_j, expert_cost(B, CAT).energy_j
    assert expected_energy([A, B], CAT, {"a": 1.0, "b": 0.25}) == pytest.approx(ea + 0.25 * eb)
    assert expected_energy([A, B], CAT, {"a": 0.5}) == pytest.approx(0.5 * ea)
    with pytest.raises(ValueError):
        expected_energy([A], CAT, {"a": 1.5})


def test_mean_energy_over_category_mix():
    code = Category("code", prompt_tokens=0, output_tokens=100)
    m = mean_energy([A], {CAT: 3.0, code: 1.0})
    expect = (3 * expert_cost(A, CAT).energy_j + expert_cost(A, code).energy_j) / 4
    assert m["a"] == pytest.approx(expect)


def test_energy_is_documented_as_modelled():
    import services.router.cost as mod

    assert "modelled, not measured" in mod.__doc__.lower().replace("\n", " ")
