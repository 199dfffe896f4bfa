"""Single-sequence generation loop on an ExitDecoder (tests, benchmarks, calibration)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tandem.runtime.decoder import ExitDecoder, StepResult
from tandem.runtime.sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]
    exit_layers: tuple[int, ...]
    prefill_s: float = 0.0  # wall time of the prompt's prefill (its result is the first token)


def pick(sampler: Sampler, step: StepResult) -> tuple[int, float]:
    """Sample a vocabulary id from a full-depth or an early-exit step."""
    idx, prob = sampler.sample(step.logits)
    if step.shortlist is not None:
        idx = int(step.shortlist[idx])
    return idx, prob


def generate(
    decoder: ExitDecoder,
    prompt_ids: list[int],
    params: SamplingParams,
    tau: float = 1.0,
    eos_ids: frozenset[int] = frozenset(),
) -> Generation:
    sampler = Sampler(params)
    seq = decoder.new_sequence()
    t = time.perf_counter()
    step = decoder.prefill([seq], [list(prompt_ids)])[0]
    prefill_s = time.perf_counter() - t
    ids, exits = [], []
    while True:
        tok, _ = pick(sampler, step)
        ids.append(tok)
        exits.append(step.exit_layer)
        if len(ids) >= params.max_tokens or (tok in eos_ids and not params.ignore_eos):
            break
        step = decoder.decode([seq], [tok], tau)[0]
    return Generation(tuple(ids), tuple(exits), prefill_s)
