"""Tandem's int8 kernel against an fp32 reference written from the scheme, not the kernel.

Scheme: per output row, s = max|w| / 127, q = round(w / s) in [-127, 127], w_hat = s * q.
The kernel quantizes activations to int8 per block of `xblock` channels of a row
(d = max|x| / 127 of the block), so each x is off by at most d / 2 = max|x| / 254; summed over
K with random signs that is a few 1e-3 of the output's scale, plus bf16 output rounding
(2^-9). test_emulated_exactly checks the activation quantization itself against an
emulation of the scheme (fp32 output, integer sums: agreement to float rounding).
The tolerance is 1.5e-2 of max|y_ref|; a wrong weight layout, a missing +128 correction or
skipped scales are off by far more (test_tolerance_catches_wrong_weights,
test_tolerance_catches_missing_offset).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tandem.runtime.kernels import int8
from tandem.runtime.kernels.int8 import (
    Int8KernelLinear,
    PackedInt8,
    activation_block,
    int8_mm,
    pack_int8,
)

TOL = 1.5e-2  # of max|y_ref|, see module docstring


def _linear(in_f: int, out_f: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f))
    return lin


def _ref_weight(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(w / s).clamp(-127, 127) * s


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def _isas() -> list[int]:
    best = int8.best_isa()
    return [i for i in (int8.ISA_SCALAR, int8.ISA_AVX2, int8.ISA_AVX512) if i <= best]


SHAPES = [(32, 16), (96, 40), (640, 1536), (2048, 200)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 13, 40])
def test_matches_float_reference(k: int, n: int, m: int) -> None:
    lin = _linear(k, n, bias=False, seed=k + n)
    layer = Int8KernelLinear(lin)
    torch.manual_seed(m)
    x = torch.randn(m, k).bfloat16()
    ref = x.float() @ _ref_weight(lin.weight).t()
    for isa in _isas():
        for xblock in (0, 32, activation_block(k)):
            y = int8_mm(x, layer.packed(), n, None, isa, xblock)
            assert y.dtype == torch.bfloat16 and y.shape == (m, n)
            assert _rel_err(y, ref) < TOL, (isa, xblock, _rel_err(y, ref))
    assert _rel_err(layer(x), ref) < TOL


def _emulate(x: torch.Tensor, w: torch.Tensor, xblock: int) -> torch.Tensor:
    """The kernel's arithmetic in fp64: per-block int8 activations, integer dots."""
    m, k = x.shape
    g = x.float().reshape(m, k // xblock, xblock)
    mx = g.abs().amax(-1, keepdim=True)
    inv = torch.where(mx > 0, 127.0 / mx, torch.zeros_like(mx))
    xq = torch.round(g * inv)  # fp32 multiply, round half to even: as the kernel
    d = (mx / 127.0).double()
    s = w.detach().float().abs().amax(1).clamp(min=1e-8) / 127
    q = torch.round(w.detach().float() / s[:, None]).clamp(-127, 127)
    dots = torch.einsum("mbj,nbj->mnb", xq.double(), q.reshape(-1, k // xblock, xblock).double())
    return (dots * d.reshape(m, 1, -1)).sum(-1) * s.double()


@pytest.mark.parametrize("xblock", [0, 32, 64, 128])
def test_emulated_exactly(xblock: int) -> None:
    k, n = 512, 80
    lin = _linear(k, n, bias=False, seed=3)
    packed = pack_int8(lin.weight)
    x = torch.randn(5, k)
    x[:, 7] *= 40  # an outlier channel: per-row and per-block scales differ a lot
    ref = _emulate(x, lin.weight, xblock or k)
    for isa in _isas():
        y = int8_mm(x, packed, n, None, isa, xblock)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_blocks_beat_one_scale_per_row_on_outliers() -> None:
    """With an outlier channel, one scale per row coarsens every other activation; blocks
    keep the coarse step to the outlier's block (what Int8KernelLinear uses): 1 of 8 blocks,
    so about sqrt(8) less error."""
    lin = _linear(1024, 64, bias=False, seed=4)
    packed = pack_int8(lin.weight)
    x = torch.randn(4, 1024)
    x[:, 5] = 300.0
    ref = x @ _ref_weight(lin.weight).t()
    per_row = _rel_err(int8_mm(x, packed, 64, None, 0, 0), ref)
    per_block = _rel_err(int8_mm(x, packed, 64, None, 0, 128), ref)
    assert per_block < per_row / 2, (per_block, per_row)


def test_paths_compute_the_same_integers() -> None:
    """Scalar, AVX2 (signed maddubs) and AVX-512 VNNI (offset dpbusd) sum the same integer
    products and scale them the same way: fp32 outputs agree to rounding."""
    lin = _linear(1024, 333, bias=True)
    layer = Int8KernelLinear(lin)
    x = torch.randn(9, 1024)
    outs = [int8_mm(x, layer.packed(), 333, layer.bias, isa) for isa in _isas()]
    assert len(outs) >= 2, "no SIMD path on this machine"
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-6, atol=1e-5)


def test_extreme_weights_and_activations_do_not_saturate() -> None:
    """Weights at +-127 and activations at +-127 everywhere: AVX2's maddubs pairs reach
    2 * 127 * 127 (fits int16), VNNI's offset weights reach 255; exact integer results."""
    k, n = 4096, 32
    w = torch.where(torch.rand(n, k) < 0.5, -1.0, 1.0)
    x = torch.where(torch.rand(2, k) < 0.5, -1.0, 1.0)
    x[1] = w[5]  # a row whose dot with weight row 5 is +K
    packed = pack_int8(w)
    ref = x @ w.t()
    for isa in _isas():
        y = int8_mm(x, packed, n, None, isa)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-3)
        assert y[1, 5].item() == pytest.approx(k)


def test_tolerance_catches_wrong_weights() -> None:
    """The test above can fail: a few flipped weights per row move y by more than TOL."""
    lin = _linear(256, 64, bias=False)
    packed = pack_int8(lin.weight)
    x = torch.randn(1, 256).bfloat16()
    ref = x.float() @ _ref_weight(lin.weight).t()
    bad = packed.qweight.clone()
    bad[:, 0:8] ^= 0x80  # flip the sign of 32 weights per row
    for isa in _isas():
        assert _rel_err(int8_mm(x, PackedInt8(bad, packed.scales), 64, None, isa), ref) > TOL


def test_tolerance_catches_missing_offset() -> None:
    """Activations with a large mean: forgetting the +128 correction would be far off."""
    lin = _linear(512, 48, bias=False)
    packed = pack_int8(lin.weight)
    x = (torch.randn(2, 512) + 3.0).bfloat16()
    ref = x.float() @ _ref_weight(lin.weight).t()
    shifted = x.float() @ (_ref_weight(lin.weight) + 128 * packed.scales[:48, None]).t()
    assert _rel_err(shifted, ref) > 100 * TOL
    for isa in _isas():
        assert _rel_err(int8_mm(x, packed, 48, None, isa), ref) < TOL


def test_dequantized_is_the_scheme() -> None:
    lin = _linear(512, 50, bias=False)
    layer = Int8KernelLinear(lin)
    deq = layer.dequantized()
    assert deq.shape == (50, 512) and deq.dtype == torch.float32
    torch.testing.assert_close(deq, _ref_weight(lin.weight), rtol=1e-6, atol=1e-7)


def test_bias_and_leading_shape() -> None:
    lin = _linear(128, 37, bias=True)
    layer = Int8KernelLinear(lin)
    assert (layer.in_features, layer.out_features) == (128, 37)
    x = torch.randn(2, 3, 128).bfloat16()
    y = layer(x)
    assert y.shape == (2, 3, 37) and y.dtype == torch.bfloat16
    ref = x.float() @ _ref_weight(lin.weight).t() + lin.bias.detach().bfloat16().float()
    assert _rel_err(y, ref) < TOL
    y32 = layer(x.float())
    assert y32.dtype == torch.float32 and _rel_err(y32, ref) < TOL


def test_prefill_rows() -> None:
    lin = _linear(640, 70, bias=True)
    layer = Int8KernelLinear(lin)
    x = torch.randn(300, 640).bfloat16()
    ref = x.float() @ _ref_weight(lin.weight).t() + lin.bias.detach().bfloat16().float()
    assert _rel_err(layer(x), ref) < TOL


def test_zero_rows() -> None:
    layer = Int8KernelLinear(_linear(64, 16, bias=False))
    y = layer(torch.zeros(2, 64).bfloat16())
    assert torch.equal(y, torch.zeros(2, 16, dtype=torch.bfloat16))
    assert layer(torch.zeros(0, 64).bfloat16()).shape == (0, 16)


def test_state_dict_roundtrip() -> None:
    lin = _linear(128, 20, bias=True)
    a = Int8KernelLinear(lin)
    b = Int8KernelLinear(_linear(128, 20, bias=True, seed=7))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 128).bfloat16()
    torch.testing.assert_close(a(x), b(x))


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        pack_int8(torch.randn(8, 40))
    layer = Int8KernelLinear(_linear(64, 16, bias=False))
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, 96).bfloat16())
    with pytest.raises(RuntimeError):
        int8_mm(torch.randn(1, 64), layer.packed(), 40)  # n does not match the row groups
    with pytest.raises(RuntimeError):
        int8_mm(torch.randn(1, 64), layer.packed(), 16, None, 0, 48)  # 48 is no block size


def test_torch_compile_treats_the_op_as_opaque() -> None:
    """A module around Int8KernelLinear compiles (fake impl) and gives the eager result."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = Int8KernelLinear(_linear(64, 128, bias=True, seed=1))
            self.down = Int8KernelLinear(_linear(128, 64, bias=False, seed=2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    block = Block()
    x = torch.randn(3, 64).bfloat16()
    with torch.inference_mode():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, dynamic=True)
        torch.testing.assert_close(compiled(x), eager, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(compiled(x[:1]), block(x[:1]), rtol=2e-2, atol=2e-2)
