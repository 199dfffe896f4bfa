"""The decode step compiled: a layer range in one inductor graph, over static KV slots.

Eager (`DecoderModel.run_layers` with `compiled` off) is the reference: about 45 aten ops
per layer per token, each dispatched from Python, and attention per sequence. It cost as
much as the weights' memory traffic on the small models.

Compiled, a step's rows for layers [a, b) are one graph call. Each row carries its
sequence's KV slot and its position (`tandem.runtime.kv_slots`); inside the graph, every
layer writes the rows' keys and values into the slot pool in place, then attends over the
pool with a causal (and, for sliding-window layers, windowed) mask per row: grouped GQA
as fused multiply-reduce loops that read the slots directly (no gather copy, no per-sequence
loop); Tandem's attention kernel does this on the CPU. Inductor fuses rotary, residuals and
the MLP's activation into C++ loops around the weight-only matmul and RMSNorm kernels.

Scope: rows of sequences whose caches are slots, at most `max_rows` per sequence (decode
steps, with any pending rows of deferred exits; short prompts), in graph calls of at most
`max_rows` rows. Longer prompts run the eager layers over the same slots (their attention
is compute-bound, where SDPA wins).

Each layer range a decoder asks for (full depth, the ranges between exits, the edge half
of a split) is its own graph, compiled on first use, for a dynamic row count (one row runs
as two: see `CompiledDecode.run`); `warm_up` compiles a server's ranges at start. Whether a
sequence's rows take the graph is decided per sequence (`CompiledDecode.takes`), so
batching never changes a sequence's numbers. Dynamo's guard check (~20-50 us per layer: it
checks every weight tensor) runs until a range's dynamic graph exists; from then on, within
the sizes its guards cover, the step calls the code dynamo compiled for that graph directly
(`_direct_entry`), without dynamo's frame hook and cache lookup (~0.5-1 ms per smollm2
step). The LM head stays eager (compiling it measured no faster).

Compiled and eager logits are equal bit for bit (CPU, Tandem's kernels built): the paths
share the kernels of every op that reduces (the int4/int8 matmuls, RMSNorm and decode
attention: tandem.runtime.kernels), and inductor keeps eager's bf16 rounding after each op
it fuses (`emulate_precision_casts`). Before, the fused graph summed norms and attention in
its own order and rounded once where eager rounds per op, and int8 activations turned such
last-bit differences into other greedy tokens within a few steps on smollm2 and gemma3.
tests/runtime/test_compiled.py checks the equality on real models.
"""

from __future__ import annotations

import functools
import time
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch._dynamo
from torch import nn

from tandem.runtime.kernels import attention as attention_kernel
from tandem.runtime.kv_slots import SlotKV, SlotPool

if TYPE_CHECKING:
    from tandem.runtime.decoder import ExitRule
    from tandem.runtime.exit_head import ExitDecision, ExitHead
    from tandem.runtime.model import DecoderModel, Segment

# A head and its exit rule as the decoder calls them: (rows, tau) -> (logits, verdict).
HeadCall = Callable[[torch.Tensor, float], "tuple[torch.Tensor, ExitDecision]"]

# One graph per layer range and model: dynamo's default of 8 entries per code object is
# too few once several models (tests) or several exits exist.
_RECOMPILE_LIMIT = 256
# `_direct_entry` reads dynamo's cache entries (private API, torch 2.13): where the reader
# is missing, the step goes through dynamo (skipping guards), as before.
try:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
except ImportError:  # pragma: no cover - another torch
    _debug_get_cache_entry_list = None
# Keep eager's bf16 roundings between fused ops (and eager's math functions), so the
# compiled step computes what the eager reference computes, bit for bit.
_INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def slot_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot: torch.Tensor,
    pos: torch.Tensor,
    length: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Rows q [T, H, hd], row t of slot[t] at position pos[t], over pool caches
    [S, KVH, cap, hd] whose positions [0, length) are filled; row t sees its slot's
    positions <= pos[t] (and > pos[t] - window). Returns [T, H, hd] in q's dtype."""
    t, heads, hd = q.shape
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    keys = k_pool[:, :, :length][slot]  # [T, KVH, L, hd]; inductor reads it in place
    vals = v_pool[:, :, :length][slot]
    qg = (q.float() * scale).view(t, kv_heads, group, 1, hd)
    scores = (qg * keys[:, :, None].float()).sum(-1)  # [T, KVH, G, L]
    kpos = torch.arange(length, device=pos.device)[None, :]
    visible = kpos <= pos[:, None]
    if window is not None:
        visible = visible & (pos[:, None] - kpos < window)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    # Positions a row does not see may hold anything (other sequences' old entries, never
    # written memory, NaN): 0 * NaN is NaN, so they are selected away, not weighted by 0.
    vals = torch.where(visible[:, None, :, None], vals.float(), 0.0)
    out = (p[..., None] * vals[:, :, None]).sum(-2)  # [T, KVH, G, hd]
    return out.reshape(t, heads, hd).to(q.dtype)


class _DecodeGraph(nn.Module):
    """Layers [a, b) for rows with slots and positions; writes their KV into the pool."""

    def __init__(self, model: DecoderModel, pool: SlotPool, start: int, end: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(model.layers[start:end])
        self.thetas = tuple(sorted({layer.theta for layer in self.layers}))
        for j, theta in enumerate(self.thetas):
            cos, sin = model.rope.tables(theta)
            self.register_buffer(f"cos{j}", cos, persistent=False)
            self.register_buffer(f"sin{j}", sin, persistent=False)
        for layer in self.layers:
            self.register_buffer(f"k{layer.index}", pool.k[layer.index], persistent=False)
            self.register_buffer(f"v{layer.index}", pool.v[layer.index], persistent=False)
        # Tandem's attention kernel where it runs (the eager path's too: the same bits).
        self.kernel_attention = model.device.type == "cpu" and attention_kernel.available()

    def forward(
        self, h: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, length: int
    ) -> torch.Tensor:
        rot = [
            (
                getattr(self, f"cos{j}")[pos].to(h.dtype)[:, None, :],
                getattr(self, f"sin{j}")[pos].to(h.dtype)[:, None, :],
            )
            for j in range(len(self.thetas))
        ]
        for layer in self.layers:
            cos, sin = rot[self.thetas.index(layer.theta)]
            q, k, v = layer.qkv_rotated(layer.input_layernorm(h), cos, sin)
            kp, vp = getattr(self, f"k{layer.index}"), getattr(self, f"v{layer.index}")
            kp[slot, :, pos] = k
            vp[slot, :, pos] = v
            cfg = layer.cfg
            if self.kernel_attention:
                attn = attention_kernel.decode_attention(
                    q, kp, vp, slot, pos, cfg.attn_scale, layer.window
                )
            else:
                attn = slot_attention(q, kp, vp, slot, pos, length, cfg.attn_scale, layer.window)
            h = layer.after_attention(h, attn)
        return h


class CompiledDecode:
    """A model's compiled decode graphs and its KV slot pool (module docstring)."""

    def __init__(
        self, model: DecoderModel, slots: int = 16, max_rows: int = 16, cpp_wrapper: bool = True
    ) -> None:
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT
        )
        cfg = model.cfg
        self.model = model
        self.max_rows = max_rows
        # Inductor's C++ wrapper: the graph's kernels are called from C++, not from Python
        # (smollm2 int4: ~12% less per step; the first compile of a graph takes ~3x longer).
        self.options = {**_INDUCTOR_OPTIONS, "cpp_wrapper": cpp_wrapper}
        self.pool = SlotPool(
            cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, model.dtype, slots, model.max_context
        )
        self._graphs: dict[tuple[int, int], nn.Module] = {}
        self._heads: dict[tuple[ExitHead, ExitRule], _CompiledHead] = {}  # see head()
        self.compile_heads = True  # False: exit heads run eager (an A/B switch for benches)
        self._guarded: set[tuple[int, int]] = set()  # ranges whose dynamic graph ran
        # Per range: dynamo's compiled code for its dynamic graph, called without dynamo.
        self._direct: dict[tuple[int, int], Callable[..., torch.Tensor]] = {}

    def new_kv(self, first_layer: int, last_layer: int) -> SlotKV | None:
        return self.pool.acquire(first_layer, last_layer)

    def head(self, head: ExitHead, rule: ExitRule) -> HeadCall:
        """An exit head's forward (adapter, shortlist projection, consistency classifier and
        the closed-form top-probability rewrite: ~70 small ops eager) and the exit `rule`
        on its logits (`decide`: a softmax, a max and a comparison, ~0.25 ms a token as
        eager ops between two graphs) as one inductor graph, dynamic in the row count (one
        row is a graph of its own), made on first use; tau is a tensor input, so every tau
        runs the same graph. The call returns the head's logits and the rule's verdict.

        The projection is Tandem's int4/int8 matmul kernel, as in eager, and inductor keeps
        eager's bf16 roundings, so the top token (the exited token) is eager's; the fp32
        reductions of the confidence (softmax statistics, logsumexp) are summed in
        inductor's order, so the exit probability can differ from eager's in the last bits
        (~1e-6), and a row whose confidence lies that close to tau may exit on one path and
        not the other. (Eager heads are no steadier: their fp32 adapter matmuls round
        differently for different row counts.) The rule must be traceable (`decide` is)."""
        if not self.compile_heads:
            return functools.partial(judge_eager, head, rule)
        graph = self._heads.get((head, rule))
        if graph is None:
            graph = self._heads[head, rule] = _CompiledHead(head, rule, self.options)
        return graph

    def takes(self, segment: Segment, start: int, end: int) -> bool:
        """Whether this sequence's rows run compiled for layers [start, end): a slot of
        this pool filled up to its first row on those layers, room for the rows, and at
        most `max_rows` of them. It depends on the segment alone, never on the batch it
        came in, so a sequence takes the same arithmetic alone or batched."""
        kv = segment.kv
        if not isinstance(kv, SlotKV) or kv.pool is not self.pool:
            return False
        if segment.count > self.max_rows:
            return False
        first = start - kv.first_layer
        if kv.lengths[first : first + end - start] != [segment.start_pos] * (end - start):
            return False
        return segment.start_pos + segment.count <= self.pool.capacity  # else eager raises

    def batches(self, segments: list[Segment]) -> list[list[Segment]]:
        """`segments` (each taken) in order, packed into graph calls of <= max_rows rows."""
        out: list[list[Segment]] = [[]]
        rows = 0
        for s in segments:
            if rows + s.count > self.max_rows:
                out.append([])
                rows = 0
            out[-1].append(s)
            rows += s.count
        return out

    def run(self, start: int, end: int, h: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """Layers [start, end) for the rows of `segments` (each taken, <= max_rows rows
        in all, in segment order).

        A single row is run as two copies of itself (both write the same K/V): dynamo
        would give one row a graph of its own, whose fused arithmetic differs in the last
        bits from the graph for several rows, and int8 activations turn such bits into
        other tokens. With one graph for every row count, a row's result does not depend
        on the rows beside it (tests/runtime/test_compiled.py), and two rows measured no
        slower than the one-row graph (smollm2 int4, interleaved on a quiet host: 7.3
        against 7.2 ms per step)."""
        slots = [s.kv.slot for s in segments for _ in range(s.count)]
        positions = [p for s in segments for p in range(s.start_pos, s.start_pos + s.count)]
        if len(slots) == 1:
            h, slots, positions = torch.cat([h, h]), slots * 2, positions * 2
        # two small tensors made from lists: each eager op here costs ~5-20 us a step
        slot, pos = torch.tensor(slots), torch.tensor(positions)
        length = max(s.start_pos + s.count for s in segments)
        graph = self._graphs.get((start, end))
        if graph is None:
            module = _DecodeGraph(self.model, self.pool, start, end)
            graph = self._graphs[start, end] = torch.compile(
                module, dynamic=True, options=self.options
            )
        # Once this range's dynamic graph exists, its guards (~50 us per layer: every weight
        # tensor) are not evaluated again: the inputs differ only in sizes the graph is
        # dynamic in. The guards on those sizes (TORCH_LOGS=guards) are rows >= 2 (always,
        # see above) and 2 <= length < capacity; outside that range, the guards run.
        dynamic = 2 <= length < self.pool.capacity
        key = (start, end)
        direct = self._direct.get(key) if dynamic else None
        if direct is not None and torch.is_inference_mode_enabled():
            out = direct(graph._orig_mod, h, slot, pos, length)
        else:
            warm = dynamic and key in self._guarded
            with torch.compiler.set_stance(skip_guard_eval_unsafe=warm):
                out = graph(h, slot, pos, length)
            if dynamic and not warm:
                self._guarded.add(key)
                entry = _direct_entry(graph._orig_mod, h=h, slot=slot, pos=pos, length=length)
                if entry is not None:
                    self._direct[key] = entry
        out = out[: sum(s.count for s in segments)]
        for s in segments:
            first = start - s.kv.first_layer
            for i in range(first, first + end - start):
                s.kv.lengths[i] += s.count
        return out


def _direct_entry(module: nn.Module, **inputs: object) -> Callable[..., torch.Tensor] | None:
    """The code dynamo runs for `module.forward(**inputs)` (the cache entry whose guards
    these inputs pass, evaluated here once) as a plain function of (module, *inputs):
    calling it skips dynamo's frame hook, cache lookup and guards. Only for inputs that
    differ from these in the sizes the graph is dynamic in, under inference mode (a guard
    of the entry); inductor still checks each input's sizes and strides against the
    graph's. None where dynamo's cache cannot be read."""
    if _debug_get_cache_entry_list is None or not torch.is_inference_mode_enabled():
        return None
    forward = type(module).forward
    frame = {"self": module, **inputs}
    for entry in _debug_get_cache_entry_list(forward.__code__):
        if entry.guard_manager.check(frame):
            # The entry's code calls the compiled graph by a name dynamo put in the
            # globals of forward's module.
            return types.FunctionType(entry.code, forward.__globals__)
    return None


def judge_eager(
    head: ExitHead, rule: ExitRule, h: torch.Tensor, tau: float
) -> tuple[torch.Tensor, ExitDecision]:
    """The head's logits for rows `h` and `rule`'s verdict on them, eager."""
    logits = head(h)
    return logits, rule(logits, head.shortlist, tau)


class _HeadVerdict(nn.Module):
    """An exit head and its exit rule, the module compiled (`CompiledDecode.head`)."""

    def __init__(self, head: ExitHead, rule: ExitRule) -> None:
        super().__init__()
        self.head = head
        self.rule = rule

    def forward(self, h: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.head(h)
        d = self.rule(logits, self.head.shortlist, tau)
        return logits, d.confident, d.token, d.prob


class _CompiledHead:
    """An exit head and its rule compiled (`CompiledDecode.head`), called as `(h, tau)`.
    Its graphs are dynamic in the row count, except one row (dynamo specialises a size of
    1): once the graph for a kind of input (one row or several, its dtype and rank) has
    run, later calls under inference mode go straight to the code dynamo compiled for it,
    without dynamo's frame hook and guards (`_direct_entry`, as `CompiledDecode.run`)."""

    def __init__(self, head: ExitHead, rule: ExitRule, options: dict) -> None:
        from tandem.runtime.exit_head import ExitDecision  # (exit_head imports model)

        self._decision = ExitDecision
        self.graph = torch.compile(_HeadVerdict(head, rule), dynamic=True, options=options)
        self._direct: dict[tuple[bool, torch.dtype, int], Callable[..., tuple]] = {}

    def __call__(self, h: torch.Tensor, tau: float) -> tuple[torch.Tensor, ExitDecision]:
        t = torch.tensor(tau, dtype=torch.float32)
        key = (h.shape[0] == 1, h.dtype, h.dim())
        direct = self._direct.get(key)
        if direct is not None and torch.is_inference_mode_enabled():
            out = direct(self.graph._orig_mod, h, t)
        else:
            out = self.graph(h, t)
            entry = _direct_entry(self.graph._orig_mod, h=h, tau=t)
            if entry is not None:
                self._direct[key] = entry
        logits, confident, token, prob = out
        return logits, self._decision(confident, token, prob)


def warm_up(
    model: DecoderModel,
    ranges: list[tuple[int, int]],
    heads: Sequence[ExitHead] = (),
    rule: ExitRule | None = None,
) -> float:
    """Compile the decode graphs of `ranges` (one row and several rows) before the first
    request, on a throwaway slot, and the graphs of the exit `heads` with their `rule`
    that the decoder calls; returns the seconds it took."""
    t = time.perf_counter()
    with torch.inference_mode():
        for a, b in ranges:
            kv = model.new_kv(a, b)
            for rows in (3, 1):  # the dynamic row count; one row runs as two
                h = model.embed(torch.zeros(rows, dtype=torch.long))
                model.run_rows([(kv, kv.length(a), h)], a, b)
            if isinstance(kv, SlotKV):
                kv.release()
        if model.compiled is not None and rule is not None:
            for head in heads:
                for rows in (3, 1):
                    h = model.embed(torch.zeros(rows, dtype=torch.long))
                    model.compiled.head(head, rule)(h, 0.5)
    return time.perf_counter() - t


def _bucket(n: int, floor: int, ceiling: int) -> int:
    """The smallest power of two >= n (at least `floor`), capped at `ceiling`."""
    b = floor
    while b < n:
        b *= 2
    return min(b, ceiling)


class _Captured:
    """One CUDA graph of a layer range at a fixed row count and attended length: its
    static inputs (h, slot, pos) are refilled before each replay; `out` is its output."""

    def __init__(self, graph, h, slot, pos, out) -> None:
        self.graph, self.h, self.slot, self.pos, self.out = graph, h, slot, pos, out


class CudaGraphDecode(CompiledDecode):
    """The decode step on CUDA: `_DecodeGraph` (eager kernels) captured as CUDA graphs.

    A graph is fixed in shape, so a step's rows are padded up to a power of two (1 .. 32)
    and its attention reads the slots' first `length` positions rounded up to a power of
    two (64 .. capacity); each (layer range, rows, length) is captured on first use and
    replayed after (a capture costs about two eager steps; all graphs share one memory
    pool). Padding rows write their K/V to a scratch slot no sequence owns, at position 0.
    The slots are zero-initialised on the GPU, so positions a row does not see are finite.
    Prefill and other large batches run the eager layers over the same slots, as on CPU.
    """

    def __init__(self, model: DecoderModel, slots: int = 16, max_rows: int = 32) -> None:
        cfg = model.cfg
        self.model = model
        self.max_rows = max_rows
        self.pool = SlotPool(
            cfg.n_layers,
            cfg.n_kv_heads,
            cfg.head_dim,
            model.dtype,
            slots + 1,
            model.max_context,
            device=model.device,
        )
        self._scratch = self.pool.acquire(0, cfg.n_layers)  # padding rows write here
        self._graphs: dict[tuple[int, int], nn.Module] = {}
        self._captured: dict[tuple[int, int, int, int], _Captured] = {}
        self._mempool = None  # one pool for every graph, made at the first capture

    def head(self, head: ExitHead, rule: ExitRule) -> HeadCall:
        """Exit heads stay eager on CUDA (not captured)."""
        return functools.partial(judge_eager, head, rule)

    def _module(self, start: int, end: int) -> nn.Module:
        module = self._graphs.get((start, end))
        if module is None:
            module = self._graphs[start, end] = _DecodeGraph(self.model, self.pool, start, end)
        return module

    def _static_inputs(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h, slot and pos buffers for `rows` rows (all padding: the scratch slot, pos 0)."""
        dev = self.model.device
        h = torch.zeros(rows, self.model.cfg.hidden_size, dtype=self.model.dtype, device=dev)
        slot = torch.full((rows,), self._scratch.slot, dtype=torch.long, device=dev)
        return h, slot, torch.zeros(rows, dtype=torch.long, device=dev)

    def _capture(self, start: int, end: int, rows: int, length: int) -> _Captured:
        module = self._module(start, end)
        dev = self.model.device
        h, slot, pos = self._static_inputs(rows)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up before capture (lazy inits, workspaces)
            module(h, slot, pos, length)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            out = module(h, slot, pos, length)
        return _Captured(graph, h, slot, pos, out)

    def run(self, start: int, end: int, h: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        t = h.shape[0]
        rows = _bucket(t, 1, self.max_rows)
        length = _bucket(max(s.start_pos + s.count for s in segments), 64, self.pool.capacity)
        key = (start, end, rows, length)
        cap = self._captured.get(key)
        if cap is None:
            cap = self._captured[key] = self._capture(start, end, rows, length)
        slot = [s.kv.slot for s in segments for _ in range(s.count)]
        pos = [p for s in segments for p in range(s.start_pos, s.start_pos + s.count)]
        pad = rows - t
        cap.slot.copy_(torch.tensor(slot + [self._scratch.slot] * pad), non_blocking=True)
        cap.pos.copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        cap.h[:t].copy_(h)
        cap.graph.replay()
        out = cap.out[:t].clone()
        for s in segments:
            first = start - s.kv.first_layer
            for i in range(first, first + end - start):
                s.kv.lengths[i] += s.count
        return out
