from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bench.weight_bytes import WeightBytes, module_bytes, safetensors_decode_bytes
from tandem.runtime.quant import Int4Linear, Int8Linear


@dataclass(frozen=True)
class _HeadCfg:
    layer: int


class _Head(nn.Module):
    def __init__(self, layer: int, d: int, k: int) -> None:
        super().__init__()
        self.cfg = _HeadCfg(layer)
        self.proj = nn.Linear(d, k, bias=False)
        self.register_buffer("shortlist", torch.zeros(k, dtype=torch.long))


class _Model(nn.Module):
    def __init__(self, d: int = 64, vocab: int = 100, n_layers: int = 3) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def test_module_bytes_counts_each_storage_once_and_skips_shortlist():
    a = nn.Linear(8, 4, bias=False)
    b = nn.Linear(8, 4, bias=False)
    b.weight = a.weight  # tied
    assert module_bytes([a, b]) == 8 * 4 * 4
    head = _Head(1, 8, 5)
    assert module_bytes([head]) == 8 * 5 * 4  # the long shortlist is not a weight read


def test_quantized_linears_count_weights_and_scales():
    lin = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    assert module_bytes([Int8Linear(lin)]) == 64 * 32 + 32 * 2  # int8 + bf16 per-row scale
    q4 = Int4Linear(lin, group_size=32)
    # half a byte per weight + bf16 (scale, zero) per group of 32 inputs per output
    assert module_bytes([q4]) == 64 * 32 // 2 + (64 // 32) * 32 * 2 * 2


def test_step_bytes_by_exit_layer():
    m = _Model()
    heads = [_Head(1, 64, 10), _Head(2, 64, 10)]
    wb = WeightBytes.of(m, heads)
    layer = 64 * 64 * 4
    final = 64 * 4 + 64 * 100 * 4
    row = 64 * 4
    assert wb.layers == (layer, layer, layer)
    assert wb.full_depth == 3 * layer + final + row
    assert wb.step(3, use_exits=False) == wb.full_depth
    head = 64 * 10 * 4
    assert wb.step(3, use_exits=True) == wb.full_depth + 2 * head
    assert wb.step(1, use_exits=True) == layer + row + head  # no LM head, one head passed


@pytest.mark.parametrize("tied", [True, False])
def test_safetensors_decode_bytes(tmp_path, tied):
    state = {
        "model.embed_tokens.weight": torch.zeros(100, 16, dtype=torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(16, 32, dtype=torch.bfloat16),
    }
    if not tied:
        state["lm_head.weight"] = torch.zeros(100, 16, dtype=torch.bfloat16)
    save_file(state, str(tmp_path / "model.safetensors"))
    layer = 16 * 32 * 2
    table = 100 * 16 * 2
    expected = layer + table if tied else layer + table + 16 * 2
    assert safetensors_decode_bytes(tmp_path) == expected
