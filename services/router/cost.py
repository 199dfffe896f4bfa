"""Latency and energy of experts and expert subsets for one request category (MoE² §1.2).

Latency: `t_comp_n(c) = (prompt_tokens * prefill + output_tokens * decode) * speed_factor`,
`t_tx_n(c) = bits_in / up + bits_out / down + rtt`, and a subset's delay is
`T_c(S) = max_{n in S} (t_comp_n(c) + t_tx_n(c)) + t_agg` (experts run in parallel).

Energy is MODELLED, not measured: `E(S) = sum_{n in S} (P_n * t_comp_n + P_tx_n * t_tx_n)`,
from the device profiles' assumed powers (see `services.router.profiles`). With top-k routing
inside S, `expected_energy` weights each expert by how often it lands in the top-k.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.router.profiles import ExpertSpec


@dataclass(frozen=True)
class Category:
    """An application category with its typical request shape (e.g. prose, code, definition)."""

    name: str
    prompt_tokens: int
    output_tokens: int
    bytes_per_token: float = 4.0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.output_tokens < 0:
            raise ValueError("token counts must be >= 0")
        if self.bytes_per_token <= 0:
            raise ValueError("bytes_per_token must be > 0")

    @property
    def bytes_in(self) -> float:
        return self.prompt_tokens * self.bytes_per_token

    @property
    def bytes_out(self) -> float:
        return self.output_tokens * self.bytes_per_token


@dataclass(frozen=True)
class ExpertCost:
    """One expert's cost for one request of a category. Energy is modelled."""

    expert_id: str
    category: str
    t_comp_s: float
    t_tx_s: float
    energy_j: float

    @property
    def delay_s(self) -> float:
        """Compute plus transmission time (without the subset's aggregation time)."""
        return self.t_comp_s + self.t_tx_s


@dataclass(frozen=True)
class SubsetCost:
    """A subset's cost for one request of a category. Energy is modelled."""

    experts: frozenset[str]
    category: str
    delay_s: float
    energy_j: float


def t_comp(expert: ExpertSpec, category: Category) -> float:
    """Prefill + decode time on the expert's device, seconds."""
    cpu_s = (
        category.prompt_tokens * expert.prefill_s_per_token
        + category.output_tokens * expert.decode_s_per_token
    )
    return cpu_s * expert.device.speed_factor


def t_tx(expert: ExpertSpec, category: Category) -> float:
    """Request up + answer down + one round trip, seconds."""
    dev = expert.device
    return category.bytes_in * 8 / dev.up_bps + category.bytes_out * 8 / dev.down_bps + dev.rtt_s


def expert_cost(expert: ExpertSpec, category: Category) -> ExpertCost:
    """`ExpertCost` with `energy = P * t_comp + P_tx * t_tx` (modelled)."""
    comp = t_comp(expert, category)
    tx = t_tx(expert, category)
    energy = expert.device.power_w * comp + expert.device.tx_power_w * tx
    return ExpertCost(expert.expert_id, category.name, comp, tx, energy)


def subset_cost(
    experts: Iterable[ExpertSpec], category: Category, t_agg_s: float = 0.0
) -> SubsetCost:
    """`T_c(S) = max_n (t_comp + t_tx) + t_agg` and `E(S) = sum_n e_n` for running every expert
    of S on one request. The empty subset costs nothing (delay 0, not t_agg)."""
    costs = [expert_cost(e, category) for e in experts]
    ids = frozenset(c.expert_id for c in costs)
    if not costs:
        return SubsetCost(ids, category.name, 0.0, 0.0)
    delay = max(c.delay_s for c in costs) + t_agg_s
    return SubsetCost(ids, category.name, delay, sum(c.energy_j for c in costs))


def expected_energy(
    experts: Iterable[ExpertSpec], category: Category, pi: Mapping[str, float]
) -> float:
    """Expected energy per request when only the top-k of S run: `sum_n pi_n * e_n`, with
    `pi_n` the fraction of (validation) requests in which n lands in the top-k within S
    (missing ids count as 0). Modelled, like every energy here."""
    total = 0.0
    for e in experts:
        p = pi.get(e.expert_id, 0.0)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"pi[{e.expert_id!r}] must be in [0, 1], got {p}")
        total += p * expert_cost(e, category).energy_j
    return total


def mean_energy(
    experts: Iterable[ExpertSpec], categories: Mapping[Category, float]
) -> dict[str, float]:
    """Per-expert energy per request averaged over a category mix (weights need not sum to
    1; they are normalised). This is the additive `e_n` the coarse selection budgets."""
    total_w = sum(categories.values())
    if total_w <= 0:
        raise ValueError("category weights must sum to > 0")
    out: dict[str, float] = {}
    for e in experts:
        out[e.expert_id] = (
            sum(w * expert_cost(e, c).energy_j for c, w in categories.items()) / total_w
        )
    return out
