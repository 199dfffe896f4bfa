"""Tandem's RMSNorm kernel (tandem.runtime.kernels.norm) against torch's rms_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.runtime.kernels import norm as nk
from tandem.runtime.model import RMSNorm

pytestmark = pytest.mark.skipif(not nk.available(), reason="tandem CPU kernels do not build here")


@pytest.mark.parametrize("dim", [16, 20, 576, 640, 1536])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_matches_torch(dim, unit_offset):
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(7, dim, generator=gen) * 3
    w = torch.randn(dim, generator=gen)
    scale = 1 + w if unit_offset else w
    want = F.rms_norm(x, (dim,), eps=1e-6) * scale
    torch.testing.assert_close(nk.rms_norm(x, w, 1e-6, unit_offset), want, atol=1e-5, rtol=1e-5)
    got16 = nk.rms_norm(x.bfloat16(), w.bfloat16(), 1e-6, unit_offset)
    want16 = F.rms_norm(x.bfloat16().float(), (dim,), eps=1e-6) * (scale.bfloat16().float())
    torch.testing.assert_close(got16.float(), want16, atol=2e-2, rtol=1e-2)


def test_rows_are_independent_and_heads_shaped_input_works():
    """[T, H, hd] (qk-norm over head_dim, non-contiguous), and a row alone = batched."""
    x = torch.randn(5, 6, 32).bfloat16()[:, 1:4]
    w = torch.randn(32).bfloat16()
    out = nk.rms_norm(x, w, 1e-6, False)
    assert out.shape == (5, 3, 32)
    assert torch.equal(nk.rms_norm(x[2:3], w, 1e-6, False), out[2:3])


def test_the_module_uses_torch_where_gradients_are_needed():
    """Exit heads are trained through RMSNorm: with autograd on it must not use the kernel
    (which has no gradient)."""
    norm = RMSNorm(16, 1e-6, unit_offset=False, kernel=True)
    x = torch.randn(3, 16, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    with torch.inference_mode():
        torch.testing.assert_close(
            norm(x.detach()), F.rms_norm(x.detach(), (16,), norm.weight, 1e-6)
        )
