"""Per-request budgets: what a client may spend on one request, and the server's defaults.

A client sets them in the request body (with the `openai` client: `extra_body={...}`) or in
headers; the body wins when both are given:

| body field    | header                 | meaning                                             |
|---------------|------------------------|-----------------------------------------------------|
| `latency_ms`  | `x-tandem-latency-ms`  | end-to-end latency budget, milliseconds (> 0)       |
| `energy_j`    | `x-tandem-energy-j`    | energy budget, joules per request (> 0; MODELLED)   |
| `best_effort` | `x-tandem-best-effort` | true: serve an infeasible budget anyway (no 400)    |
| `top_k`       | `x-tandem-top-k`       | fine level: experts of S that answer (1..max_top_k) |

Anything malformed (not a number, <= 0, NaN, infinite, an unknown boolean spelling, top_k out
of range) is an `ApiError` 400 naming the field. A missing budget takes the server default
(`BudgetDefaults`; None there means no limit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tandem.api.errors import ApiError

LATENCY_FIELD, LATENCY_HEADER = "latency_ms", "x-tandem-latency-ms"
ENERGY_FIELD, ENERGY_HEADER = "energy_j", "x-tandem-energy-j"
BEST_EFFORT_FIELD, BEST_EFFORT_HEADER = "best_effort", "x-tandem-best-effort"
TOP_K_FIELD, TOP_K_HEADER = "top_k", "x-tandem-top-k"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class BudgetDefaults:
    """Server-side defaults and limits (from the router's configuration)."""

    latency_ms: float | None = None
    energy_j: float | None = None
    best_effort: bool = False
    top_k: int = 1
    max_top_k: int = 4

    def __post_init__(self) -> None:
        for name in ("latency_ms", "energy_j"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"default {name} must be a finite number > 0, got {value}")
        if not 1 <= self.top_k <= self.max_top_k:
            raise ValueError(f"default top_k must be in 1..max_top_k={self.max_top_k}")

    def request(self) -> RequestBudget:
        """The budgets of a request that sets none."""
        return RequestBudget(self.latency_ms, self.energy_j, self.best_effort, self.top_k)


@dataclass(frozen=True)
class RequestBudget:
    """One request's budgets after defaults. None: no limit."""

    latency_ms: float | None
    energy_j: float | None
    best_effort: bool
    top_k: int

    @property
    def latency_s(self) -> float | None:
        return None if self.latency_ms is None else self.latency_ms / 1000.0

    def as_dict(self) -> dict[str, object]:
        return {
            "latency_ms": self.latency_ms,
            "energy_j": self.energy_j,
            "best_effort": self.best_effort,
            "top_k": self.top_k,
        }


def _positive(value: object, field: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"'{field}' must be a number > 0.", param=field)
    try:
        number = float(value)
    except OverflowError:  # a JSON integer too large for a float
        number = math.inf
    if not (math.isfinite(number) and number > 0):
        raise ApiError(400, f"'{field}' must be a finite number > 0, got {number}.", param=field)
    return number


def _flag(value: object, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ApiError(400, f"'{field}' must be true or false.", param=field)


def _top_k(value: object, field: str, limit: int) -> int:
    if isinstance(value, str):
        text = value.strip()
        # ASCII digits only: str.isdigit() is also true for "²", which int() rejects.
        if text.isascii() and text.isdigit() and len(text) <= 18:
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ApiError(400, f"'{field}' must be an integer from 1 to {limit}.", param=field)
    return value


def parse_budget(
    body: Mapping[str, object], headers: Mapping[str, str], defaults: BudgetDefaults
) -> RequestBudget:
    """The request's budgets from its JSON body and headers, with `defaults` for the rest.
    A JSON null in the body counts as absent."""

    def pick(field: str, header: str) -> object | None:
        value = body.get(field)
        return value if value is not None else headers.get(header)

    latency = pick(LATENCY_FIELD, LATENCY_HEADER)
    energy = pick(ENERGY_FIELD, ENERGY_HEADER)
    best = pick(BEST_EFFORT_FIELD, BEST_EFFORT_HEADER)
    k = pick(TOP_K_FIELD, TOP_K_HEADER)
    return RequestBudget(
        latency_ms=defaults.latency_ms if latency is None else _positive(latency, LATENCY_FIELD),
        energy_j=defaults.energy_j if energy is None else _positive(energy, ENERGY_FIELD),
        best_effort=defaults.best_effort if best is None else _flag(best, BEST_EFFORT_FIELD),
        top_k=defaults.top_k if k is None else _top_k(k, TOP_K_FIELD, defaults.max_top_k),
    )
