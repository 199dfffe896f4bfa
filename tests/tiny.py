"""Tiny random models for fast unit tests (real models are in tests marked slow)."""

from __future__ import annotations

import torch

TINY_HF_CONFIGS = {
    "llama": dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        rms_norm_eps=1e-6,
        query_pre_attn_scalar=32,
        sliding_window=5,
        layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 3,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
}


def tiny_reference(arch: str, seed: int = 0):
    """A transformers model with random weights, in fp32 (the independent reference)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_HF_CONFIGS[arch])
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # gemma norms start at zero; make every weight matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2) if model_type == "gemma3_text" else p.normal_(1.0, 0.2)
            elif "bias" in name:
                p.normal_(0.0, 0.1)
    return model


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    from tandem.runtime.config import ArchConfig
    from tandem.runtime.model import DecoderModel

    ref = tiny_reference(arch, seed)
    return DecoderModel.from_state_dict(
        ArchConfig.from_hf(ref.config.to_dict()), ref.state_dict(), dtype
    )


class ByteCodec:
    """A codec for tiny models: one token per byte (+3 offset), id 2 = EOS."""

    eos_ids = frozenset({2})

    def encode(self, text: str) -> list[int]:
        return [1] + [b + 3 for b in text.encode()][:250]

    def encode_chat(self, messages) -> list[int]:
        return self.encode("".join(f"{m.role}: {m.content}\n" for m in messages))

    def decode(self, ids) -> str:
        return bytes(min(i - 3, 255) for i in ids if i >= 3).decode(errors="replace")
