"""The gate's features for one request, computed in the router.

The gate was trained on smollm2's hidden states after half its layers, mean-pooled over the
prompt (`gate_data.prompt_features`); `ModelFeaturizer` computes exactly that, with the model
loaded the way `make gate-data` loaded it (registry default quantisation, no exit heads), in a
worker thread so the event loop keeps serving. The text is the completion prompt, or the chat
messages' contents joined by newlines, cut to its first `max_chars` characters (the gate saw
~100-character prompts; longer text only costs time).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

import numpy as np

from services.router.gate_data import FEATURE_MODEL, prompt_features
from tandem.models.loader import LoadedModel, LoadOptions, load_model
from tandem.models.registry import ModelRegistry
from tandem.runtime.engine_api import GenerationRequest


class Featurizer(Protocol):
    async def features(self, text: str) -> np.ndarray:
        """[D] float32 features of one prompt."""
        ...


def gate_text(request: GenerationRequest) -> str:
    if request.prompt_text is not None:
        return request.prompt_text
    return "\n".join(m.content for m in request.chat_messages or ())


class ModelFeaturizer:
    def __init__(self, lm: LoadedModel, *, max_chars: int = 1024) -> None:
        self.lm = lm
        self.max_chars = max_chars
        self._lock = asyncio.Lock()

    @classmethod
    def load(
        cls,
        model_id: str = FEATURE_MODEL,
        *,
        registry: ModelRegistry | None = None,
        cache_dir: Path = Path("model_cache"),
        max_chars: int = 1024,
    ) -> ModelFeaturizer:
        spec = (registry or ModelRegistry()).get(model_id)
        options = LoadOptions(quant=spec.default_quant, exits=False, cache_dir=cache_dir)
        return cls(load_model(spec, options), max_chars=max_chars)

    async def features(self, text: str) -> np.ndarray:
        text = text[: self.max_chars] or " "
        async with self._lock:  # one forward at a time; the model is not shared across threads
            out = await asyncio.to_thread(prompt_features, self.lm, [text])
        return out[0]


def feature_cost_ms(lm: LoadedModel, texts: list[str], max_chars: int = 1024) -> dict[str, float]:
    """The gate's feature pass per request, as the router runs it (one prompt at a time, cut
    to ``max_chars``): median and 90th percentile milliseconds over ``texts`` (after one
    warm-up pass), and the torch threads it ran on."""
    import time

    import torch

    prompt_features(lm, [texts[0][:max_chars] or " "])
    times = []
    for text in texts:
        t0 = time.perf_counter()
        prompt_features(lm, [text[:max_chars] or " "])
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.quantile(times, 0.9)),
        "requests": len(texts),
        "threads": torch.get_num_threads(),
    }
