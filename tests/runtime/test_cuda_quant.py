"""The int4 CUDA weight layout (tandem.runtime.cuda_quant.pack_int4_cuda) checked as data on
the CPU: against a scalar transcription of the packing kernel's own per-lane recipe (from
uint8 pairs, as torch's CUDA op takes them), against an unpacker written from the
fragment view, and against hand-computed words. tests/gpu compares it with torch's CUDA
op and kernel on a GPU."""

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
    quantize_int4_groups,
    unpack_int4_cuda,
)


def kernel_recipe(pairs_u8: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Scalar: for each (n tile, outer k tile, lane, inner k-tile pair) read four bytes of
    the [n, k/2] uint8 input and place low nibbles in bits 16-31, high nibbles in 0-15."""
    n, half_k = pairs_u8.shape
    k = half_k * 2
    nt_count, ko_count = n // 8, k // (inner_k_tiles * 16)
    out = torch.zeros(nt_count, ko_count, 32, inner_k_tiles // 2, dtype=torch.int64)
    b = pairs_u8.tolist()
    for nt in range(nt_count):
        for ko in range(ko_count):
            for t in range(32):
                row = b[nt * 8 + t // 4]
                for ikt in range(0, inner_k_tiles, 2):
                    base = (ko * inner_k_tiles + ikt) * 8  # in bytes
                    ks = [base + t % 4, base + t % 4 + 4, base + 8 + t % 4, base + 12 + t % 4]
                    v = [row[x] for x in ks]
                    word = 0
                    for i in range(4):
                        word |= (v[i] & 0xF) << (16 + 4 * i)
                        word |= (v[i] >> 4) << (4 * i)
                    out[nt, ko, t, ikt // 2] = word
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize(("n", "k", "ikt"), [(8, 32, 2), (16, 64, 4), (24, 256, 8), (16, 256, 2)])
def test_pack_matches_the_kernel_recipe(n, k, ikt):
    g = torch.Generator().manual_seed(n * k + ikt)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    packed = pack_int4_cuda(q, ikt)
    assert packed.dtype == torch.int32 and packed.shape == (n // 8, k // (ikt * 16), 32, ikt // 2)
    assert torch.equal(packed, kernel_recipe(pack_uint8_pairs(q), ikt))


@pytest.mark.parametrize("ikt", [2, 4, 8])
def test_round_trip(ikt):
    q = torch.randint(0, 16, (32, 512), generator=torch.Generator().manual_seed(ikt))
    assert torch.equal(unpack_int4_cuda(pack_int4_cuda(q, ikt), 32, 512), q.to(torch.int32))


def test_hand_computed_words():
    """Every row holds k % 16. Lane 0 (row 0, kk 0) holds k 0, 8, 16, 24 in nibbles 0-3
    and k 1, 9, 17, 25 in nibbles 4-7: values 0, 8, 0, 8, 1, 9, 1, 9 -> 0x91918080.
    Lane 5 (row 1, kk 1): k 2, 10, 18, 26 / 3, 11, 19, 27 -> 0xB3B3A2A2."""
    q = (torch.arange(32) % 16).repeat(8, 1)
    packed = pack_int4_cuda(q, 2)
    as_u32 = lambda x: int(x) & 0xFFFFFFFF  # noqa: E731
    assert as_u32(packed[0, 0, 0, 0]) == 0x91918080
    assert as_u32(packed[0, 0, 5, 0]) == 0xB3B3A2A2
    # lane 31 (row 7, kk 3): k 6, 14, 22, 30 / 7, 15, 23, 31 -> 6, 14, 6, 14, 7, 15, 7, 15
    assert as_u32(packed[0, 0, 31, 0]) == 0xF7F7E6E6


def test_uint8_pairs_high_nibble_first():
    q = torch.tensor([[1, 2, 15, 0]])
    assert pack_uint8_pairs(q).tolist() == [[0x12, 0xF0]]


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        pack_int4_cuda(torch.zeros(12, 32, dtype=torch.int32), 2)
    with pytest.raises(ValueError):
        pack_int4_cuda(torch.zeros(8, 48, dtype=torch.int32), 2)
    with pytest.raises(ValueError):
        inner_k_tiles_for(48)
    assert inner_k_tiles_for(896) == 8 and inner_k_tiles_for(96) == 2


def test_dequantized_weight_matches_the_cpu_scheme():
    """CudaInt4Linear's weight, read back from its CUDA layout on the CPU, equals the
    group quantization it was made from (and stays close to the float weight)."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 24, bias=True)
    layer = CudaInt4Linear(lin, group_size=32)
    q, scale, zero = quantize_int4_groups(lin.weight, 32)
    want = (q.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    torch.testing.assert_close(layer.dequantized(), want, atol=0.02, rtol=0.02)  # bf16 scales
    err = (layer.dequantized() - lin.weight).abs().max()
    assert err <= (lin.weight.max() - lin.weight.min()) / 15


def test_int8_reference_forward_on_cpu():
    """CudaInt8Linear's math is device-agnostic: on the CPU it equals x @ dequantized^T."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 40)
    layer = CudaInt8Linear(lin)
    x = torch.randn(3, 64)
    want = x @ layer.dequantized().t() + lin.bias
    torch.testing.assert_close(layer(x), want, atol=0.05, rtol=0.05)
