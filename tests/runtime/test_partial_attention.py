"""The partial-softmax merge is exact: previous tokens and new tokens attended separately and
merged equal one causal attention over the whole cache (GQA, several new rows, empty parts)."""

from __future__ import annotations

import pytest
import torch

from tandem.runtime.model import attention
from tandem.runtime.partial_attention import attend_with_cache, merge, partial_attention


@pytest.mark.parametrize(
    ("prev", "new", "heads", "kv_heads"), [(0, 1, 4, 4), (7, 1, 12, 2), (5, 3, 6, 3), (0, 4, 2, 1)]
)
def test_split_and_merge_equals_monolithic_causal_attention(prev, new, heads, kv_heads) -> None:
    g = torch.Generator().manual_seed(prev * 10 + new)
    hd, scale = 16, 16**-0.5
    q = torch.randn(new, heads, hd, generator=g)
    k = torch.randn(kv_heads, prev + new, hd, generator=g)
    v = torch.randn(kv_heads, prev + new, hd, generator=g)
    want = attention(q, k, v, scale, None)
    got = attend_with_cache(q, k[:, :prev], v[:, :prev], k[:, prev:], v[:, prev:], scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merge_in_any_grouping_and_with_empty_parts() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, generator=g)
    k, v = torch.randn(2, 9, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    whole, lse = partial_attention(q, k, v, 0.3, causal=False)
    parts = [
        partial_attention(q, k[:, a:b], v[:, a:b], 0.3, causal=False)
        for a, b in ((0, 2), (2, 2), (2, 9))
    ]
    out, acc = parts[0]
    for a, la in parts[1:]:
        out, acc = merge(out, acc, a, la)
    torch.testing.assert_close(out, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(acc, lse, atol=1e-6, rtol=1e-6)
    # Large scores do not overflow the log-space merge.
    big = partial_attention(q * 1e4, k, v, 1.0, causal=False)
    assert torch.isfinite(big[0]).all()


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError):
        partial_attention(
            torch.zeros(1, 3, 4), torch.zeros(2, 1, 4), torch.zeros(2, 1, 4), 1.0, causal=False
        )
    with pytest.raises(ValueError):
        partial_attention(
            torch.zeros(2, 2, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 1.0, causal=True
        )


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (12, 2), (6, 3)])
def test_decode_attention_equals_attention_over_each_cache(heads, kv_heads) -> None:
    from tandem.runtime.partial_attention import decode_attention

    g = torch.Generator().manual_seed(heads)
    hd, scale, lengths = 16, 16**-0.5, [1, 5, 33]
    q = torch.randn(len(lengths), heads, hd, generator=g)
    caches = [
        (torch.randn(kv_heads, n, hd, generator=g), torch.randn(kv_heads, n, hd, generator=g))
        for n in lengths
    ]
    got = decode_attention(q, caches, scale)
    for i, (k, v) in enumerate(caches):
        want = attention(q[i : i + 1], k, v, scale, None)[0]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    # bf16 caches (views into larger buffers), into a reused output buffer
    buf = torch.full((len(lengths), heads, hd), float("nan"))
    views = [(k.bfloat16(), v.bfloat16()) for k, v in caches]
    assert decode_attention(q, views, scale, out=buf) is buf
    for i, (k, v) in enumerate(views):
        want = attention(q[i : i + 1], k.float(), v.float(), scale, None)[0]
        torch.testing.assert_close(buf[i], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        decode_attention(q, caches[:2], scale)
