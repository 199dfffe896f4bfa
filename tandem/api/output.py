"""What has come out of the engine for one request: text, exits, sources, usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tandem.api.metrics import RequestRecorder
from tandem.api.protocol import TandemUsage, Usage
from tandem.runtime.engine_api import GenerationChunk


@dataclass
class Output:
    """What has come out of the engine for one request so far."""

    prompt_tokens: int
    text: list[str] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def add(self, chunk: GenerationChunk, recorder: RequestRecorder) -> None:
        recorder.on_tokens(chunk.exit_layers, len(chunk.token_ids) or None, chunk.sources)
        self.text.append(chunk.text)
        self.exit_layers.extend(chunk.exit_layers)
        self.sources.extend(chunk.sources)
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.completion_tokens = chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.report is not None:
            self.report = dict(chunk.report)

    def usage(self, n_layers: int) -> Usage:
        layers = self.exit_layers
        if layers:
            mean: float | None = sum(layers) / len(layers)
            early: float | None = sum(1 for x in layers if x < n_layers) / len(layers)
        else:
            mean = early = None
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            tandem=TandemUsage(
                n_layers=n_layers,
                mean_exit_layer=mean,
                early_exit_fraction=early,
                mode=self.mode,
                cloud_tokens=self.sources.count("cloud"),
                fallback_tokens=self.sources.count("fallback"),
                **self.report,
            ),
        )

    @property
    def mode(self) -> str:
        if "fallback" in self.sources:
            return "fallback"
        return "collaborative" if "cloud" in self.sources else "edge"
