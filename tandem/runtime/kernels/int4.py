"""Int4 weight-only linear on Tandem's own CPU kernel (int8 activations, integer dots).

The C++ kernel (int4_gemv.cpp, built on first use with torch.utils.cpp_extension together
with int8_gemv.cpp, see tandem.runtime.kernels.extension) registers
`torch.ops.tandem_kernels.int4_mm(x, qweight, scodes, mcodes, supers, n, bias=None, isa=0)`:
x bf16/fp32 [M, K] -> [M, N] in x's dtype. Weight format, per group of 32 input channels,
w ~= scale * q + min with q in [0, 15]; scale and min are 8-bit codes times fp16 units kept
per super-block of 8 groups (Q4_K's layout with 8-bit codes: 4.625 bits per weight), packed
in groups of 16 output rows (see `pack_int4` and the header of int4_gemv.cpp).
`isa`: 0 auto, 1 scalar, 2 AVX2, 3 AVX-512 VNNI. A fake implementation is registered so
torch.compile treats the op as opaque.
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
SUPER = 8  # groups per super-block (one fp16 scale unit and min unit per row)
ISA_AUTO, ISA_SCALAR, ISA_AVX2, ISA_AVX512 = 0, 1, 2, 3


@dataclass(frozen=True)
class PackedInt4:
    qweight: torch.Tensor  # uint8 [G, KB, 256]
    scodes: torch.Tensor  # uint8 [G, KB, 16]: scale = scode * d
    mcodes: torch.Tensor  # int8 [G, KB, 16]: min = mcode * dmin
    supers: torch.Tensor  # fp16 [G, SB, 2, 16]: (d, dmin) per super-block of 8 groups


def _half_at_least(t: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= each element of t (fp32): codes made against it fit."""
    h = t.half()
    return torch.where(h.float() < t, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


def pack_int4(weight: torch.Tensor) -> PackedInt4:
    """Quantize w [N, K] (K % 32 == 0) per group of 32, min/max asymmetric.

    Per group: scale = (max - min) / 15 and min. Per super-block of 8 groups (256 inputs; the
    row's last one may be shorter), fp16 units d = max scale / 255 and dmin = max |min| / 127,
    both rounded up; each group keeps scode = round(scale / d) in 1..255 and
    mcode = round(min / dmin) in -127..127, and q = round((w - mcode * dmin) / (scode * d)) in
    0..15 against the coded values.

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
    sb = -(-kb // SUPER)
    g = w.reshape(n_pad, kb, GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    if max(lo.abs().max().item(), hi.abs().max().item()) > 6.0e4:
        raise ValueError("weights exceed fp16 range")
    scale = ((hi - lo) / 15.0).clamp(min=1e-7)

    def per_super(t: torch.Tensor) -> torch.Tensor:  # [N, KB] -> max over each super-block
        return nn.functional.pad(t, (0, sb * SUPER - kb)).reshape(n_pad, sb, SUPER).amax(-1)

    def per_group(t: torch.Tensor) -> torch.Tensor:  # [N, SB] -> [N, KB]
        return t.float().repeat_interleave(SUPER, dim=1)[:, :kb]

    tiny = 2.0**-24  # the smallest fp16 subnormal
    d = _half_at_least((per_super(scale) / 255).clamp(min=tiny))
    dmin = _half_at_least((per_super(lo.abs()) / 127).clamp(min=tiny))
    d_g, dmin_g = per_group(d), per_group(dmin)
    scode = torch.round(scale / d_g).clamp(1, 255)
    mcode = torch.round(lo / dmin_g).clamp(-127, 127)
    eff_scale, eff_min = scode * d_g, mcode * dmin_g
    q = torch.round((g - eff_min[..., None]) / eff_scale[..., None]).clamp(0, 15)
    q = q.to(torch.uint8).reshape(n_pad // ROWS, ROWS, kb, 2, 4, 4)  # [G, r, b, half, i, t]
    q = q.permute(0, 2, 4, 1, 5, 3)  # [G, b, i, r, t, half]
    packed = (q[..., 0] | (q[..., 1] << 4)).reshape(n_pad // ROWS, kb, 256).contiguous()

    def rows_last(t: torch.Tensor, blocks: int) -> torch.Tensor:
        return t.reshape(n_pad // ROWS, ROWS, blocks).permute(0, 2, 1).contiguous()

    supers = torch.stack([rows_last(d, sb), rows_last(dmin, sb)], dim=2).contiguous()
    return PackedInt4(
        packed,
        rows_last(scode.to(torch.uint8), kb),
        rows_last(mcode.to(torch.int8), kb),
        supers,
    )


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
        x, packed.qweight, packed.scodes, packed.mcodes, packed.supers, n, bias, isa
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
        self.register_buffer("scodes", packed.scodes)
        self.register_buffer("mcodes", packed.mcodes)
        self.register_buffer("supers", packed.supers)
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().bfloat16(), requires_grad=False)
        )
        self.out_features, self.in_features = linear.weight.shape

    def packed(self) -> PackedInt4:
        return PackedInt4(self.qweight, self.scodes, self.mcodes, self.supers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x if x.dim() == 2 else x.reshape(-1, shape[-1])
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        y = torch.ops.tandem_kernels.int4_mm(
            rows,
            self.qweight,
            self.scodes,
            self.mcodes,
            self.supers,
            self.out_features,
            self.bias,
            0,
        )
        if x.dim() != 2:
            y = y.reshape(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [out_features, in_features] this layer multiplies by."""
        return torch.ops.tandem_kernels.int4_dequant(
            self.qweight, self.scodes, self.mcodes, self.supers, self.out_features
        )
