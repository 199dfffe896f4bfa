"""Architecture config: one frozen dataclass for llama, qwen2 and gemma3 decoders."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ArchConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: tuple[float, ...]  # per layer
    sliding_window: tuple[int | None, ...]  # per layer; None = full attention
    tie_embeddings: bool
    attn_bias: bool
    qk_norm: bool
    sandwich_norm: bool  # gemma3: norms after attention and after the MLP too
    norm_unit_offset: bool  # gemma3: RMSNorm scales by (1 + w)
    embed_scale: float
    activation: str  # "silu" | "gelu_tanh"
    attn_scale: float
    final_softcap: float | None
    max_position: int
    bos_id: int | None
    eos_ids: tuple[int, ...]

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> ArchConfig:
        arch = cfg["model_type"]
        if arch == "gemma3":  # multimodal wrapper config
            cfg = cfg["text_config"]
            arch = "gemma3_text"
        n_layers = cfg["num_hidden_layers"]
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope = cfg.get("rope_parameters") or {}
        if arch == "gemma3_text":
            types = cfg["layer_types"]
            thetas = tuple(float(rope[t]["rope_theta"]) for t in types)
            windows = tuple(
                cfg["sliding_window"] if t == "sliding_attention" else None for t in types
            )
            return ArchConfig(
                arch="gemma3",
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                n_layers=n_layers,
                n_heads=n_heads,
                n_kv_heads=cfg["num_key_value_heads"],
                head_dim=head_dim,
                rms_eps=cfg["rms_norm_eps"],
                rope_theta=thetas,
                sliding_window=windows,
                tie_embeddings=cfg.get("tie_word_embeddings", True),
                attn_bias=cfg.get("attention_bias", False),
                qk_norm=True,
                sandwich_norm=True,
                norm_unit_offset=True,
                embed_scale=math.sqrt(cfg["hidden_size"]),
                activation="gelu_tanh",
                attn_scale=cfg["query_pre_attn_scalar"] ** -0.5,
                final_softcap=cfg.get("final_logit_softcapping"),
                max_position=cfg["max_position_embeddings"],
                bos_id=cfg.get("bos_token_id"),
                eos_ids=eos_ids,
            )
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"unsupported architecture {arch!r} (llama, qwen2, gemma3 are)")
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope.get('rope_type')!r}")
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        # qwen2 (as transformers): only the layers marked sliding, i.e. >= max_window_layers
        types = cfg.get("layer_types") or [
            "sliding_attention" if i >= cfg.get("max_window_layers", 0) else "full_attention"
            for i in range(n_layers)
        ]
        windows = tuple(window if t == "sliding_attention" else None for t in types)
        return ArchConfig(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads", n_heads),
            head_dim=head_dim,
            rms_eps=cfg["rms_norm_eps"],
            rope_theta=(theta,) * n_layers,
            sliding_window=windows,
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            attn_bias=arch == "qwen2" or cfg.get("attention_bias", False),
            qk_norm=False,
            sandwich_norm=False,
            norm_unit_offset=False,
            embed_scale=1.0,
            activation="silu",
            attn_scale=head_dim**-0.5,
            final_softcap=None,
            max_position=cfg.get("max_position_embeddings", 4096),
            bos_id=cfg.get("bos_token_id"),
            eos_ids=eos_ids,
        )

    @staticmethod
    def from_dir(path: Path) -> ArchConfig:
        return ArchConfig.from_hf(json.loads((path / "config.json").read_text()))
