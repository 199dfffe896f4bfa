"""The Attend wire format, for both sides (see proto/tandem_proto/attn/v1/attn.proto).

Packed form (one message per worker per (step, layer), whatever the batch): the sequences as
parallel lists and every tensor in one blob `qkv` of R rows, row r = [q heads | k heads | v
heads] x head_dim (phase Q: q heads only; phase KV: k then v heads); the reply is one blob
`packed_out` [R, q_heads, head_dim]. The per-item form (one SeqItem per sequence) is still
read and answered in kind.

Tensors become bytes with one copy (`to_bytes`) and bytes become tensors with none
(`from_bytes`: a read-only view of the message's buffer; callers only read it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from tandem_proto.attn.v1 import attn_pb2

WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}

# torch warns (once) that a tensor over an immutable bytes object is not writable: these
# tensors are only read (copied into the KV store, cast to float32, concatenated).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def to_bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    """Row-major little-endian bytes of `t` in `dtype` (2-byte dtypes only)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous().view(torch.int16).numpy().tobytes()


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A read-only tensor of `shape` over `data` (no copy)."""
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.int16).view(dtype).view(shape)


def pack_rows(
    q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None, dtype: torch.dtype
) -> bytes:
    """One blob of rows [q heads | k heads | v heads]: q [R, qh, hd], k / v [R, kvh, hd]
    (any of them None: left out, as phases Q and KV send)."""
    parts = [t for t in (q, k, v) if t is not None]
    joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return to_bytes(joined, dtype)


@dataclass
class AttendBatch:
    """One Attend message's sequences, whichever form it came in."""

    session_ids: list[str]
    start_positions: list[int]
    rows: list[int]
    q: torch.Tensor | None  # [R, q_heads, hd]
    k: torch.Tensor | None  # [R, kv_heads, hd]
    v: torch.Tensor | None
    packed: bool

    def __len__(self) -> int:
        return len(self.session_ids)

    def bounds(self) -> list[slice]:
        out, off = [], 0
        for n in self.rows:
            out.append(slice(off, off + n))
            off += n
        return out

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def parse_attend(
    req: attn_pb2.AttendRequest, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> AttendBatch:
    """Read either form; ValueError (INVALID_ARGUMENT) for bad lists, rows or blob sizes."""
    want_q = req.phase != attn_pb2.PHASE_KV
    want_kv = req.phase != attn_pb2.PHASE_Q
    if req.session_ids:
        if req.items:
            raise ValueError("a message carries either items or the packed fields, not both")
        n = len(req.session_ids)
        if len(req.start_positions) != n or len(req.rows) != n:
            raise ValueError(
                f"{n} session_ids, {len(req.start_positions)} start_positions, {len(req.rows)} rows"
            )
        rows = list(req.rows)
        if min(rows) < 1:
            raise ValueError("rows must be >= 1 for every sequence")
        width = (q_heads if want_q else 0) + (2 * kv_heads if want_kv else 0)
        total = sum(rows)
        if len(req.qkv) != total * width * head_dim * 2:
            raise ValueError(
                f"qkv has {len(req.qkv)} bytes, [{total} rows, {width} heads, {head_dim}] "
                f"is {total * width * head_dim * 2}"
            )
        blob = from_bytes(req.qkv, dtype, (total, width, head_dim))
        q = blob[:, :q_heads] if want_q else None
        kv = blob[:, q_heads:] if want_q else blob
        k = kv[:, :kv_heads] if want_kv else None
        v = kv[:, kv_heads:] if want_kv else None
        return AttendBatch(list(req.session_ids), list(req.start_positions), rows, q, k, v, True)
    qs, ks, vs, rows = [], [], [], []
    for item in req.items:
        sid = item.session_id
        if item.n < 1:
            raise ValueError(f"item {sid!r}: n must be >= 1")
        q_len, kv_len = item.n * q_heads * head_dim * 2, item.n * kv_heads * head_dim * 2
        if want_q:
            if len(item.q) != q_len:
                raise ValueError(
                    f"item {sid!r}: q has {len(item.q)} bytes, [n, q_heads, hd] is {q_len}"
                )
            qs.append(from_bytes(item.q, dtype, (item.n, q_heads, head_dim)))
        if want_kv:
            if len(item.k) != kv_len or len(item.v) != kv_len:
                raise ValueError(
                    f"item {sid!r}: k / v have {len(item.k)} / {len(item.v)} bytes, "
                    f"[n, kv_heads, hd] is {kv_len}"
                )
            ks.append(from_bytes(item.k, dtype, (item.n, kv_heads, head_dim)))
            vs.append(from_bytes(item.v, dtype, (item.n, kv_heads, head_dim)))
        rows.append(item.n)

    def cat(ts: list[torch.Tensor], heads: int) -> torch.Tensor:
        return torch.cat(ts) if ts else torch.empty(0, heads, head_dim, dtype=dtype)

    return AttendBatch(
        [it.session_id for it in req.items],
        [it.start_pos for it in req.items],
        rows,
        cat(qs, q_heads) if want_q else None,
        cat(ks, kv_heads) if want_kv else None,
        cat(vs, kv_heads) if want_kv else None,
        False,
    )


def attend_reply(
    req: attn_pb2.AttendRequest,
    batch: AttendBatch,
    out: torch.Tensor,
    failed: set[int],
    errors: list[attn_pb2.ItemError],
    compute_ms: float,
    dtype: torch.dtype,
) -> attn_pb2.AttendReply:
    """The reply in the request's form: out [R, q_heads, hd] (rows of `failed` sequences
    are sent as zeros in the packed form, as empty `out` entries per item)."""
    reply = attn_pb2.AttendReply(
        call_id=req.call_id, layer=req.layer, errors=errors, compute_ms=compute_ms
    )
    if batch.packed:
        if failed:
            out = out.clone()
            for i, rows in enumerate(batch.bounds()):
                if i in failed:
                    out[rows] = 0
        reply.packed_out = to_bytes(out, dtype)
    else:
        reply.out.extend(
            b"" if i in failed else to_bytes(out[rows], dtype)
            for i, rows in enumerate(batch.bounds())
        )
    return reply
