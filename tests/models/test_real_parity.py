"""Logits parity with transformers on the real GGUF models, fp32 (slow: loads models).

One model per architecture: smollm2 (llama), qwen05 (qwen2), gemma3 (gemma3). Both sides
load the same GGUF file; ours runs its own layers on the same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.models.convert import load_reference
from tandem.models.registry import ModelRegistry
from tandem.runtime.config import ArchConfig
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.generate import generate
from tandem.runtime.model import DecoderModel
from tandem.runtime.sampling import SamplingParams

CACHE = Path("model_cache")


@pytest.mark.slow
@pytest.mark.parametrize("model_id", ["smollm2", "qwen05", "gemma3"])
def test_logits_and_greedy_match_transformers(model_id):
    torch.set_num_threads(2)
    ref, tok = load_reference(ModelRegistry().get(model_id), CACHE, torch.float32)
    ours = DecoderModel.from_state_dict(
        ArchConfig.from_hf(ref.config.to_dict()), ref.state_dict(), torch.float32
    )
    prompt = tok("The capital of France is").input_ids
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0, -1]
        ref_ids = ref.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    got = ours.forward_tokens([prompt], [ours.new_kv()], [0])[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    greedy = generate(
        ExitDecoder(ours), prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    assert list(greedy.token_ids) == ref_ids
