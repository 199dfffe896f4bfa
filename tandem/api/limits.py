"""What an OpenAI front end accepts: body size, completion tokens, stop sequences."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 2048
    max_stop: int = 4

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_tokens_cap", "max_stop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
