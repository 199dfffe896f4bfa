"""Tandem's int4 kernel against an fp32 reference written from the scheme, not the kernel.

Scheme: per group of 32 input channels, lo/hi = min/max, scale = (hi - lo) / 15 and min = lo.
Per super-block of 8 groups, fp16 units d >= max scale / 255 and dmin >= max |lo| / 127 (the
smallest such fp16 values); scale and min are kept as round(scale / d) * d (code 1..255) and
round(lo / dmin) * dmin (code -127..127), q = round((w - min) / scale) in 0..15,
w_hat = scale * q + min.
The kernel quantizes activations per block of 32 to int8 (d = max|x| / 127), so each x is
off by at most d / 2 = max|x| / 254 of its block; summed over K with random signs this is
~ 0.4% / sqrt(3) of a typical |x|, i.e. a few 1e-3 of the output's scale. The tolerance is
1e-2 of max|y_ref|, while skipping the activation quantization altogether would be off by
much more on the outlier test below (checked by test_tolerance_catches_wrong_weights).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tandem.runtime.kernels import int4
from tandem.runtime.kernels.int4 import Int4KernelLinear, int4_mm, pack_int4

GROUP = 32
SUPER = 8  # groups per super-block
TOL = 1e-2  # of max|y_ref|, see module docstring


def _linear(in_f: int, out_f: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f))
    return lin


def _half_up(t: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 >= t, found by trying the fp16 neighbours of t (not by nextafter)."""
    h = t.half().float()
    up = (t.half().view(torch.int16) + 1).view(torch.float16).float()  # t > 0 here
    return torch.where(h < t, up, h)


def _ref_weight(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    g = w.float().reshape(n, -1, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-7)
    d_ref = torch.empty_like(scale)
    dmin_ref = torch.empty_like(scale)
    for s0 in range(0, scale.shape[1], SUPER):
        sl = slice(s0, s0 + SUPER)
        d_ref[:, sl] = _half_up((scale[:, sl].amax(-1, keepdim=True) / 255).clamp(min=2**-24))
        dmin_ref[:, sl] = _half_up((lo[:, sl].abs().amax(-1, keepdim=True) / 127).clamp(min=2**-24))
    scale = torch.round(scale / d_ref).clamp(1, 255) * d_ref
    mn = torch.round(lo / dmin_ref).clamp(-127, 127) * dmin_ref
    q = torch.round((g - mn[..., None]) / scale[..., None]).clamp(0, 15)
    return (q * scale[..., None] + mn[..., None]).reshape(w.shape)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def _isas() -> list[int]:
    best = int4.best_isa()
    return [i for i in (int4.ISA_SCALAR, int4.ISA_AVX2, int4.ISA_AVX512) if i <= best]


SHAPES = [(64, 16), (96, 40), (1536, 200), (896, 1152)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 16, 40])
def test_matches_float_reference(k: int, n: int, m: int) -> None:
    lin = _linear(k, n, bias=False, seed=k + n)
    layer = Int4KernelLinear(lin)
    torch.manual_seed(m)
    x = torch.randn(m, k).bfloat16()
    ref = x.float() @ _ref_weight(lin.weight).t()
    for isa in _isas():
        y = int4_mm(x, layer.packed(), n, None, isa)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert _rel_err(y, ref) < TOL, (isa, _rel_err(y, ref))
    assert _rel_err(layer(x), ref) < TOL


def test_paths_agree() -> None:
    """All SIMD paths do the same integer sums; only fp32 accumulation order differs."""
    lin = _linear(1536, 333, bias=True)
    layer = Int4KernelLinear(lin)
    x = torch.randn(5, 1536)
    outs = [int4_mm(x, layer.packed(), 333, layer.bias, isa) for isa in _isas()]
    assert len(outs) >= 2, "no SIMD path on this machine"
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-5, atol=1e-4)


def test_tolerance_catches_wrong_weights() -> None:
    """The test above can fail: one flipped nibble per row moves y by more than TOL."""
    lin = _linear(256, 64, bias=False)
    packed = pack_int4(lin.weight)
    x = torch.randn(1, 256).bfloat16()
    ref = x.float() @ _ref_weight(lin.weight).t()
    bad = packed.qweight.clone()
    bad[:, :, 0:64] ^= 0x88  # flip the top bit of 8 weights per row
    y = int4_mm(x, int4.PackedInt4(bad, packed.scodes, packed.mcodes, packed.supers), 64)
    assert _rel_err(y, ref) > TOL


def test_dequantized_within_quantization_error() -> None:
    lin = _linear(512, 50, bias=False)
    layer = Int4KernelLinear(lin)
    w = lin.weight.detach()
    deq = layer.dequantized()
    assert deq.shape == (50, 512) and deq.dtype == torch.float32
    torch.testing.assert_close(deq, _ref_weight(w), rtol=0, atol=1e-6)
    step = (w.reshape(50, -1, GROUP).amax(-1) - w.reshape(50, -1, GROUP).amin(-1)) / 15
    err = (deq - w).abs().reshape(50, -1, GROUP).amax(-1)
    # the coded scale and min are off by at most half a unit each: a little over half a step
    assert (err <= step * 0.6 + 1e-6).all()


def test_bias_and_leading_shape() -> None:
    lin = _linear(128, 37, bias=True)
    layer = Int4KernelLinear(lin)
    assert (layer.in_features, layer.out_features) == (128, 37)
    x = torch.randn(2, 3, 128).bfloat16()
    y = layer(x)
    assert y.shape == (2, 3, 37) and y.dtype == torch.bfloat16
    ref = x.float() @ _ref_weight(lin.weight).t() + lin.bias.detach().bfloat16().float()
    assert _rel_err(y, ref) < TOL


def test_prefill_rows() -> None:
    lin = _linear(256, 70, bias=True)
    layer = Int4KernelLinear(lin)
    x = torch.randn(300, 256).bfloat16()
    ref = x.float() @ _ref_weight(lin.weight).t() + lin.bias.detach().bfloat16().float()
    assert _rel_err(layer(x), ref) < TOL


def test_state_dict_roundtrip() -> None:
    lin = _linear(128, 20, bias=True)
    a = Int4KernelLinear(lin)
    b = Int4KernelLinear(_linear(128, 20, bias=True, seed=7))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 128).bfloat16()
    torch.testing.assert_close(a(x), b(x))


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        pack_int4(torch.randn(8, 40))
    layer = Int4KernelLinear(_linear(64, 16, bias=False))
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, 96).bfloat16())


def test_torch_compile_calls_the_op() -> None:
    layer = Int4KernelLinear(_linear(256, 48, bias=True))
    eager = layer(torch.randn(3, 256).bfloat16())
    fn = torch.compile(lambda x: layer(x) * 2, dynamic=True, fullgraph=True)
    for m in (3, 5, 1):
        torch.manual_seed(m)
        x = torch.randn(m, 256).bfloat16()
        torch.testing.assert_close(fn(x), layer(x) * 2)
    assert eager.shape == (3, 48)


def test_bits_per_weight() -> None:
    """4 bits of q, 8-bit scale and min codes per 32, fp16 units per 256: 4.625 bits."""
    packed = pack_int4(_linear(1536, 64, bias=False).weight)
    nbytes = sum(t.numel() * t.element_size() for t in vars(packed).values())
    assert nbytes * 8 / (1536 * 64) == 4.625
    assert packed.supers.shape == (4, 6, 2, 16)
