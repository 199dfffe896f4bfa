"""A compact decoder runtime for llama, qwen2 and gemma3.

A batch is a flat list of rows (tokens) from several sequences, like vLLM's flattened
batch: dense layers run on all rows at once; attention runs per sequence segment against
that sequence's KV cache. Any contiguous layer range [a, b) can run on its own, so a model
can be split between edge and cloud, and exits can stop early.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tandem.runtime.compiled import CompiledDecode
from tandem.runtime.config import ArchConfig
from tandem.runtime.kernels import attention as attention_kernel
from tandem.runtime.kernels import norm as norm_kernel
from tandem.runtime.kv_cache import SequenceKV

# Attention for at most this many new rows of a sequence (decode steps, short prompts: what
# the compiled step takes) runs on the kernel the compiled step runs, so the two paths give
# the same bits; longer prompts (compute-bound) use SDPA on both paths.
KERNEL_ATTENTION_ROWS = 16


@dataclass
class Segment:
    """Rows [start, start + count) of the flat batch belong to the sequence owning `kv`.

    Their positions are contiguous and continue that sequence's cache at every layer.
    """

    kv: SequenceKV
    start: int
    count: int
    start_pos: int


def _positions(segments: list[Segment], device: torch.device) -> torch.Tensor:
    """Each row's position, segment after segment."""
    return torch.cat(
        [torch.arange(s.start_pos, s.start_pos + s.count, device=device) for s in segments]
    )


def _gather(h: torch.Tensor, segments: list[Segment]) -> tuple[torch.Tensor, list[Segment]]:
    """The rows of `segments` out of the flat batch `h`, and the segments renumbered to
    those rows."""
    rebased, off = [], 0
    for s in segments:
        rebased.append(Segment(s.kv, off, s.count, s.start_pos))
        off += s.count
    return torch.cat([h[s.start : s.start + s.count] for s in segments]), rebased


def _scatter(out: torch.Tensor, rows: torch.Tensor, segments: list[Segment]) -> None:
    """Write `rows` (the segments' rows in order) back to their places in `out`."""
    off = 0
    for s in segments:
        out[s.start : s.start + s.count] = rows[off : off + s.count]
        off += s.count


class RMSNorm(nn.Module):
    """`kernel`: on the CPU, without autograd, run Tandem's kernel (tandem.runtime.kernels.norm),
    which the compiled step and the eager path share, so both normalise to the same bits."""

    def __init__(self, dim: int, eps: float, unit_offset: bool, kernel: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel and x.device.type == "cpu" and not torch.is_grad_enabled():
            return norm_kernel.rms_norm(x, self.weight, self.eps, self.unit_offset)
        if x.dtype != torch.float32 and not self.unit_offset:  # one fused op (fp32 inside)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:  # gemma: (x * (1 + w)) in fp32, then cast
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)


class Rope:
    """cos/sin tables per theta, indexed by absolute position (rotate-half layout)."""

    def __init__(self, head_dim: int, thetas: tuple[float, ...], max_pos: int) -> None:
        self._tables: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        for theta in set(thetas):
            inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            freqs = torch.arange(max_pos, dtype=torch.float)[:, None] * inv[None, :]
            # rotate_half(x) * sin == roll(x, half) * signed_sin
            sin = freqs.sin()
            self._tables[theta] = (torch.cat((freqs, freqs), -1).cos(), torch.cat((-sin, sin), -1))

    def to(self, device: torch.device) -> None:
        """Move the tables (they are indexed by positions on the model's device)."""
        self._tables = {t: (c.to(device), s.to(device)) for t, (c, s) in self._tables.items()}

    def tables(self, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for every position, float32 [max_pos, head_dim]."""
        return self._tables[theta]

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> Rotary:
        return Rotary(self, positions, dtype)


class Rotary:
    """cos/sin for one batch's positions, gathered once per theta and shared by layers."""

    def __init__(self, rope: Rope, positions: torch.Tensor, dtype: torch.dtype) -> None:
        self.rope, self.positions, self.dtype = rope, positions, dtype
        self._memo: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        if theta not in self._memo:
            cos, sin = self.rope._tables[theta]
            self._memo[theta] = (
                cos[self.positions].to(self.dtype)[:, None, :],
                sin[self.positions].to(self.dtype)[:, None, :],
            )
        return self._memo[theta]


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.index = index
        d, hd = cfg.hidden_size, cfg.head_dim
        # q/k/v and gate/up are fused: fewer, larger matmuls per layer.
        self.qkv_proj = nn.Linear(d, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.gate_up_proj = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)
        kernel = norm_kernel.available()
        norm = lambda dim: RMSNorm(dim, cfg.rms_eps, cfg.norm_unit_offset, kernel)  # noqa: E731
        self.input_layernorm = norm(d)
        self.post_attention_layernorm = norm(d)
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm(d)
            self.post_feedforward_layernorm = norm(d)
        if cfg.qk_norm:
            self.q_norm = norm(hd)
            self.k_norm = norm(hd)
        self.theta = cfg.rope_theta[index]
        self.window = cfg.sliding_window[index]

    def qkv(self, x: torch.Tensor, rot: Rotary):
        """Project normed input to rotated q [T,H,hd], k [T,KVH,hd] and v [T,KVH,hd]."""
        return self.qkv_rotated(x, *rot.cos_sin(self.theta))

    def qkv_rotated(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """`qkv` with this layer's cos/sin rows given ([T, 1, hd] each)."""
        cfg = self.cfg
        t = x.shape[0]
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = self.qkv_proj(x).view(t, nh + 2 * nkv, hd)
        v = qkv[:, nh + nkv :]
        if cfg.qk_norm:
            q = _rotate(self.q_norm(qkv[:, :nh]), cos, sin)
            k = _rotate(self.k_norm(qkv[:, nh : nh + nkv]), cos, sin)
            return q, k, v
        qk = _rotate(qkv[:, : nh + nkv], cos, sin)  # q and k heads rotated in one go
        return qk[:, :nh], qk[:, nh:], v

    def attend_local(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: list[Segment]
    ) -> torch.Tensor:
        """Append k, v to each segment's cache and attend; returns [T, H, hd]."""
        out = torch.empty_like(q)
        for seg in segments:
            if seg.kv.length(self.index) != seg.start_pos:
                raise RuntimeError(
                    f"layer {self.index}: cache holds {seg.kv.length(self.index)} positions, "
                    f"rows start at {seg.start_pos}"
                )
            rows = slice(seg.start, seg.start + seg.count)
            kk, vv = seg.kv.append(self.index, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            out[rows] = attention(q[rows], kk, vv, self.cfg.attn_scale, self.window)
        return out

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        act = F.silu(gate) if self.cfg.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(act * up)

    def forward(self, h: torch.Tensor, rot: Rotary, segments: list[Segment]) -> torch.Tensor:
        q, k, v = self.qkv(self.input_layernorm(h), rot)
        return self.after_attention(h, self.attend_local(q, k, v, segments))

    def after_attention(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of the layer once attention [T, H, hd] is known (output projection,
        residuals, MLP): what an attention-offloading compute side runs after the pool."""
        a = self.o_proj(attn.reshape(h.shape[0], -1))
        if self.cfg.sandwich_norm:
            h = h + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """Causal attention of n new queries [n,H,hd] over a cache [KVH,L,hd] whose last n
    entries are those queries' own keys. Returns [n, H, hd]."""
    n, length = q.shape[0], k.shape[1]
    if n <= KERNEL_ATTENTION_ROWS and q.device.type == "cpu" and attention_kernel.available():
        pos = torch.arange(length - n, length)
        return attention_kernel.decode_attention(
            q, k[None], v[None], torch.zeros_like(pos), pos, scale, window
        )
    mask = None
    if n > 1 or (window is not None and length > window):
        qpos = torch.arange(length - n, length, device=q.device)[:, None]
        kpos = torch.arange(length, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= qpos - kpos < window
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True
    )
    return o[0].transpose(0, 1)


class DecoderModel(nn.Module):
    """Embedding, decoder layers and LM head. Layers can be run in any range."""

    def __init__(self, cfg: ArchConfig, max_context: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(
            cfg.hidden_size, cfg.rms_eps, cfg.norm_unit_offset, norm_kernel.available()
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_context = min(max_context or cfg.max_position, cfg.max_position)
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, self.max_context)
        self.compiled: CompiledDecode | None = None  # see compile_decode()
        self.device = torch.device("cpu")  # see to_device()

    def to_device(self, device: torch.device) -> DecoderModel:
        """Move weights and rope tables to `device` (before compile_decode: the KV slots
        and caches made afterwards live there too)."""
        if self.compiled is not None:
            raise RuntimeError("to_device after compile_decode: move the model first")
        self.to(device)
        self.rope.to(device)
        self.device = torch.device(device)
        return self

    def compile_decode(self, slots: int = 16, cpp_wrapper: bool = True) -> None:
        """From now on, new caches are static slots (up to `slots` sequences; more get
        dynamic caches) and decode steps over them run as compiled graphs
        (tandem.runtime.compiled; `cpp_wrapper`: inductor's C++ wrapper, faster steps,
        slower first compile). The eager path stays the reference. On CUDA the step is
        replayed as CUDA graphs over the same static slots."""
        if self.device.type == "cuda":
            from tandem.runtime.compiled import CudaGraphDecode

            self.compiled = CudaGraphDecode(self, slots)
            return
        self.compiled = CompiledDecode(self, slots, cpp_wrapper=cpp_wrapper)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_kv(self, first_layer: int = 0, last_layer: int | None = None) -> SequenceKV:
        last = self.cfg.n_layers if last_layer is None else last_layer
        if self.compiled is not None:
            slot = self.compiled.new_kv(first_layer, last)
            if slot is not None:
                return slot  # type: ignore[return-value]  # the same interface
        return SequenceKV(
            last - first_layer,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            self.dtype,
            first_layer,
            device=self.device,
        )

    def drop_layers(self, layers: range) -> None:
        """Free the weights of `layers` (the other half of a split model); running them
        afterwards is an error in the caller, not a silent identity."""
        for i in layers:
            self.layers[i] = nn.Identity()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        if self.cfg.embed_scale != 1.0:
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype)
        return h

    def run_layers(
        self,
        h: torch.Tensor,
        positions: torch.Tensor | None,
        segments: list[Segment],
        start: int,
        end: int,
    ) -> torch.Tensor:
        """Layers [start, end) for rows `h` of `segments` at `positions` (None: the
        segments' own, made only where the eager layers need them)."""
        compiled = self.compiled
        if compiled is None or end <= start:
            positions = _positions(segments, h.device) if positions is None else positions
            return self._eager_layers(h, positions, segments, start, end)
        fast, slow = [], []
        for s in segments:
            (fast if compiled.takes(s, start, end) else slow).append(s)
        if not slow and h.shape[0] <= compiled.max_rows:
            return compiled.run(start, end, h, segments)  # the usual decode step
        # Each sequence takes its own path (compiled.takes); the step's rows are split.
        out = torch.empty_like(h)
        for group in compiled.batches(fast) if fast else []:
            rows, _ = _gather(h, group)
            _scatter(out, compiled.run(start, end, rows, group), group)
        if slow:
            rows, rebased = _gather(h, slow)
            positions = _positions(segments, h.device) if positions is None else positions
            pos = torch.cat([positions[s.start : s.start + s.count] for s in slow])
            _scatter(out, self._eager_layers(rows, pos, rebased, start, end), slow)
        return out

    def _eager_layers(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        segments: list[Segment],
        start: int,
        end: int,
    ) -> torch.Tensor:
        rot = self.rope.at(positions, h.dtype)
        for layer in self.layers[start:end]:
            h = layer(h, rot, segments)
        return h

    def run_rows(
        self, rows: list[tuple[SequenceKV, int, torch.Tensor]], start: int, end: int
    ) -> list[torch.Tensor]:
        """Layers [start, end) for several sequences' rows in one batch: each item is
        (its KV, the position of its first row, rows [n, d]) and continues that KV at every
        layer. Returns each sequence's output rows."""
        segments, off = [], 0
        for kv, start_pos, h in rows:
            segments.append(Segment(kv, off, h.shape[0], start_pos))
            off += h.shape[0]
        h = rows[0][2] if len(rows) == 1 else torch.cat([h for _, _, h in rows])
        out = self.run_layers(h, None, segments, start, end)
        return [out[seg.start : seg.start + seg.count] for seg in segments]

    def run_sequence(
        self, h: torch.Tensor, kv: SequenceKV, start_pos: int, start: int, end: int
    ) -> torch.Tensor:
        """Layers [start, end) for the rows [n, d] of one sequence, at positions
        start_pos.. (they continue `kv` at every layer)."""
        return self.run_rows([(kv, start_pos, h)], start, end)[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(self.norm(h))
        if self.cfg.final_softcap:
            out = torch.tanh(out / self.cfg.final_softcap) * self.cfg.final_softcap
        return out

    @torch.inference_mode()
    def forward_tokens(
        self, token_ids: list[list[int]], kvs: list[SequenceKV], start_positions: list[int]
    ) -> torch.Tensor:
        """Full-depth forward of new tokens for several sequences; returns the logits of
        each sequence's last new token, [B, vocab]."""
        rows = [
            (kv, p0, self.embed(torch.tensor(ids, device=self.device)))
            for ids, kv, p0 in zip(token_ids, kvs, start_positions, strict=True)
        ]
        outs = self.run_rows(rows, 0, self.cfg.n_layers)
        return self.logits(torch.cat([h[-1:] for h in outs]))

    @staticmethod
    def load(path: Path, dtype: torch.dtype = torch.bfloat16, max_context: int | None = None):
        from safetensors.torch import load_file

        cfg = ArchConfig.from_dir(path)
        return DecoderModel.from_state_dict(
            cfg, load_file(str(path / "model.safetensors")), dtype, max_context
        )

    @staticmethod
    def from_state_dict(
        cfg: ArchConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.bfloat16,
        max_context: int | None = None,
    ) -> DecoderModel:
        """Build from a transformers-style state dict (model.layers.N..., lm_head)."""
        with torch.device("meta"):
            model = DecoderModel(cfg, max_context)
        model.rope = Rope(cfg.head_dim, cfg.rope_theta, model.max_context)
        mapped: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            key = name.removeprefix("model.language_model.").removeprefix("model.")
            key = key.replace("self_attn.", "").replace("mlp.", "")
            mapped[key] = tensor.to(dtype)
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            for kind in ("weight", "bias"):
                parts = [mapped.pop(f"{p}{n}_proj.{kind}", None) for n in "qkv"]
                if all(t is not None for t in parts):
                    mapped[f"{p}qkv_proj.{kind}"] = torch.cat(parts)
            gate, up = mapped.pop(f"{p}gate_proj.weight"), mapped.pop(f"{p}up_proj.weight")
            mapped[f"{p}gate_up_proj.weight"] = torch.cat([gate, up])
        if "lm_head.weight" not in mapped:
            mapped["lm_head.weight"] = mapped["embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(mapped, strict=False, assign=True)
        missing = [m for m in missing if not m.endswith(".bias") or cfg.attn_bias]
        if missing or unexpected:
            raise ValueError(
                f"weights do not match the config: missing={missing} extra={unexpected}"
            )
        for layer in model.layers:
            if layer.qkv_proj.bias is not None and layer.qkv_proj.bias.is_meta:
                layer.qkv_proj.bias = None
        return model.eval()
