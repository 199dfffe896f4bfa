"""A small MoE² world for tests: three synthetic experts (test_gate's), a gate trained on two
feature clusters ("prose" / "code"), their subset-loss table, cost profiles and a featurizer
that maps a prompt to its cluster. No models: every number is synthetic and stated here."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from services.router.gate import Gate, GateConfig, train_gate
from services.router.moe2 import Moe2Selector
from services.router.planner import SubsetLossTable
from services.router.predictor import Predictor
from services.router.profiles import CPU, JETSON_AGX_ORIN, RTX_4090, ExpertSpec
from services.router.telemetry import LatencyTelemetry
from tests.services.router.test_gate import EXPERTS, synthetic

DIM = 8
# prose_pro: a slow-ish Jetson expert; code_pro: fast but power-hungry GPU; meh: cheap CPU.
SPECS = {
    "prose_pro": ExpertSpec("prose_pro", JETSON_AGX_ORIN, 0.020, 0.002),
    "code_pro": ExpertSpec("code_pro", RTX_4090, 0.020, 0.002),
    "meh": ExpertSpec("meh", CPU, 0.005, 0.0005),
}


def trained_gate() -> tuple[Gate, SubsetLossTable]:
    train, val = synthetic(120, DIM, seed=0), synthetic(60, DIM, seed=1)
    gate = train_gate(train, None, 0, GateConfig(pca=0, steps=200), val)
    return gate, SubsetLossTable.compute(gate, val)


def predictor(specs: dict[str, ExpertSpec] | None = None) -> Predictor:
    return Predictor(specs or SPECS, LatencyTelemetry())


def selector(
    healthy: Iterable[str] = EXPERTS, specs: dict[str, ExpertSpec] | None = None
) -> Moe2Selector:
    gate, table = trained_gate()
    up = set(healthy)
    return Moe2Selector(gate, table, predictor(specs), lambda: up)


class ClusterFeaturizer:
    """Prompts that mention code land in the code cluster, the rest in the prose cluster."""

    def __init__(self) -> None:
        self.calls = 0

    async def features(self, text: str) -> np.ndarray:
        self.calls += 1
        sign = 1.0 if "code" in text.lower() else -1.0
        return np.full(DIM, sign, dtype=np.float32)
