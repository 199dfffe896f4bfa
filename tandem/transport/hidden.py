"""Wire format for split-layer hidden states sent from the edge to the cloud.

fp16: 2 bytes per value. int8: 1 byte per value plus one fp32 scale per token
(symmetric, scale = max|h| / 127 per row), about half of fp16 for realistic widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Encoding = Literal["fp16", "int8"]


@dataclass(frozen=True)
class HiddenPayload:
    encoding: Encoding
    n_tokens: int
    hidden_size: int
    data: bytes
    scales: bytes = b""

    def nbytes(self) -> int:
        return len(self.data) + len(self.scales)

    def rows(self, start: int, end: int) -> HiddenPayload:
        """The payload of rows [start, end), without decoding."""
        start, end = max(0, start), min(end, self.n_tokens)
        row = self.hidden_size * (2 if self.encoding == "fp16" else 1)
        scales = self.scales[4 * start : 4 * end] if self.scales else b""
        return HiddenPayload(
            self.encoding, end - start, self.hidden_size, self.data[start * row : end * row], scales
        )

    def __post_init__(self) -> None:
        per_value = 2 if self.encoding == "fp16" else 1
        if len(self.data) != self.n_tokens * self.hidden_size * per_value:
            raise ValueError(
                f"{self.encoding} payload holds {len(self.data)} bytes, expected "
                f"{self.n_tokens} x {self.hidden_size} x {per_value}"
            )
        want_scales = 4 * self.n_tokens if self.encoding == "int8" else 0
        if len(self.scales) != want_scales:
            raise ValueError(f"expected {want_scales} scale bytes, got {len(self.scales)}")


def encode_hidden(h: torch.Tensor, encoding: Encoding) -> HiddenPayload:
    """h: [n_tokens, hidden_size] in any float dtype."""
    n, d = h.shape
    hf = h.detach().float().cpu()  # (a no-op on the CPU; from a GPU, the bytes come here)
    if encoding == "fp16":
        return HiddenPayload("fp16", n, d, hf.half().numpy().tobytes())
    if encoding == "int8":
        scale = (hf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(hf / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return HiddenPayload("int8", n, d, q.numpy().tobytes(), scale.numpy().tobytes())
    raise ValueError(f"unknown encoding {encoding!r}")


def decode_hidden(p: HiddenPayload, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    shape = (p.n_tokens, p.hidden_size)
    if p.encoding == "fp16":
        h = torch.from_numpy(np.frombuffer(p.data, dtype=np.float16).reshape(shape).copy())
        return h.to(dtype)
    q = torch.from_numpy(np.frombuffer(p.data, dtype=np.int8).reshape(shape).copy())
    scale = torch.from_numpy(np.frombuffer(p.scales, dtype=np.float32).copy())
    return (q.float() * scale[:, None]).to(dtype)
