"""RMSNorm on Tandem's CPU kernel (norm.cpp, built with the other kernels, see
tandem.runtime.kernels.extension).

`torch.ops.tandem_kernels.rms_norm(x, weight, eps, unit_offset)`: x / sqrt(mean(x^2) + eps)
times weight (1 + weight for gemma) over x's last dimension, fp32 inside, one rounding to
x's dtype. Inference only (no gradient). Both decode paths call it, so the compiled step
and the eager reference normalise to the same bits.
"""

from __future__ import annotations

import torch

from tandem.runtime.kernels.extension import available

__all__ = ["available", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    return torch.ops.tandem_kernels.rms_norm(x, weight, eps, unit_offset)
