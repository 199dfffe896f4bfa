"""The runtime on CUDA (skipped without a GPU; `make gpu-check` runs these on one).

Tiny random models (tests/tiny.py, transformers as the independent reference): CUDA fp32
equals the CPU fp32 reference; bf16 on CUDA stays close to it; the int4/int8 CUDA matmuls
equal x @ their dequantized weight; the packing equals torch's own CUDA packing op; greedy
tokens of a quantized model equal a bf16 model holding the same dequantized weights; the
CUDA-graph decode step equals the eager one. No fastapi, no model wheels.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tandem.runtime.cuda_quant import (
    CudaInt4Linear,
    CudaInt8Linear,
    inner_k_tiles_for,
    pack_int4_cuda,
    pack_uint8_pairs,
)
from tandem.runtime.decoder import ExitDecoder
from tandem.runtime.kv_slots import SlotKV
from tandem.runtime.quant import quantize_model
from tests.tiny import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n,), generator=g).tolist()


def _on_gpu(model):
    return model.to_device(CUDA)


def _decode_logits(model, prompts, steps: int) -> list[list[torch.Tensor]]:
    """Prefill, then `steps` decode steps feeding fixed tokens; every step's logits (CPU)."""
    dec = ExitDecoder(model)
    seqs = [dec.new_sequence() for _ in prompts]
    dec.prefill(seqs, prompts)
    out = []
    for step in range(steps):
        res = dec.decode(seqs, _ids(len(prompts), 100 + step))
        out.append([r.logits.float().cpu() for r in res])
    return out


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    dec = ExitDecoder(model)
    s = dec.new_sequence()
    tok = int(dec.prefill([s], [prompt])[0].logits.argmax())
    toks = [tok]
    for _ in range(steps - 1):
        tok = int(dec.decode([s], [tok])[0].logits.argmax())
        toks.append(tok)
    return toks


def test_fp32_cuda_equals_cpu_reference(arch):
    cpu = tiny_model(arch)
    gpu = _on_gpu(tiny_model(arch))
    prompts = [_ids(5, 1), _ids(9, 2)]
    for got, want in zip(
        _decode_logits(gpu, prompts, 6), _decode_logits(cpu, prompts, 6), strict=True
    ):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)


def test_bf16_cuda_close_to_cpu_fp32(arch):
    cpu = tiny_model(arch)
    gpu = _on_gpu(tiny_model(arch, torch.bfloat16))
    prompts = [_ids(7, 3)]
    for got, want in zip(
        _decode_logits(gpu, prompts, 4), _decode_logits(cpu, prompts, 4), strict=True
    ):
        err = (got[0] - want[0]).abs().max()
        assert err <= 0.05 * want[0].abs().max() + 0.05


@pytest.mark.parametrize("ikt", [2, 4, 8])
def test_int4_packing_equals_torch_cuda_op(ikt):
    q = torch.randint(0, 16, (64, 512), generator=torch.Generator().manual_seed(ikt))
    mine = pack_int4_cuda(q, ikt)
    theirs = torch.ops.aten._convert_weight_to_int4pack(pack_uint8_pairs(q).to(CUDA), ikt)
    assert torch.equal(mine, theirs.cpu())


@pytest.mark.parametrize(
    ("rows", "n", "k", "group"), [(1, 64, 256, 32), (8, 96, 896, 64), (32, 256, 1536, 128)]
)
def test_int4_cuda_matmul_equals_dequantized(rows, n, k, group):
    torch.manual_seed(rows)
    lin = nn.Linear(k, n, bias=True).to(CUDA)
    layer = CudaInt4Linear(lin, group).to(CUDA)
    assert layer.inner_k_tiles == inner_k_tiles_for(k)
    x = torch.randn(rows, k, device=CUDA, dtype=torch.bfloat16)
    want = x.float() @ layer.dequantized().t() + layer.bias.float()
    got = layer(x).float()
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.02)


@pytest.mark.parametrize("rows", [1, 8, 32])
def test_int8_cuda_matmul_equals_dequantized(rows):
    torch.manual_seed(rows)
    lin = nn.Linear(512, 192, bias=False).to(CUDA)
    layer = CudaInt8Linear(lin).to(CUDA)
    x = torch.randn(rows, 512, device=CUDA, dtype=torch.bfloat16)
    want = x.float() @ layer.dequantized().t()
    torch.testing.assert_close(
        layer(x).float(), want, atol=0.02 * want.abs().max().item(), rtol=0.02
    )


def _with_dequantized_weights(quantized, plain):
    """Put each quantized layer's dequantized weight into the bf16 model's nn.Linear."""
    for name, mod in quantized.named_modules():
        if isinstance(mod, CudaInt4Linear | CudaInt8Linear):
            lin = plain.get_submodule(name)
            lin.weight.data = mod.dequantized().to(lin.weight.dtype)
    return plain


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_greedy_equals_bf16_with_the_same_weights(mode):
    """The kernel is the only difference: greedy tokens over 12 steps are the same."""
    qmodel = _on_gpu(tiny_model("qwen2", torch.bfloat16))
    quantize_model(qmodel, mode, skip=("embed_tokens", "lm_head"), device=CUDA)
    assert any(isinstance(m, CudaInt4Linear | CudaInt8Linear) for m in qmodel.modules())
    plain = _with_dequantized_weights(qmodel, _on_gpu(tiny_model("qwen2", torch.bfloat16)))
    prompt = _ids(6, 9)
    assert _greedy(qmodel, prompt, 12) == _greedy(plain, prompt, 12)
    # and every step's logits on fed tokens (greedy on a random model can repeat one token)
    for got, want in zip(
        _decode_logits(qmodel, [prompt], 6), _decode_logits(plain, [prompt], 6), strict=True
    ):
        assert (got[0] - want[0]).abs().max() <= 0.03 * want[0].abs().max() + 0.02


def test_cuda_graph_decode_equals_eager(arch):
    eager = _on_gpu(tiny_model(arch))
    fast = _on_gpu(tiny_model(arch))
    fast.compile_decode(4)
    assert type(fast.compiled).__name__ == "CudaGraphDecode"
    prompts = [_ids(3, 1), _ids(9, 2), _ids(12, 3)]
    decs = ExitDecoder(eager), ExitDecoder(fast)
    seqs = [[d.new_sequence() for _ in prompts] for d in decs]
    assert all(isinstance(s.kv, SlotKV) for s in seqs[1])
    assert all(s.kv.pool.k[0].is_cuda for s in seqs[1])
    for d, ss in zip(decs, seqs, strict=True):
        d.prefill(ss, prompts)
    for step in range(10):
        toks = _ids(3, 100 + step)
        want = decs[0].decode(seqs[0], toks)
        got = decs[1].decode(seqs[1], toks)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.logits, w.logits, atol=1e-3, rtol=1e-3)
    assert fast.compiled._captured, "no CUDA graph was captured"
    # one row less (a finished sequence): the padded 2-row graph, same answers
    want = decs[0].decode(seqs[0][:2], [5, 6])
    got = decs[1].decode(seqs[1][:2], [5, 6])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.logits, w.logits, atol=1e-3, rtol=1e-3)


def test_kv_and_heads_live_on_the_gpu():
    model = _on_gpu(tiny_model("llama", torch.bfloat16))
    kv = model.new_kv()
    assert kv._k[0].is_cuda and model.rope.tables(model.layers[0].theta)[0].is_cuda
