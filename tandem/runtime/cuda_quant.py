"""Weight-only quantized linear layers for CUDA.

- int4: the same scheme as the CPU path (tandem.runtime.quant.Int4Linear): asymmetric
  min/max per group of input channels, q in [0, 15], dequantized as
  (q - 8) * scale + zero, scales and zeros as [in/group, out, 2] bf16. The matmul is
  torch's CUDA tensor-core kernel `aten._weight_int4pack_mm` (sm80+), whose weight layout
  is not the CPU one: `pack_int4_cuda` writes it (pure torch, so the CPU tests check it
  as data; tests/gpu compare it with `aten._convert_weight_to_int4pack` on a GPU).
- int8: symmetric, one scale per output channel; the matmul dequantizes (bf16 weights,
  then the scale on the output), which inductor fuses under torch.compile.

The int4 tile layout (m16n8k16 "B" fragments, kNTileSize 8, kKTileSize 16): the packed
tensor is int32 [n / 8, k / (inner_k_tiles * 16), 32, inner_k_tiles / 2]. Entry
[nt, ko, lane, p] holds, for output row n = nt * 8 + lane // 4 and the two k-tiles
kt = ko * inner_k_tiles + 2p and kt + 1, the eight 4-bit values at k offsets
(kk = lane % 4):
  nibble 0..3 (bits 0-15):  tile kt: 2kk, 2kk + 8;  tile kt + 1: 2kk, 2kk + 8
  nibble 4..7 (bits 16-31): the same four positions + 1
i.e. nibble s = 4 * lo + 2 * tile + h holds k = 16 * tile + 8 * h + 2 * kk + lo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.runtime.quant import Int8Linear

CUDA_GROUP_SIZES = (32, 64, 128, 256)  # what the CUDA kernel accepts


def quantize_int4_groups(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [n, k] -> (q [n, k] int32 in [0, 15], scale [n, k/g], zero [n, k/g]) in fp32,
    with w ~ (q - 8) * scale + zero."""
    w = w.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group {group_size}")
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo + 8.0 * scale


def inner_k_tiles_for(k: int) -> int:
    """The largest inner k-tile count (8, 4, 2) that divides k into whole super-tiles."""
    for ikt in (8, 4, 2):
        if k % (ikt * 16) == 0:
            return ikt
    raise ValueError(f"in_features {k} is not a multiple of 32 (the int4 CUDA kernel's minimum)")


def pack_uint8_pairs(q: torch.Tensor) -> torch.Tensor:
    """q [n, k] in [0, 15] -> [n, k/2] uint8, even k in the high nibble: the input that
    `aten._convert_weight_to_int4pack` takes on CUDA."""
    q = q.to(torch.uint8)
    return ((q[:, ::2] << 4) | q[:, 1::2]).contiguous()


def pack_int4_cuda(q: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """q [n, k] in [0, 15] -> int32 [n/8, k/(ikt*16), 32, ikt/2], the layout of torch's
    CUDA `_weight_int4pack_mm` (module docstring). Runs on q's device."""
    n, k = q.shape
    if inner_k_tiles not in (2, 4, 8):
        raise ValueError(f"inner_k_tiles must be 2, 4 or 8, not {inner_k_tiles}")
    if n % 8 or k % (inner_k_tiles * 16):
        raise ValueError(f"[{n}, {k}] does not tile by 8 x {inner_k_tiles * 16}")
    pairs = inner_k_tiles // 2
    # k = ((ko * pairs + p) * 2 + tile) * 16 + h * 8 + kk * 2 + lo;  n = nt * 8 + nn
    v = q.to(torch.int64).reshape(n // 8, 8, k // (inner_k_tiles * 16), pairs, 2, 2, 4, 2)
    # -> [nt, ko, nn, kk, p, lo, tile, h]: lane = nn * 4 + kk, nibble = lo * 4 + tile * 2 + h
    v = v.permute(0, 2, 1, 6, 3, 7, 4, 5).reshape(n // 8, -1, 32, pairs, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    word = (v << shifts).sum(-1)  # < 2**32
    word = torch.where(word >= 2**31, word - 2**32, word)  # two's complement
    return word.to(torch.int32).contiguous()


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[n, k/g] each -> [k/g, n, 2] bf16 (scale, zero), the kernels' qScaleAndZeros."""
    return torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)


class CudaInt4Linear(nn.Module):
    """int4 weight-only linear on `aten._weight_int4pack_mm` (CUDA, bf16 activations)."""

    def __init__(self, linear: nn.Linear, group_size: int = 32) -> None:
        super().__init__()
        if group_size not in CUDA_GROUP_SIZES:
            raise ValueError(f"group {group_size}: the CUDA kernel takes {CUDA_GROUP_SIZES}")
        w = linear.weight.detach()
        out_f, in_f = w.shape
        q, scale, zero = quantize_int4_groups(w, group_size)
        self.inner_k_tiles = inner_k_tiles_for(in_f)
        self.register_buffer("qweight", pack_int4_cuda(q, self.inner_k_tiles))
        self.register_buffer("scales_zeros", scales_and_zeros(scale, zero))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().bfloat16())
        self.group_size = group_size
        self.out_features, self.in_features = out_f, in_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm(
            x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(),
            self.qweight,
            self.group_size,
            self.scales_zeros,
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel computes with, fp32 [out, in] (for tests)."""
        q = unpack_int4_cuda(self.qweight, self.out_features, self.in_features).float()
        sz = self.scales_zeros.float()  # [k/g, n, 2]
        scale = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)
        zero = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        return (q - 8.0) * scale + zero


def unpack_int4_cuda(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of `pack_int4_cuda`, written from the fragment view (which lane's
    register holds which B element) rather than by reversing the permute: int32 [n, k]."""
    nt_count, ko_count, lanes, pairs = packed.shape
    if lanes != 32 or nt_count * 8 != n or ko_count * pairs * 2 * 16 != k:
        raise ValueError(f"packed {tuple(packed.shape)} does not hold [{n}, {k}]")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(n, k, dtype=torch.int32, device=packed.device)
    lane = torch.arange(32, device=packed.device)
    for nt in range(nt_count):
        rows = nt * 8 + lane // 4
        for ko in range(ko_count):
            for p in range(pairs):
                w = words[nt, ko, :, p]
                for pair in range(4):  # registers b0b1 / b2b3 of tile 0, then of tile 1
                    tile, upper = divmod(pair, 2)
                    base = (ko * pairs + p) * 32 + tile * 16 + upper * 8 + (lane % 4) * 2
                    out[rows, base] = ((w >> (4 * pair)) & 0xF).to(torch.int32)
                    out[rows, base + 1] = ((w >> (4 * pair + 16)) & 0xF).to(torch.int32)
    return out


class CudaInt8Linear(Int8Linear):
    """int8 weight-only linear: Int8Linear's weights (symmetric per output channel); bf16
    matmul on the dequantized weight, the scale applied to the output (fused by inductor
    when compiled), since aten's int8pack kernel is CPU-only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.qweight.to(torch.bfloat16)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]


def make_cuda_quantizer(mode: str, group_size: int = 32):
    """The CUDA counterpart of tandem.runtime.quant.make_quantizer."""
    if mode == "int8":
        return CudaInt8Linear
    if mode == "int4":
        return lambda lin: CudaInt4Linear(lin, group_size)
    raise ValueError(f"no CUDA quantizer for {mode!r}")
