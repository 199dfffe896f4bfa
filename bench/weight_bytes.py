"""Weight bytes a decode step reads: the numerator of the memory-bandwidth bound.

Counts the nbytes of every parameter and buffer (quantized weights, scales/zeros, biases,
norms) of the modules a token runs through, each storage once: the decoder layers it
computes, the exit heads it is judged by, the final norm + LM head when it reaches full
depth, and one row of the embedding table (not the table). KV-cache reads are not weights
and are not counted. A memory-bound step reads at least these bytes once per step, whatever
the batch size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn


def module_bytes(modules: Iterable[nn.Module], skip: tuple[str, ...] = ("shortlist",)) -> int:
    """nbytes of the parameters and buffers of `modules`, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for mod in modules:
        tensors = [*mod.named_parameters(), *mod.named_buffers()]
        for name, t in tensors:
            if any(name.endswith(s) for s in skip) or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


@dataclass(frozen=True)
class WeightBytes:
    layers: tuple[int, ...]  # per decoder layer
    heads: dict[int, int]  # exit layer -> that head's bytes
    final: int  # final norm + LM head
    embed_row: int

    @classmethod
    def of(cls, model, heads: Iterable[nn.Module] = ()) -> WeightBytes:
        emb = model.embed_tokens.weight
        return cls(
            layers=tuple(module_bytes([layer]) for layer in model.layers),
            heads={h.cfg.layer: module_bytes([h]) for h in heads},
            final=module_bytes([model.norm, model.lm_head]),
            embed_row=emb.shape[1] * emb.element_size(),
        )

    @property
    def full_depth(self) -> int:
        """One token through every layer and the LM head, no exit heads."""
        return sum(self.layers) + self.final + self.embed_row

    def step(self, exit_layer: int, use_exits: bool) -> int:
        """Bytes of a batch-1 step whose token stopped at `exit_layer` (n_layers: full
        depth); with exits on, the heads at or below it were evaluated on the way."""
        n = sum(self.layers[:exit_layer]) + self.embed_row
        if use_exits:
            n += sum(b for layer, b in self.heads.items() if layer <= exit_layer)
        if exit_layer >= len(self.layers):
            n += self.final
        return n


def gguf_decode_bytes(path: Path) -> int:
    """Bytes llama.cpp reads per decoded token from a GGUF file: every tensor except the
    token embedding table (one row of it), which it reads whole when the output matrix is
    tied to it (no `output.weight`)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    total = sum(n for name, n in sizes.items() if name != "token_embd.weight")
    if "output.weight" not in sizes:
        return total + sizes["token_embd.weight"]
    return total + sizes["token_embd.weight"] // int(emb.shape[-1])


def safetensors_decode_bytes(model_dir: Path) -> int:
    """Bytes a bf16 engine (vLLM) reads per decode step from a converted model directory:
    every tensor except the embedding table (one row of it), which doubles as the LM head
    when there is no `lm_head.weight` (tied embeddings) and is then read whole."""
    from safetensors import safe_open

    sizes: dict[str, tuple[int, list[int]]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                sl = st.get_slice(name)
                shape = list(sl.get_shape())
                numel = 1
                for d in shape:
                    numel *= d
                sizes[name] = (numel * _DTYPE_BYTES[sl.get_dtype()], shape)
    emb = next(k for k in sizes if k.endswith("embed_tokens.weight"))
    total = sum(n for k, (n, _) in sizes.items() if k != emb)
    if not any(k.endswith("lm_head.weight") for k in sizes):
        return total + sizes[emb][0]
    return total + sizes[emb][0] // sizes[emb][1][0]


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I32": 4, "I64": 8}
