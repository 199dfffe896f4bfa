"""Incremental text output with stop strings.

The caller decodes all generated ids each step and feeds the full text; the matcher
returns only the new, safe part: text that cannot still turn into a stop string and does
not end in an incomplete UTF-8 sequence.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._text = ""
        self._emitted = 0

    def feed(self, full_text: str) -> tuple[str, bool]:
        """Return (new text to send, whether a stop string was hit)."""
        self._text = full_text
        start = self._emitted
        hits = [i for i in (full_text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out = full_text[start:cut]
            self._emitted = len(full_text)
            return out, True
        safe = len(full_text)
        while safe > start and full_text[safe - 1] == "\ufffd":
            safe -= 1
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, safe - start), hold, -1):
                if full_text[safe - k : safe] == s[:k]:
                    hold = k
                    break
        safe -= hold
        out = full_text[start:safe]
        self._emitted = max(self._emitted, safe)
        return out, False

    def flush(self) -> str:
        """Everything held back, at the end of generation."""
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        return out
