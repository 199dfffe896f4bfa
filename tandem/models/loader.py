"""Assemble a servable model: converted weights, exit heads, quantization, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.models.convert import ensure_converted
from tandem.models.registry import ModelSpec
from tandem.models.tokenizer import TextCodec
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.exit_head import ExitHead, load_heads
from tandem.runtime.memory import own_mapped_tensors, release_free_memory
from tandem.runtime.model import DecoderModel
from tandem.runtime.quant import QuantMode, make_quantizer, quantize_model

EXITS_DIR = Path(__file__).resolve().parents[2] / "artifacts" / "exits"


@dataclass(frozen=True)
class LoadOptions:
    quant: QuantMode = "bf16"
    exits: bool = True
    max_context: int = 4096
    # The compiled decode step (tandem.runtime.compiled: static KV slots, one graph per
    # layer range). Off here, the eager reference; services turn it on (TANDEM_COMPILE).
    compiled: bool = False
    kv_slots: int = 16  # sequences with a static slot (compiled); more get dynamic caches
    # Where weights, KV and exit heads live: "cpu" or "cuda[:N]" (tandem.runtime.device
    # resolves auto / TANDEM_DEVICE). On CUDA the compiled step is a CUDA graph.
    device: str = "cpu"
    cache_dir: Path = Path("model_cache")
    exits_dir: Path = EXITS_DIR


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: DecoderModel
    heads: list[ExitHead]
    codec: TextCodec
    quant: QuantMode

    def decoder(
        self, max_deferred: int = 32, depth: int | None = None, split_only: bool = False
    ) -> ExitDecoder:
        """`depth` < n_layers: the edge half of a split model (collaborative mode);
        `split_only`: without the exits before the split (speculative collaboration).
        Standalone (no `depth`), only the spec's `served_exits`."""
        heads = self.heads
        if split_only:
            heads = [h for h in heads if h.cfg.layer == depth]
        elif depth is None and self.spec.served_exits is not None:
            heads = [h for h in heads if h.cfg.layer in self.spec.served_exits]
        return ExitDecoder(self.model, heads, max_deferred, depth=depth)


def load_model(spec: ModelSpec, opts: LoadOptions) -> LoadedModel:
    path = ensure_converted(spec, opts.cache_dir)
    model = DecoderModel.load(path, torch.bfloat16, opts.max_context)
    device = torch.device(opts.device)
    on_gpu = device.type != "cpu"
    if on_gpu:
        model.to_device(device)
    heads: list[ExitHead] = []
    head_file = opts.exits_dir / f"{spec.id}.pt"
    if opts.exits:
        if not head_file.exists():
            raise FileNotFoundError(
                f"no exit heads for {spec.id!r} at {head_file}; run `make calibrate` "
                "or start without exits"
            )
        heads, _ = load_heads(
            head_file,
            model.lm_head.weight,
            model.cfg.rms_eps,
            model.cfg.norm_unit_offset,
            torch.bfloat16,
        )
        if on_gpu:
            heads = [head.to(device) for head in heads]
    head_quant = (
        spec.default_head_quant if opts.quant == spec.default_quant else None
    ) or opts.quant
    gpu = device if on_gpu else None
    quantize_model(model, opts.quant, skip=("embed_tokens", "lm_head"), device=gpu)
    if head_quant != "bf16":
        model.lm_head = make_quantizer(head_quant, device=gpu)(model.lm_head)
    for head in heads:
        quantize_model(head, opts.quant, skip=("other", "down", "up"), device=gpu)
    own_mapped_tensors(model)  # then the weights file's map can go
    if opts.compiled:
        model.compile_decode(opts.kv_slots)
    release_free_memory()  # the bf16 weights the quantized layers replaced
    codec = TextCodec(path, model.cfg.eos_ids)
    return LoadedModel(spec, model, heads, codec, opts.quant)
