"""The cloud's share of a split model's weights: layers [split, L), the final norm and the
LM head. Layers [0, split) and the token embedding are dropped after loading (the edge
runs them); a tied LM head keeps its own reference to the shared matrix, so it survives.
Quantization (int8/int4) runs after the drop, on the upper layers only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tandem.models.convert import ensure_converted
from tandem.models.registry import ModelSpec
from tandem.runtime.memory import own_mapped_tensors, release_free_memory
from tandem.runtime.model import DecoderModel
from tandem.runtime.quant import QuantMode, quantize_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpperHalf:
    model: DecoderModel
    split: int
    nbytes: int  # weights held after the drop (and quantization)
    full_nbytes: int  # weights of the whole model as loaded (bf16)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def drop_lower_layers(model: DecoderModel, split: int) -> DecoderModel:
    """Free layers [0, split) and the embedding in place; `model.dtype` still answers and
    `run_layers(.., split, L)` and `logits` work as before. `embed` no longer does."""
    if not 0 < split < model.cfg.n_layers:
        raise ValueError(f"split {split} must be inside (0, {model.cfg.n_layers})")
    model.drop_layers(range(split))
    d, dtype = model.cfg.hidden_size, model.dtype
    model.embed_tokens = nn.Embedding(0, d, _weight=torch.empty(0, d, dtype=dtype))
    return model


def load_upper_half(
    spec: ModelSpec,
    split: int | None,
    quant: QuantMode = "bf16",
    max_context: int = 4096,
    cache_dir: Path = Path("model_cache"),
    device: str = "cpu",
) -> UpperHalf:
    """Load `spec` (converted weights from the cache), keep [split, L) (default: L // 2),
    on `device` (cpu or cuda[:N]: the upper layers move there after the drop)."""
    model = DecoderModel.load(ensure_converted(spec, cache_dir), torch.bfloat16, max_context)
    full = tensor_bytes(model)
    split = model.cfg.n_layers // 2 if split is None else split
    drop_lower_layers(model, split)
    gpu = torch.device(device) if torch.device(device).type == "cuda" else None
    if gpu is not None:
        model.to_device(gpu)
    quantize_model(model, quant, device=gpu)
    own_mapped_tensors(model)  # then the weights file's map (the lower half too) can go
    release_free_memory()
    held = tensor_bytes(model)
    log.info(
        "%s: holding layers [%d, %d) + norm + lm_head (%s): %.0f MiB of %.0f MiB",
        spec.id,
        split,
        model.cfg.n_layers,
        quant,
        held / 2**20,
        full / 2**20,
    )
    return UpperHalf(model, split, held, full)
