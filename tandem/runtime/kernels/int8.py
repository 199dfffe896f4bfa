"""Int8 weight-only linear on Tandem's own CPU kernel (int8 activations, integer dots).

The C++ kernel (int8_gemv.cpp, in the same extension as the int4 kernel, see
tandem.runtime.kernels.extension) registers
`torch.ops.tandem_kernels.int8_mm(x, qweight, scales, n, bias=None, isa=0, xblock=0)`:
x bf16/fp32 [M, K] -> [M, N] in x's dtype. Weights: symmetric int8, one fp32 scale per output
channel (the same scheme as aten's `_weight_int8pack_mm` path in tandem.runtime.quant), stored
offset by +128 in groups of 16 output rows x 4 input channels (see `pack_int8` and the header
of int8_gemv.cpp). Activations are quantized to int8 inside the kernel, one scale
(d = max|x| / 127) per block of `xblock` input channels of a row (0: the whole row), so the
dot products are integer: AVX-512 VNNI vpdpbusd, else AVX2 maddubs. Int8KernelLinear uses
blocks of 128 (`activation_block`): one scale per row cost gemma3 +1.3% bits/char more than
aten's kernel (bf16 activations); blocks of 128 or 32 were within noise of it.
`isa`: 0 auto, 1 scalar, 2 AVX2, 3 AVX-512 VNNI. A fake implementation is registered so
torch.compile treats the op as opaque.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tandem.runtime.kernels.extension import best_isa, load

__all__ = ["Int8KernelLinear", "PackedInt8", "best_isa", "int8_mm", "load", "pack_int8"]

ROWS = 16  # output rows per packed group
K_MULTIPLE = 32  # in_features must be a multiple of this
ISA_AUTO, ISA_SCALAR, ISA_AVX2, ISA_AVX512 = 0, 1, 2, 3


def activation_block(k: int) -> int:
    """Input channels per activation scale: 128, or the largest of 64 / 32 dividing k."""
    return next(b for b in (128, 64, 32) if k % b == 0)


@dataclass(frozen=True)
class PackedInt8:
    qweight: torch.Tensor  # uint8 [G, K/4, 64], q + 128
    scales: torch.Tensor  # fp32 [G * 16]


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 [N, K] in [-127, 127], scale fp32 [N])."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def pack_int8(weight: torch.Tensor) -> PackedInt8:
    """Quantize w [N, K] (K % 32 == 0) and pack it for the kernel.

    Rows are padded to a multiple of 16 (scale 0). Chunk c of row group g is 64 bytes:
    byte 4r + t = q[16g + r, 4c + t] + 128.
    """
    n, k = weight.shape
    if k % K_MULTIPLE:
        raise ValueError(f"in_features {k} is not a multiple of {K_MULTIPLE}")
    q, scale = quantize_int8(weight)
    n_pad = -(-n // ROWS) * ROWS
    if n_pad != n:
        q = torch.cat([q, q.new_zeros(n_pad - n, k)])
        scale = torch.cat([scale, scale.new_zeros(n_pad - n)])
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    packed = u.reshape(n_pad // ROWS, ROWS, k // 4, 4).permute(0, 2, 1, 3)
    return PackedInt8(packed.reshape(n_pad // ROWS, k // 4, 4 * ROWS).contiguous(), scale)


def int8_mm(
    x: torch.Tensor,
    packed: PackedInt8,
    n: int,
    bias: torch.Tensor | None = None,
    isa: int = ISA_AUTO,
    xblock: int = 0,
) -> torch.Tensor:
    """x [M, K] (bf16/fp32) @ dequantized(packed).T (+ bias) -> [M, N] in x's dtype;
    activations quantized per block of `xblock` channels (0: per row)."""
    load()
    return torch.ops.tandem_kernels.int8_mm(x, packed.qweight, packed.scales, n, bias, isa, xblock)


class Int8KernelLinear(nn.Module):
    """Drop-in for nn.Linear with int8 weights on Tandem's kernel (bf16 in, bf16 out)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        load()
        packed = pack_int8(linear.weight)
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().bfloat16(), requires_grad=False)
        )
        self.out_features, self.in_features = linear.weight.shape
        self.xblock = activation_block(self.in_features)

    def packed(self) -> PackedInt8:
        return PackedInt8(self.qweight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x if x.dim() == 2 else x.reshape(-1, shape[-1])
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        y = torch.ops.tandem_kernels.int8_mm(
            rows, self.qweight, self.scales, self.out_features, self.bias, 0, self.xblock
        )
        if x.dim() != 2:
            y = y.reshape(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [out_features, in_features] this layer multiplies by."""
        return torch.ops.tandem_kernels.int8_dequant(self.qweight, self.scales, self.out_features)
