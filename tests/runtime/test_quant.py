"""Int8/Int4 weight-only linears against an fp32 reference of the dequantized weight.

The references below are written from the quantization scheme, not from quant.py:
- int8: per output row, symmetric, s = max|w| / 127, w_hat = round(w / s) * s.
- int4: per group of 32 input channels, asymmetric min/max, q in 0..15,
  scale = (max - min) / 15, w_hat = min + q * scale.
The quantization error must be far larger than bf16 rounding, so that a layer that did not
quantize as specified would miss the reference: int4 is coarse enough on Gaussian weights;
int8 weights get an outlier column (whose input is zeroed) to coarsen every row's step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tandem.runtime.quant import (
    Int4Linear,
    Int8Linear,
    int4_kernel_available,
    int8_kernel_available,
    make_quantizer,
    quantize_model,
)

GROUP = 32
OUTLIER = 3  # input channel holding a large weight in every row


def _linear(in_f: int, out_f: int, bias: bool, outlier: float = 0.0, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        w = torch.randn(out_f, in_f)
        if outlier:
            w[:, OUTLIER] = outlier  # coarse int8 steps in every row
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.randn(out_f))
    return lin


def _ref_int8(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1, keepdim=True) / 127.0
    return torch.round(w / s) * s


def _ref_int4(w: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / 15.0
    q = torch.round((g - lo) / scale).clamp(0, 15)
    return (lo + q * scale).reshape(out_f, in_f)


def _reference(lin: nn.Linear, w_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    xb = x.to(torch.bfloat16).float()  # the layers run bf16 activations
    y = xb @ w_hat.T
    if lin.bias is not None:
        y = y + lin.bias.detach().to(torch.bfloat16).float()
    return y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


CASES = [
    # (cls, ref, in_f, out_f, outlier, tolerance on relative error vs the reference)
    (Int8Linear, _ref_int8, 64, 48, 20.0, 1e-2),
    (Int8Linear, _ref_int8, 96, 40, 20.0, 1e-2),
    (Int4Linear, _ref_int4, 64, 48, 0.0, 2e-2),
    (Int4Linear, _ref_int4, 128, 256, 0.0, 2e-2),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (1, 1, 4)])
@pytest.mark.parametrize("cls,ref,in_f,out_f,outlier,tol", CASES)
def test_matches_dequantized_reference(cls, ref, in_f, out_f, outlier, tol, lead, bias):
    lin = _linear(in_f, out_f, bias, outlier)
    w = lin.weight.detach().float()
    w_hat = ref(w)
    qlin = cls(lin)
    torch.manual_seed(1)
    x = torch.randn(*lead, in_f)
    x[..., OUTLIER] = 0.0  # keep an outlier's own product from dominating the norms
    with torch.no_grad():
        y = qlin(x)
        y_exact = lin(x)
    assert y.shape == (*lead, out_f)
    assert y.dtype == x.dtype
    y_ref = _reference(lin, w_hat, x)
    err = _rel(y, y_ref)
    assert err < tol, f"{cls.__name__}: relative error {err:.4f} vs dequantized reference"
    # the reference must be discriminating: the quantization error itself is much larger
    quant_err = _rel(y_exact, y_ref)
    assert quant_err > 4 * err, (quant_err, err)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_bf16_input_gives_bf16_output(cls):
    lin = _linear(64, 32, bias=True)
    qlin = cls(lin)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = qlin(x)
    assert y.dtype == torch.bfloat16
    assert y.shape == (3, 32)


def test_bias_is_added():
    lin = _linear(64, 32, bias=True)
    no_bias = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        no_bias.weight.copy_(lin.weight)
    x = torch.randn(4, 64)
    with torch.no_grad():
        for cls in (Int8Linear, Int4Linear):
            diff = cls(lin)(x) - cls(no_bias)(x)
            expected = lin.bias.detach().to(torch.bfloat16).float().expand_as(diff)
            torch.testing.assert_close(diff, expected, atol=0.1, rtol=0.02)
            assert cls(no_bias).bias is None


def test_int8_integer_weights_and_dequantized():
    lin = _linear(64, 16, bias=False)
    w = lin.weight.detach().float()
    s = w.abs().amax(dim=1) / 127.0
    q = Int8Linear(lin)
    assert q.qweight.dtype == torch.int8
    assert torch.equal(q.qweight.to(torch.int32), torch.round(w / s[:, None]).to(torch.int32))
    # each row hits +-127 at its max
    assert torch.equal(q.qweight.abs().amax(dim=1), torch.full((16,), 127, dtype=torch.int8))
    # dequantized() agrees with the fp32 reference up to the bf16 scale
    torch.testing.assert_close(q.dequantized(), _ref_int8(w), rtol=2**-8, atol=1e-6)


def test_int8_zero_row_stays_zero():
    lin = _linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight[5] = 0.0
    q = Int8Linear(lin)
    y = q(torch.randn(2, 64))
    assert torch.isfinite(y).all()
    assert torch.all(y[:, 5] == 0)


def test_int4_constant_group_is_exact():
    lin = _linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight[:, :32] = 0.25  # hi == lo in the first group of every row
        lin.weight[:, 32:] = -0.5
    q = Int4Linear(lin)
    x = torch.ones(1, 64)
    y = q(x)
    torch.testing.assert_close(y, torch.full((1, 16), 0.25 * 32 - 0.5 * 32), atol=0.05, rtol=0)


@pytest.mark.parametrize("in_f", [48, 33, 16])
def test_int4_rejects_in_features_not_multiple_of_group(in_f):
    with pytest.raises(ValueError, match="multiple"):
        Int4Linear(nn.Linear(in_f, 32), group_size=32)


def test_int4_other_group_size():
    lin = _linear(128, 32, bias=False)
    q = Int4Linear(lin, group_size=64)
    x = torch.randn(3, 128)
    y_ref = _reference(lin, _ref_int4(lin.weight.detach().float(), 64), x)
    assert _rel(q(x), y_ref) < 2e-2


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=True)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64))

    def forward(self, x):
        return x + self.mlp(self.q_proj(x))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(50, 64)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(64, 96, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def _served_int4() -> type[nn.Module]:
    from tandem.runtime.kernels.int4 import Int4KernelLinear

    return Int4KernelLinear if int4_kernel_available() else Int4Linear


def _served_int8() -> type[nn.Module]:
    from tandem.runtime.kernels.int8 import Int8KernelLinear

    return Int8KernelLinear if int8_kernel_available() else Int8Linear


@pytest.mark.parametrize("mode,tol", [("int8", 0.03), ("int4", 0.25)])
def test_quantize_model_replaces_linears_except_skipped(mode, tol):
    cls = _served_int8() if mode == "int8" else _served_int4()
    model = _Tiny().to(torch.bfloat16)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        ref = model(ids).float()
    lm_head = model.lm_head
    out = quantize_model(model, mode, skip=("lm_head",))
    assert out is model
    assert model.lm_head is lm_head and type(model.lm_head) is nn.Linear
    assert isinstance(model.embed_tokens, nn.Embedding)
    for layer in model.layers:
        assert isinstance(layer.q_proj, cls)
        assert isinstance(layer.mlp[0], cls)
        assert isinstance(layer.mlp[2], cls)
    assert not any(
        type(m) is nn.Linear for n, m in model.named_modules() if not n.startswith("lm_head")
    )
    with torch.no_grad():
        y = model(ids).float()
    assert y.shape == ref.shape
    assert _rel(y, ref) < tol


def test_quantize_model_bf16_is_identity():
    model = _Tiny()
    before = {n: type(m) for n, m in model.named_modules()}
    assert quantize_model(model, "bf16") is model
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_quantize_model_top_level_linear_and_skip_substring():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    quantize_model(model, "int8", skip=("1",))
    assert isinstance(model[0], _served_int8())
    assert type(model[1]) is nn.Linear


def test_make_quantizer_rejects_unknown_mode():
    with pytest.raises(ValueError):
        make_quantizer("fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_quantizer("bf16")


def test_int4_serves_tandems_kernel_unless_told_aten(monkeypatch):
    """On x86-64 with AVX2 and g++ (this project's machines), int4 is Tandem's kernel;
    TANDEM_INT4_KERNEL=aten selects aten's."""
    from tandem.runtime.kernels.int4 import Int4KernelLinear

    lin = _linear(64, 32, bias=False)
    assert type(make_quantizer("int4")(lin)) is Int4KernelLinear
    monkeypatch.setenv("TANDEM_INT4_KERNEL", "aten")
    assert type(make_quantizer("int4")(lin)) is Int4Linear


def test_int8_serves_tandem_unless_told_aten(monkeypatch):
    """int8 is Tandem's kernel (on x86-64 with AVX2 and g++) where in_features % 32 == 0,
    aten's otherwise; TANDEM_INT8_KERNEL=aten selects aten's everywhere."""
    from tandem.runtime.kernels.int8 import Int8KernelLinear

    assert int8_kernel_available()
    assert type(make_quantizer("int8")(_linear(64, 32, bias=False))) is Int8KernelLinear
    assert type(make_quantizer("int8")(_linear(48, 32, bias=False))) is Int8Linear
    monkeypatch.setenv("TANDEM_INT8_KERNEL", "aten")
    assert type(make_quantizer("int8")(_linear(64, 32, bias=False))) is Int8Linear
