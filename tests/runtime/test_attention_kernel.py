"""Tandem's decode attention kernel (tandem.runtime.kernels.attention) against the torch
formulation the compiled step used before (`slot_attention`)."""

from __future__ import annotations

import pytest
import torch

from tandem.runtime.compiled import slot_attention
from tandem.runtime.kernels import attention as ak

pytestmark = pytest.mark.skipif(not ak.available(), reason="tandem CPU kernels do not build here")


@pytest.mark.parametrize(
    ("heads", "kv_heads", "hd", "window"),
    [(4, 2, 16, None), (12, 2, 128, None), (4, 1, 256, 5), (3, 3, 20, None), (10, 2, 24, 7)],
)
def test_matches_the_torch_formulation(heads, kv_heads, hd, window):
    """fp32 to rounding; rows in several slots at several positions, some past the window;
    positions a row does not see hold NaN and must not leak into it."""
    gen = torch.Generator().manual_seed(0)
    slots, cap = 3, 40
    k = torch.randn(slots, kv_heads, cap, hd, generator=gen)
    v = torch.randn(slots, kv_heads, cap, hd, generator=gen)
    slot = torch.tensor([0, 2, 2, 1, 0])
    pos = torch.tensor([3, 0, 17, 30, 10])
    k[:, :, 31:] = float("nan")  # beyond every row's position
    v[:, :, 31:] = float("nan")
    q = torch.randn(5, heads, hd, generator=gen)
    want = slot_attention(q, k, v, slot, pos, cap, 0.3, window)
    got = ak.decode_attention(q, k, v, slot, pos, 0.3, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    bf = ak.decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), slot, pos, 0.3, window)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), want, atol=3e-2, rtol=3e-2)


def test_a_row_is_the_same_alone_or_batched():
    """The compiled step and the eager path call the kernel with different batches (a pool
    with other rows, or one sequence's cache): a row's bits must not depend on that."""
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(4, 2, 64, 32, generator=gen).bfloat16()
    v = torch.randn(4, 2, 64, 32, generator=gen).bfloat16()
    q = torch.randn(6, 8, 32, generator=gen).bfloat16()
    slot, pos = torch.tensor([3, 1, 3, 0, 2, 1]), torch.tensor([50, 9, 51, 0, 63, 10])
    batched = ak.decode_attention(q, k, v, slot, pos, 0.2, None)
    for t in range(6):
        alone = ak.decode_attention(
            q[t : t + 1],
            k[slot[t]][None],
            v[slot[t]][None],
            torch.tensor([0]),
            pos[t : t + 1],
            0.2,
            None,
        )
        assert torch.equal(alone, batched[t : t + 1])


def test_bad_shapes_are_errors():
    q = torch.randn(2, 4, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="position out of range"):
        ak.decode_attention(q, k, k, torch.tensor([0, 0]), torch.tensor([1, 8]), 1.0, None)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ak.decode_attention(q, k, k, torch.tensor([0, 1]), torch.tensor([1, 2]), 1.0, None)
    with pytest.raises(RuntimeError, match="head_dim"):
        ak.decode_attention(
            torch.randn(2, 4, 8), k, k, torch.tensor([0, 0]), torch.tensor([1, 2]), 1.0, None
        )
