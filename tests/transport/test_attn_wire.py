"""The Attend wire format: packed and per-item messages read back to the same tensors; packed
replies zero the rows of failed sequences; bad lists and blob sizes are rejected."""

from __future__ import annotations

import pytest
import torch

from tandem.transport.attn_wire import (
    attend_reply,
    from_bytes,
    pack_rows,
    parse_attend,
    to_bytes,
)
from tandem_proto.attn.v1 import attn_pb2

QH, KVH, HD = 4, 2, 8
BF16 = torch.bfloat16


def tensors(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(rows, h, HD, generator=g).to(BF16) for h in (QH, KVH, KVH))


def packed(sids, starts, rows, q, k, v, phase=attn_pb2.PHASE_QKV) -> attn_pb2.AttendRequest:
    return attn_pb2.AttendRequest(
        call_id=1,
        layer=0,
        dtype="bf16",
        phase=phase,
        session_ids=sids,
        start_positions=starts,
        rows=rows,
        qkv=pack_rows(q, k, v, BF16),
    )


def test_packed_and_per_item_forms_read_the_same() -> None:
    q, k, v = tensors(4)
    rows, sids, starts = [1, 3], ["a", "b"], [7, 2]
    a = parse_attend(packed(sids, starts, rows, q, k, v), QH, KVH, HD, BF16)
    items = [
        attn_pb2.SeqItem(
            session_id=s,
            start_pos=p,
            n=r.stop - r.start,
            q=to_bytes(q[r], BF16),
            k=to_bytes(k[r], BF16),
            v=to_bytes(v[r], BF16),
        )
        for s, p, r in zip(sids, starts, (slice(0, 1), slice(1, 4)), strict=True)
    ]
    b = parse_attend(attn_pb2.AttendRequest(dtype="bf16", items=items), QH, KVH, HD, BF16)
    for x in (a, b):
        assert (x.session_ids, x.start_positions, x.rows, x.total_rows) == (sids, starts, rows, 4)
        assert x.bounds() == [slice(0, 1), slice(1, 4)]
        assert torch.equal(x.q, q) and torch.equal(x.k, k) and torch.equal(x.v, v)
    assert a.packed and not b.packed


def test_phases_carry_only_their_tensors() -> None:
    q, k, v = tensors(2)
    a = parse_attend(
        packed(["a", "b"], [1, 1], [1, 1], q, None, None, attn_pb2.PHASE_Q), QH, KVH, HD, BF16
    )
    assert torch.equal(a.q, q) and a.k is None and a.v is None
    b = parse_attend(
        packed(["a", "b"], [1, 1], [1, 1], None, k, v, attn_pb2.PHASE_KV), QH, KVH, HD, BF16
    )
    assert b.q is None and torch.equal(b.k, k) and torch.equal(b.v, v)


def test_reply_zeroes_failed_rows_and_matches_the_request_form() -> None:
    q, k, v = tensors(3)
    req = packed(["a", "b"], [1, 1], [2, 1], q, k, v)
    batch = parse_attend(req, QH, KVH, HD, BF16)
    out = torch.randn(3, QH, HD)
    err = attn_pb2.ItemError(session_id="a", code="NOT_FOUND")
    reply = attend_reply(req, batch, out, {0}, [err], 1.0, BF16)
    got = from_bytes(reply.packed_out, BF16, (3, QH, HD))
    assert torch.equal(got[:2], torch.zeros(2, QH, HD, dtype=BF16))
    assert torch.equal(got[2], out[2].to(BF16))
    assert [e.session_id for e in reply.errors] == ["a"] and not reply.out


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.start_positions.append(3),  # lists of different lengths
        lambda r: setattr(r, "qkv", r.qkv[:-2]),  # blob one element short
        lambda r: r.rows.__setitem__(0, 0),  # an empty sequence
        lambda r: r.items.add(session_id="x", n=1),  # both forms at once
    ],
)
def test_bad_packed_messages_are_rejected(change) -> None:
    q, k, v = tensors(2)
    req = packed(["a", "b"], [1, 1], [1, 1], q, k, v)
    change(req)
    with pytest.raises(ValueError):
        parse_attend(req, QH, KVH, HD, BF16)
