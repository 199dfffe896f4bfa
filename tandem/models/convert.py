"""Turn a GGUF file into Tandem's cache: bf16 safetensors + config.json + tokenizer files.

transformers reads GGUF (llama, qwen2, gemma3) and dequantizes it to a plain PyTorch
model; it undoes llama.cpp's q/k permutation for us. We convert once, then load the
cache in about a second. The reference model in the parity test comes from the same path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tandem.models.fetch import gguf_path
from tandem.models.registry import ModelSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CACHE_VERSION = "1"


def load_reference(spec: ModelSpec, cache_dir: Path, dtype: torch.dtype = torch.float32):
    """transformers' own model and tokenizer, loaded from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(spec, cache_dir)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), tok


def converted_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    return cache_dir / "converted" / spec.cache_name


def ensure_converted(spec: ModelSpec, cache_dir: Path) -> Path:
    """Return the converted cache directory for `spec`, converting on first use."""
    from safetensors.torch import save_file

    out = converted_dir(spec, cache_dir)
    done = out / "tandem_cache.json"
    if done.exists() and json.loads(done.read_text()).get("version") == CACHE_VERSION:
        return out
    model, tok = load_reference(spec, cache_dir, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if "lm_head.weight" in state and getattr(model.config, "tie_word_embeddings", False):
        del state["lm_head.weight"]
    save_file(state, str(out / "model.safetensors"))
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("quantization_config", None)  # plain bf16 weights now, not packed GGUF
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(str(out))
    done.write_text(json.dumps({"version": CACHE_VERSION, "model": spec.id}))
    return out
