"""Lamina's analytic side: traffic per token, minimum interconnect bandwidth, a roofline.

Model-attention disaggregation (papers.md section 3) moves, per layer and per decoded token,
q, k, v from the compute side to the attention pool and the attention output back. This
module counts those bytes, evaluates Lamina's minimum-bandwidth formula (papers.md 3.1)

    BW_min = (2 + 2/G) * e * d * B * L / (alpha * [MTIME(B) + ATIME(B, l)])

and estimates MTIME and ATIME with a roofline over the Table 1 device specs, so a caller can
say which link (10 Gbit/s, 400 Gbit/s, ...) a model needs at a batch size.

All functions are pure; sizes are bytes, times seconds, rates per second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tandem.runtime.config import ArchConfig

# --- shapes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need of a decoder: widths, depth, parameter count, element size.

    `n_params` counts the weights a decode step multiplies by (every layer's projections and
    MLP plus the LM head; the embedding lookup is a gather and is left out).
    """

    name: str
    hidden_size: int  # d
    n_layers: int  # L
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_params: float  # N
    elem_bytes: int = 2  # e (fp16 / bf16)

    @property
    def group(self) -> float:
        """G: query heads per kv head."""
        return self.n_heads / self.n_kv_heads

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def weight_bytes(self) -> float:
        return self.n_params * self.elem_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one context token holds, over all layers: 2 * kv_width * e * L."""
        return 2 * self.kv_width * self.elem_bytes * self.n_layers

    @staticmethod
    def from_arch(cfg: ArchConfig, name: str | None = None, elem_bytes: int = 2) -> ModelShape:
        d, hd = cfg.hidden_size, cfg.head_dim
        q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d
        if cfg.attn_bias:
            attn += q + 2 * kv
        mlp = 3 * d * cfg.intermediate_size
        n_params = cfg.n_layers * (attn + mlp) + cfg.vocab_size * d  # + LM head
        return ModelShape(
            name=name or cfg.arch,
            hidden_size=d,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            head_dim=hd,
            n_params=float(n_params),
            elem_bytes=elem_bytes,
        )


# Qwen2.5-Coder-1.5B-Instruct (our cloud model "qwen15"), bf16: the numbers of
# model_cache/converted/qwen15/config.json (d 1536, 28 layers, 12 q / 2 kv heads of 128,
# MLP 8960, vocab 151936); n_params as ModelShape.from_arch counts them.
QWEN15 = ModelShape(
    name="qwen15",
    hidden_size=1536,
    n_layers=28,
    n_heads=12,
    n_kv_heads=2,
    head_dim=128,
    n_params=float(28 * (1536 * 1536 * 2 + 2 * 1536 * 256 + 1536 + 2 * 256 + 3 * 1536 * 8960))
    + 151936 * 1536,
)

# LLaMA3-70B as papers.md 3.1 Table 2 states it: N = 70B, d = 8192, L = 80, G = 8, e = 2.
LLAMA3_70B = ModelShape(
    name="llama3-70b",
    hidden_size=8192,
    n_layers=80,
    n_heads=64,
    n_kv_heads=8,
    head_dim=128,
    n_params=70e9,
)


# --- traffic ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenTraffic:
    """Bytes one token moves across the model/attention split in one layer.

    `formula` is Lamina's (2 + 2/G) * e * d; the other fields are exact for the true widths
    (q and the attention output are n_heads * head_dim wide, k and v n_kv_heads * head_dim),
    which differ from the formula when n_heads * head_dim != d.
    """

    q_bytes: int
    k_bytes: int
    v_bytes: int
    out_bytes: int
    formula: float

    @property
    def sent(self) -> int:
        """Compute side -> pool: q, k, v."""
        return self.q_bytes + self.k_bytes + self.v_bytes

    @property
    def received(self) -> int:
        """Pool -> compute side: the attention output."""
        return self.out_bytes

    @property
    def total(self) -> int:
        return self.sent + self.received


def traffic_formula(d: int, group: float, elem_bytes: int) -> float:
    """(2 + 2/G) * e * d: bytes per token per layer (papers.md 3.1)."""
    return (2 + 2 / group) * elem_bytes * d


def bytes_per_token_per_layer(shape: ModelShape) -> TokenTraffic:
    """The exact per-token, per-layer traffic and Lamina's formula value beside it."""
    e = shape.elem_bytes
    return TokenTraffic(
        q_bytes=shape.q_width * e,
        k_bytes=shape.kv_width * e,
        v_bytes=shape.kv_width * e,
        out_bytes=shape.q_width * e,
        formula=traffic_formula(shape.hidden_size, shape.group, e),
    )


def bytes_per_step(shape: ModelShape, batch: int) -> int:
    """Exact bytes one decode step of `batch` tokens moves, over all layers, both ways."""
    return bytes_per_token_per_layer(shape).total * batch * shape.n_layers


# --- minimum bandwidth ------------------------------------------------------------------------


def min_bandwidth(
    e: int,
    d: int,
    group: float,
    batch: int,
    n_layers: int,
    alpha: float,
    mtime_s: float,
    atime_s: float,
) -> float:
    """Lamina's minimum interconnect bandwidth, bytes/s (papers.md 3.1):

        BW_min = (2 + 2/G) * e * d * B * L / (alpha * [MTIME(B) + ATIME(B, l)])

    A step moves (2 + 2/G) e d B L bytes; if the transfers may add at most alpha to the
    step time MTIME + ATIME, the link must carry them within alpha * (MTIME + ATIME).
    """
    if alpha <= 0 or mtime_s + atime_s <= 0:
        raise ValueError("alpha and MTIME + ATIME must be positive")
    return traffic_formula(d, group, e) * batch * n_layers / (alpha * (mtime_s + atime_s))


# --- roofline ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator, papers.md 3.1 Table 1."""

    name: str
    flops: float  # dense BF16 FLOP/s
    mem_bytes: float
    mem_bw: float  # bytes/s
    nic_bw: float  # bytes/s
    price_per_hour: float | None = None


H100 = DeviceSpec("H100", 989e12, 80e9, 3.35e12, 400e9 / 8, 11.06)
H20 = DeviceSpec("H20", 148e12, 96e9, 4.0e12, 400e9 / 8, 4.63)
TPU_V6E = DeviceSpec("TPU v6e", 918e12, 32e9, 1.64e12, 200e9 / 8, 2.70)


def mtime(shape: ModelShape, device: DeviceSpec, batch: int, n_devices: int = 1) -> float:
    """Non-attention time of one decode step: max(2 N B / flops, N e / mem_bw) / n_devices.

    Roofline at peak: the dense parts do 2 N B FLOPs and read every weight once; n_devices
    split both ideally (tensor parallelism without its communication).
    """
    compute = 2 * shape.n_params * batch / device.flops
    memory = shape.weight_bytes / device.mem_bw
    return max(compute, memory) / n_devices


def atime(
    shape: ModelShape, device: DeviceSpec, batch: int, context: int, n_devices: int = 1
) -> float:
    """Attention time of one decode step: the KV read, B * l * 2 * kv_width * e * L / mem_bw.

    Attention is memory bound (its FLOPs per KV byte are ~G), so the KV read is the time;
    n_devices split the heads, hence the bytes, evenly (Lamina's head-level partitioning).
    """
    return batch * context * shape.kv_bytes_per_token / device.mem_bw / n_devices


def max_batch_by_kv(
    shape: ModelShape, mem_bytes: float, context: int, reserved_bytes: float = 0.0
) -> int:
    """Largest batch whose KV at `context` tokens fits in mem_bytes - reserved_bytes."""
    free = mem_bytes - reserved_bytes
    if free <= 0:
        return 0
    return math.floor(free / (context * shape.kv_bytes_per_token))


# --- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float


LINK_10G = Link("10 Gbit/s", 10e9 / 8)
LINK_400G = Link("400 Gbit/s", 400e9 / 8)


@dataclass(frozen=True)
class BandwidthRow:
    """One batch size: roofline times, step traffic and the bandwidth the formula asks for."""

    model: str
    batch: int
    context: int
    alpha: float
    mtime_s: float
    atime_s: float
    step_bytes: int  # exact, both directions
    bw_min: float  # formula, bytes/s, aggregate between the two pools
    bw_min_exact: float  # same with the exact step bytes
    bw_per_attn_device: float  # bw_min_exact split evenly over the attention devices
    kv_bytes: float  # KV the pool must hold for this batch
    links: tuple[tuple[str, float], ...]  # (link name, bw_min_exact / link rate)

    def fits(self, link: str) -> bool:
        return dict(self.links)[link] <= 1.0


def bandwidth_row(
    shape: ModelShape,
    batch: int,
    mtime_s: float,
    atime_s: float,
    alpha: float = 0.2,
    context: int = 0,
    n_attn_devices: int = 1,
    links: Sequence[Link] = (LINK_10G, LINK_400G),
) -> BandwidthRow:
    """The formula for one batch size from given (measured or roofline) MTIME and ATIME."""
    bw = min_bandwidth(
        shape.elem_bytes,
        shape.hidden_size,
        shape.group,
        batch,
        shape.n_layers,
        alpha,
        mtime_s,
        atime_s,
    )
    step = bytes_per_step(shape, batch)
    exact = step / (alpha * (mtime_s + atime_s))
    return BandwidthRow(
        model=shape.name,
        batch=batch,
        context=context,
        alpha=alpha,
        mtime_s=mtime_s,
        atime_s=atime_s,
        step_bytes=step,
        bw_min=bw,
        bw_min_exact=exact,
        bw_per_attn_device=exact / n_attn_devices,
        kv_bytes=float(batch * context * shape.kv_bytes_per_token),
        links=tuple((link.name, exact / link.bytes_per_s) for link in links),
    )


def evaluate(
    shape: ModelShape,
    batches: Iterable[int] = (1, 8, 32, 300),
    context: int = 4096,
    alpha: float = 0.2,
    model_device: DeviceSpec = H100,
    attn_device: DeviceSpec = H20,
    n_model_devices: int = 1,
    n_attn_devices: int = 1,
    links: Sequence[Link] = (LINK_10G, LINK_400G),
) -> list[BandwidthRow]:
    """The minimum-bandwidth formula over batch sizes with roofline MTIME and ATIME.

    DOP (n_model_devices, n_attn_devices) divides MTIME and ATIME ideally; the traffic does
    not shrink, so more devices raise the aggregate bandwidth the formula asks for (head
    partitioning spreads it evenly over the attention devices' NICs: bw_per_attn_device).
    """
    return [
        bandwidth_row(
            shape,
            b,
            mtime(shape, model_device, b, n_model_devices),
            atime(shape, attn_device, b, context, n_attn_devices),
            alpha,
            context,
            n_attn_devices,
            links,
        )
        for b in batches
    ]


def bandwidth_plateau(
    shape: ModelShape,
    context: int,
    alpha: float,
    model_device: DeviceSpec = H100,
    attn_device: DeviceSpec = H20,
    n_model_devices: int = 1,
    n_attn_devices: int = 1,
) -> float:
    """The formula's limit for large B (bytes/s), reached once MTIME is compute bound.

    Past B* = e * flops / (2 * mem_bw) of the model device (~295 on an H100) both MTIME and
    ATIME grow linearly in B, so BW_min stops growing:
    (2 + 2/G) e d L / (alpha * [2 N / flops + l * kv_bytes_per_token / mem_bw]).
    """
    per_token = traffic_formula(shape.hidden_size, shape.group, shape.elem_bytes) * shape.n_layers
    m = 2 * shape.n_params / (model_device.flops * n_model_devices)
    a = context * shape.kv_bytes_per_token / (attn_device.mem_bw * n_attn_devices)
    return per_token / (alpha * (m + a))


def attention_bound(
    shape: ModelShape, attn_device: DeviceSpec, context: int, alpha: float, n_attn_devices: int = 1
) -> float:
    """Upper bound of the formula when MTIME is ignored (bytes/s): (G + 1) mem_bw / (alpha l).

    (2 + 2/G) e d B L / (alpha * B l 2 (d/G) e L / mem_bw): independent of d, L and B.
    (Exact when n_heads * head_dim == d.)
    """
    return (shape.group + 1) * attn_device.mem_bw * n_attn_devices / (alpha * context)


def bandwidth_table(rows: Sequence[BandwidthRow]) -> str:
    """Markdown table of `evaluate` rows (GB = 1e9 bytes)."""
    link_names = [name for name, _ in rows[0].links] if rows else []
    head = ["model", "B", "l", "MTIME ms", "ATIME ms", "MB/step", "BW_min GB/s", "exact GB/s"]
    head += ["GB/s per attn device"]
    head += [f"share of {n}" for n in link_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.model,
            str(r.batch),
            str(r.context),
            f"{r.mtime_s * 1e3:.3f}",
            f"{r.atime_s * 1e3:.3f}",
            f"{r.step_bytes / 1e6:.2f}",
            f"{r.bw_min / 1e9:.2f}",
            f"{r.bw_min_exact / 1e9:.2f}",
            f"{r.bw_per_attn_device / 1e9:.2f}",
        ] + [f"{share:.2f}" for _, share in r.links]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
