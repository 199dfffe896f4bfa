"""Hidden-state wire format: sizes, round trips, corrupt payloads."""

from __future__ import annotations

import pytest
import torch

from tandem.transport.hidden import HiddenPayload, decode_hidden, encode_hidden


def _h(n=5, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.1, 30, n)[:, None]


def test_fp16_round_trip_is_fp16_exact():
    h = _h()
    p = encode_hidden(h, "fp16")
    assert p.nbytes() == 5 * 64 * 2
    torch.testing.assert_close(decode_hidden(p, torch.float32), h.half().float())


def test_int8_per_token_scale_error_bound_and_size():
    h = _h()
    p = encode_hidden(h, "int8")
    assert p.nbytes() == 5 * 64 + 5 * 4
    back = decode_hidden(p, torch.float32)
    step = h.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((back - h).abs() <= step / 2 + 1e-6)  # per-token scale, rounding error


def test_zero_rows_survive_int8():
    h = torch.zeros(2, 8)
    assert torch.equal(decode_hidden(encode_hidden(h, "int8"), torch.float32), h)


def test_inconsistent_payloads_are_rejected():
    with pytest.raises(ValueError):
        HiddenPayload("fp16", 2, 4, b"\0" * 15)
    with pytest.raises(ValueError):
        HiddenPayload("int8", 2, 4, b"\0" * 8, b"\0" * 4)
    with pytest.raises(ValueError):
        encode_hidden(torch.zeros(1, 4), "bf8")  # type: ignore[arg-type]
