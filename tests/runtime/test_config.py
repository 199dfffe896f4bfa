"""ArchConfig.from_hf on small hand-written configs in transformers' (v5) layout."""

from __future__ import annotations

import json
import math

import pytest

from tandem.runtime.config import ArchConfig


def _llama(**over):
    cfg = {
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg.update(over)
    return cfg


def _qwen2(**over):
    cfg = {
        "model_type": "qwen2",
        "vocab_size": 1500,
        "hidden_size": 96,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "layer_types": ["full_attention"] * 4,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    cfg.update(over)
    return cfg


def _gemma3_text(**over):
    types = ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2
    cfg = {
        "model_type": "gemma3_text",
        "vocab_size": 2048,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": len(types),
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "layer_types": types,
        "sliding_window": 512,
        "rope_parameters": {
            "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "query_pre_attn_scalar": 256,
        "final_logit_softcapping": None,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
    }
    cfg.update(over)
    return cfg


# --- llama ------------------------------------------------------------------------------


def test_llama_fields():
    c = ArchConfig.from_hf(_llama())
    assert c.arch == "llama"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (1000, 64, 160)
    assert (c.n_layers, c.n_heads, c.n_kv_heads) == (3, 4, 2)
    assert c.head_dim == 16  # hidden / heads when head_dim is absent
    assert c.rms_eps == 1e-5
    assert c.rope_theta == (100000.0,) * 3
    assert c.sliding_window == (None,) * 3
    assert c.tie_embeddings is True
    assert c.attn_bias is False
    assert (c.qk_norm, c.sandwich_norm, c.norm_unit_offset) == (False, False, False)
    assert c.embed_scale == 1.0
    assert c.activation == "silu"
    assert c.attn_scale == pytest.approx(16**-0.5)
    assert c.final_softcap is None
    assert c.max_position == 8192
    assert c.bos_id == 1
    assert c.eos_ids == (2,)


def test_llama_explicit_head_dim_and_defaults():
    cfg = _llama(head_dim=32, attention_bias=True)
    del cfg["num_key_value_heads"], cfg["tie_word_embeddings"], cfg["max_position_embeddings"]
    del cfg["eos_token_id"]
    c = ArchConfig.from_hf(cfg)
    assert c.head_dim == 32
    assert c.attn_scale == pytest.approx(32**-0.5)
    assert c.n_kv_heads == 4  # MHA when the key is absent
    assert c.tie_embeddings is False
    assert c.attn_bias is True
    assert c.max_position == 4096
    assert c.eos_ids == ()


def test_llama_legacy_rope_theta_key():
    cfg = _llama(rope_theta=5000.0)
    del cfg["rope_parameters"]
    assert ArchConfig.from_hf(cfg).rope_theta == (5000.0,) * 3
    del cfg["rope_theta"]
    assert ArchConfig.from_hf(cfg).rope_theta == (10000.0,) * 3


def test_llama_eos_list():
    assert ArchConfig.from_hf(_llama(eos_token_id=[2, 7])).eos_ids == (2, 7)


@pytest.mark.parametrize("rope_type", ["llama3", "yarn", "linear"])
def test_unsupported_rope_type_raises(rope_type):
    cfg = _llama(rope_parameters={"rope_theta": 1e4, "rope_type": rope_type, "factor": 8.0})
    with pytest.raises(ValueError, match=rope_type):
        ArchConfig.from_hf(cfg)


# --- qwen2 ------------------------------------------------------------------------------


def test_qwen2_fields():
    c = ArchConfig.from_hf(_qwen2())
    assert c.arch == "qwen2"
    assert c.head_dim == 16
    assert c.attn_bias is True  # qwen2 always has q/k/v bias
    assert c.tie_embeddings is False
    assert c.rope_theta == (1e6,) * 4
    assert c.sliding_window == (None,) * 4
    assert c.eos_ids == (151645,)
    assert c.activation == "silu"
    assert c.embed_scale == 1.0


def test_qwen2_sliding_window_ignored_unless_enabled():
    c = ArchConfig.from_hf(_qwen2(sliding_window=4096, use_sliding_window=False))
    assert c.sliding_window == (None,) * 4


def test_qwen2_sliding_window_follows_layer_types():
    # transformers: with use_sliding_window, only layers >= max_window_layers slide
    types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    cfg = _qwen2(sliding_window=64, use_sliding_window=True, max_window_layers=2, layer_types=types)
    assert ArchConfig.from_hf(cfg).sliding_window == (None, None, 64, 64)


def test_qwen2_sliding_window_without_layer_types_uses_max_window_layers():
    cfg = _qwen2(sliding_window=64, use_sliding_window=True, max_window_layers=3)
    del cfg["layer_types"]
    assert ArchConfig.from_hf(cfg).sliding_window == (None, None, None, 64)


# --- gemma3 -----------------------------------------------------------------------------


def test_gemma3_text_fields():
    cfg = _gemma3_text()
    c = ArchConfig.from_hf(cfg)
    assert c.arch == "gemma3"
    assert c.n_layers == 8
    assert (c.n_heads, c.n_kv_heads, c.head_dim) == (4, 1, 32)
    assert (c.qk_norm, c.sandwich_norm, c.norm_unit_offset) == (True, True, True)
    assert c.activation == "gelu_tanh"
    assert c.embed_scale == pytest.approx(math.sqrt(64))
    assert c.attn_scale == pytest.approx(256**-0.5)  # query_pre_attn_scalar, not head_dim
    assert c.tie_embeddings is True
    assert c.final_softcap is None
    assert c.eos_ids == (1, 106)
    assert c.bos_id == 2
    assert c.max_position == 32768


def test_gemma3_per_layer_rope_and_windows():
    c = ArchConfig.from_hf(_gemma3_text())
    types = _gemma3_text()["layer_types"]
    assert len(c.rope_theta) == len(c.sliding_window) == c.n_layers
    for i, t in enumerate(types):
        if t == "sliding_attention":
            assert c.rope_theta[i] == 10000.0, i
            assert c.sliding_window[i] == 512, i
        else:
            assert c.rope_theta[i] == 1000000.0, i
            assert c.sliding_window[i] is None, i
    assert c.sliding_window[5] is None and c.rope_theta[5] == 1e6


def test_gemma3_softcap_and_window_size():
    c = ArchConfig.from_hf(_gemma3_text(final_logit_softcapping=30.0, sliding_window=1024))
    assert c.final_softcap == 30.0
    assert set(c.sliding_window) == {1024, None}


def test_gemma3_multimodal_wrapper_uses_text_config():
    wrapped = {"model_type": "gemma3", "text_config": _gemma3_text(), "vision_config": {}}
    assert ArchConfig.from_hf(wrapped) == ArchConfig.from_hf(_gemma3_text())


def test_gemma3_from_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_gemma3_text()))
    assert ArchConfig.from_dir(tmp_path) == ArchConfig.from_hf(_gemma3_text())


# --- errors and immutability -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mistral", "phi3", "gpt2", "gemma2"])
def test_unsupported_arch_raises(arch):
    with pytest.raises(ValueError, match="unsupported architecture"):
        ArchConfig.from_hf(_llama(model_type=arch))


def test_frozen():
    c = ArchConfig.from_hf(_llama())
    with pytest.raises(AttributeError):
        c.n_layers = 5  # type: ignore[misc]
