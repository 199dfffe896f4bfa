"""Weight-only quantized linear layers on torch's CPU kernels.

- int8: symmetric, one scale per output channel, `aten._weight_int8pack_mm`. Served int8
  layers use Tandem's own kernel instead where it builds (`make_quantizer`,
  tandem.runtime.kernels.int8: the same weights, int8 activations per block of 128);
  TANDEM_INT8_KERNEL=aten keeps aten's.
- int4: asymmetric min/max per group of input channels, packed for
  `aten._weight_int4pack_mm_for_cpu`, which computes (q - 8) * scale + zero. Served int4
  layers use Tandem's own kernel instead where it builds (`make_quantizer`,
  tandem.runtime.kernels.int4: the same scheme at group 32, int8 activations).

Activations stay bf16. `quantize_model` swaps nn.Linear modules in place.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

QuantMode = Literal["bf16", "int8", "int4"]

log = logging.getLogger(__name__)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer(
            "qweight", torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        )
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().bfloat16())
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.qweight, self.scale
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group_size: int = 32) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        if in_f % group_size:
            raise ValueError(f"in_features {in_f} is not a multiple of group {group_size}")
        g = w.reshape(out_f, in_f // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        q = q.reshape(out_f, in_f)
        zero = lo + 8.0 * scale  # kernel computes (q - 8) * scale + zero
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        sz = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)
        self.register_buffer("scales_zeros", sz)  # [in/group, out, 2]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().bfloat16())
        self.group_size = group_size
        self.out_features, self.in_features = out_f, in_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(torch.bfloat16),
            self.qweight,
            self.group_size,
            self.scales_zeros,
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


@functools.cache
def int4_kernel_available() -> bool:
    """Whether Tandem's int4 kernel (tandem.runtime.kernels.int4) builds and loads here
    (asked once per process: a failed build is not retried for every quantized module)."""
    from tandem.runtime.kernels import int4

    try:
        int4.load()
    except RuntimeError as exc:
        log.warning("int4 kernel unavailable, using aten's int4pack kernel: %s", exc)
        return False
    return True


@functools.cache
def int8_kernel_available() -> bool:
    """Whether Tandem's int8 kernel (tandem.runtime.kernels.int8, the same extension as the
    int4 kernel) builds and loads here (asked once per process)."""
    from tandem.runtime.kernels import int8

    try:
        int8.load()
    except RuntimeError as exc:
        log.warning("int8 kernel unavailable, using aten's int8pack kernel: %s", exc)
        return False
    return True


def _int8_kernel_or_aten(linear: nn.Linear) -> nn.Module:
    """Tandem's int8 kernel where the layer's shape fits it (in_features % 32 == 0)."""
    from tandem.runtime.kernels.int8 import K_MULTIPLE, Int8KernelLinear

    if linear.in_features % K_MULTIPLE:
        return Int8Linear(linear)
    return Int8KernelLinear(linear)


def make_quantizer(
    mode: QuantMode, group_size: int = 32, device: torch.device | None = None
) -> Callable[[nn.Linear], nn.Module]:
    """int4 at group 32 is Tandem's own kernel (int8 activations, integer dot products,
    1.4-1.7x aten's at batch 1, ~2.8x at 8 rows) where it builds (x86-64 with AVX2 and g++);
    elsewhere, or with TANDEM_INT4_KERNEL=aten, aten's int4pack kernel (bf16 activations).
    On a CUDA `device`: tandem.runtime.cuda_quant (torch's CUDA int4 kernel, int8 dequant)."""
    if device is not None and torch.device(device).type == "cuda":
        from tandem.runtime.cuda_quant import make_cuda_quantizer

        return make_cuda_quantizer(mode, group_size)
    if mode == "int8":
        # Tandem's int8 kernel (~2.9x aten's per matmul at batch 1) unless
        # TANDEM_INT8_KERNEL=aten. Its int8 activations turn one-ulp differences into other
        # tokens, so a sequence must take the same arithmetic alone or batched: the compiled
        # step runs one graph for every row count and picks its rows per sequence
        # (tandem.runtime.compiled; tests/services/edge_node/test_edge_real_model.py)
        if os.environ.get("TANDEM_INT8_KERNEL", "tandem") != "aten" and int8_kernel_available():
            return _int8_kernel_or_aten
        return Int8Linear
    if mode == "int4":
        if (
            group_size == 32
            and os.environ.get("TANDEM_INT4_KERNEL", "tandem") != "aten"
            and int4_kernel_available()
        ):
            from tandem.runtime.kernels.int4 import Int4KernelLinear

            return Int4KernelLinear
        return lambda lin: Int4Linear(lin, group_size)
    raise ValueError(f"no quantizer for {mode!r}")


def quantize_model(
    model: nn.Module,
    mode: QuantMode,
    skip: tuple[str, ...] = (),
    device: torch.device | None = None,
) -> nn.Module:
    """Replace every nn.Linear (except names containing any of `skip`) in place (with the
    CUDA layers when `device` is a GPU: the model's weights are already there)."""
    if mode == "bf16":
        return model
    quant = make_quantizer(mode, device=device)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(s in name for s in skip)
    ]
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, quant(lin))
    return model
