"""Sampler behaviour (greedy, seeds, top_p, temperature) and SamplingParams validation."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tandem.runtime.sampling import Sampler, SamplingParams


def _logits(seed: int = 0, vocab: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 2.0


def _draw(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    s = Sampler(params)
    return [s.sample(logits)[0] for _ in range(n)]


# --- greedy -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax_with_its_probability(seed):
    logits = _logits(seed)
    s = Sampler(SamplingParams(temperature=0.0))
    assert s.params.greedy
    tok, p = s.sample(logits)
    want = max(range(len(logits)), key=lambda i: float(logits[i]))
    assert tok == want
    ref = math.exp(float(logits[want])) / sum(math.exp(float(v)) for v in logits)
    assert p == pytest.approx(ref, rel=1e-5)


def test_greedy_ignores_seed_and_top_p():
    logits = _logits(3)
    a = _draw(SamplingParams(temperature=0.0, seed=1, top_p=0.5), logits, 20)
    b = _draw(SamplingParams(temperature=0.0, seed=2), logits, 20)
    assert a == b == [int(torch.argmax(logits))] * 20


def test_greedy_on_bf16_logits():
    logits = _logits(4).to(torch.bfloat16)
    tok, p = Sampler(SamplingParams(temperature=0.0)).sample(logits)
    assert tok == int(torch.argmax(logits.float()))
    assert 0.0 < p <= 1.0


# --- seeds ------------------------------------------------------------------------------


def test_same_seed_same_sequence():
    logits = _logits(0)
    p = SamplingParams(temperature=1.0, seed=1234)
    assert _draw(p, logits, 200) == _draw(p, logits, 200)


def test_same_seed_same_sequence_with_top_p():
    logits = _logits(1)
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    assert _draw(p, logits, 200) == _draw(p, logits, 200)


def test_different_seeds_differ():
    logits = torch.zeros(50)  # uniform: 200 equal draws from two seeds is ~impossible
    a = _draw(SamplingParams(seed=1), logits, 200)
    b = _draw(SamplingParams(seed=2), logits, 200)
    assert a != b
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 100


def test_unseeded_samplers_differ():
    logits = torch.zeros(1000)
    a = _draw(SamplingParams(), logits, 50)
    b = _draw(SamplingParams(), logits, 50)
    assert a != b


def test_sampler_stream_is_independent_of_global_rng():
    logits = _logits(2)
    p = SamplingParams(seed=99)
    torch.manual_seed(0)
    a = _draw(p, logits, 100)
    torch.manual_seed(12345)
    torch.rand(1000)
    b = _draw(p, logits, 100)
    assert a == b


# --- distribution, temperature, top_p -------------------------------------------------


def test_sampling_follows_softmax_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    counts = Counter(_draw(SamplingParams(seed=0), logits, n))
    for tok, want in enumerate([0.5, 0.3, 0.15, 0.05]):
        # 5 binomial standard deviations
        sd = math.sqrt(want * (1 - want) / n)
        assert abs(counts[tok] / n - want) < 5 * sd, (tok, counts)


def test_returned_probability_is_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    t = 0.5
    s = Sampler(SamplingParams(temperature=t, seed=0))
    z = sum(math.exp(float(v) / t) for v in logits)
    for _ in range(50):
        tok, p = s.sample(logits)
        assert p == pytest.approx(math.exp(float(logits[tok]) / t) / z, rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_small_top_p_always_gives_top_token(seed):
    logits = _logits(seed)
    top = int(torch.argmax(logits))
    assert _draw(SamplingParams(top_p=1e-6, seed=seed), logits, 100) == [top] * 100


def test_top_p_restricts_to_nucleus():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    logits = torch.log(probs)
    # nucleus for top_p=0.75: 0.4 + 0.3 < 0.75, so the 0.2 token is needed, and no more
    toks = set(_draw(SamplingParams(top_p=0.75, seed=0), logits, 2000))
    assert toks == {0, 1, 2}
    # at top_p=0.69 the first two already cover it (mass before the third is 0.7)
    toks = set(_draw(SamplingParams(top_p=0.69, seed=0), logits, 2000))
    assert toks == {0, 1}


def test_top_p_renormalizes_within_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    counts = Counter(_draw(SamplingParams(top_p=0.7, seed=3), torch.log(probs), n))
    assert set(counts) == {0, 1}
    want = 0.5 / 0.8
    sd = math.sqrt(want * (1 - want) / n)
    assert abs(counts[0] / n - want) < 5 * sd


def test_near_zero_temperature_is_greedy():
    logits = _logits(5)
    top = int(torch.argmax(logits))
    assert _draw(SamplingParams(temperature=1e-4, seed=0), logits, 100) == [top] * 100


@pytest.mark.parametrize("t", [1e-30, 1e-38, 1e-45])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_tiny_temperature_does_not_overflow(t, top_p):
    # logits / T overflows float32 for T this small; the sampler must still act greedily
    logits = torch.tensor([1.0, 2.0, 30.0, -5.0])
    tok, p = Sampler(SamplingParams(temperature=t, top_p=top_p, seed=0)).sample(logits)
    assert (tok, p) == (2, 1.0)


def test_tiny_temperature_splits_exact_ties():
    logits = torch.tensor([3.0, -1.0, 3.0])
    toks = set(_draw(SamplingParams(temperature=1e-40, seed=0), logits, 200))
    assert toks == {0, 2}


def test_large_temperature_flattens():
    logits = torch.tensor([4.0, 2.0, 0.0, -2.0, -4.0])
    n = 2000
    cold = Counter(_draw(SamplingParams(temperature=0.3, seed=0), logits, n))
    hot = Counter(_draw(SamplingParams(temperature=100.0, seed=0), logits, n))
    assert cold[0] / n > 0.99
    # at T=100 the distribution is nearly uniform over 5 tokens
    assert set(hot) == {0, 1, 2, 3, 4}
    for tok in range(5):
        assert 0.15 < hot[tok] / n < 0.25, hot


def test_masked_logits_are_never_sampled():
    logits = torch.full((20,), float("-inf"))
    logits[[3, 11]] = 0.0
    assert set(_draw(SamplingParams(seed=0), logits, 200)) == {3, 11}


# --- SamplingParams validation -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": -0.5},
        {"top_p": 1.0001},
        {"top_p": float("nan")},
        {"max_tokens": 0},
        {"max_tokens": -3},
    ],
)
def test_invalid_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.0},
        {"temperature": 2.0, "top_p": 1.0},
        {"top_p": 1e-9},
        {"max_tokens": 1},
        {"seed": 0, "stop": ("\n",), "ignore_eos": True},
    ],
)
def test_valid_params(kwargs):
    p = SamplingParams(**kwargs)
    assert p.greedy == (p.temperature == 0.0)


def test_defaults_and_frozen():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.ignore_eos) == (
        256,
        1.0,
        1.0,
        None,
        (),
        False,
    )
    assert not p.greedy
    with pytest.raises(AttributeError):
        p.temperature = 0.0  # type: ignore[misc]
