"""Int4 weight-only linear on Tandem's own CPU kernel (int8 activations, integer dots).

The C++ kernel (int4_gemv.cpp, built on first use with torch.utils.cpp_extension together
with int8_gemv.cpp, see tandem.runtime.kernels.extension) registers
`torch.ops.tandem_kernels.int4_mm(x, qweight, scales, mins, n, bias=None, isa=0)`:
x bf16/fp32 [M, K] -> [M, N] in x's dtype. Weight format, per group of 32 input channels,
w ~= scale * q + min with q in [0, 15] and fp16 scale/min, packed in groups of 16 output rows
(see `pack_int4` and the header of int4_gemv.cpp). `isa`: 0 auto, 1 scalar, 2 AVX2, 3 AVX-512
VNNI. A fake implementation is registered so torch.compile treats the op as opaque.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tandem.runtime.kernels.extension import best_isa, build_dir, load

__all__ = [
    "Int4KernelLinear",
    "PackedInt4",
    "best_isa",
    "build_dir",
    "int4_mm",
    "load",
    "pack_int4",
]

GROUP = 32
ROWS = 16  # output rows per packed group
ISA_AUTO, ISA_SCALAR, ISA_AVX2, ISA_AVX512 = 0, 1, 2, 3


@dataclass(frozen=True)
class PackedInt4:
    qweight: torch.Tensor  # uint8 [G, KB, 256]
    scales: torch.Tensor  # fp16 [G, KB, 16]
    mins: torch.Tensor  # fp16 [G, KB, 16]


def pack_int4(weight: torch.Tensor) -> PackedInt4:
    """Quantize w [N, K] (K % 32 == 0) per group of 32: min/max asymmetric, fp16 scale/min.

    Rows are padded to a multiple of 16. Block b of row group g is 4 chunks of 64 bytes;
    chunk i byte 4r + t = q[16g + r, 32b + 4i + t] | q[16g + r, 32b + 16 + 4i + t] << 4.
    """
    w = weight.detach().float()
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"in_features {k} is not a multiple of {GROUP}")
    n_pad = -(-n // ROWS) * ROWS
    if n_pad != n:
        w = torch.cat([w, w.new_zeros(n_pad - n, k)])
    kb = k // GROUP
    g = w.reshape(n_pad, kb, GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    if max(lo.abs().max().item(), hi.abs().max().item()) > 6.0e4:
        raise ValueError("weights exceed fp16 range")
    scale = ((hi - lo) / 15.0).clamp(min=1e-7).half()
    mn = lo.half()
    q = torch.round((g - mn.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    q = q.to(torch.uint8).reshape(n_pad // ROWS, ROWS, kb, 2, 4, 4)  # [G, r, b, half, i, t]
    q = q.permute(0, 2, 4, 1, 5, 3)  # [G, b, i, r, t, half]
    packed = (q[..., 0] | (q[..., 1] << 4)).reshape(n_pad // ROWS, kb, 256).contiguous()

    def rows_last(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n_pad // ROWS, ROWS, kb).permute(0, 2, 1).contiguous()

    return PackedInt4(packed, rows_last(scale), rows_last(mn))


def int4_mm(
    x: torch.Tensor,
    packed: PackedInt4,
    n: int,
    bias: torch.Tensor | None = None,
    isa: int = ISA_AUTO,
) -> torch.Tensor:
    """x [M, K] (bf16/fp32) @ dequantized(packed).T (+ bias) -> [M, N] in x's dtype."""
    load()
    return torch.ops.tandem_kernels.int4_mm(
        x, packed.qweight, packed.scales, packed.mins, n, bias, isa
    )


class Int4KernelLinear(nn.Module):
    """Drop-in for nn.Linear with int4 weights on Tandem's kernel (bf16 in, bf16 out).

    Every row count goes through the integer kernel: at M=512 (prefill) it beat both aten's
    int4 kernel and dequantize + bf16 matmul on the machine it was written on.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        load()
        packed = pack_int4(linear.weight)
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("mins", packed.mins)
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().bfloat16(), requires_grad=False)
        )
        self.out_features, self.in_features = linear.weight.shape

    def packed(self) -> PackedInt4:
        return PackedInt4(self.qweight, self.scales, self.mins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x if x.dim() == 2 else x.reshape(-1, shape[-1])
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        y = torch.ops.tandem_kernels.int4_mm(
            rows, self.qweight, self.scales, self.mins, self.out_features, self.bias, 0
        )
        if x.dim() != 2:
            y = y.reshape(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [out_features, in_features] this layer multiplies by."""
        return torch.ops.tandem_kernels.int4_dequant(
            self.qweight, self.scales, self.mins, self.out_features
        )
