"""Incremental detokenization: the text delta of each new token in O(1) work per token.

Decoding the whole output again on every token (to diff it against the previous text) costs
O(n) per token, O(n²) per answer. `IncrementalDetokenizer` decodes only a short window of
recent tokens, in the manner of vLLM's prefix/read offsets:

- `prefix`: where the window starts. The tokens in [prefix, read) were already emitted; they
  are decoded again only as context, so that tokenizers which print a token differently at
  the start of a decode (SentencePiece's dropped leading space) or merge bytes across tokens
  (byte-level BPE) give the same characters as a full decode would.
- `read`: the end of what has been emitted.

For each new token the window [prefix, end) is decoded; the characters past the decode of
[prefix, read) are the delta. A window whose text ends in U+FFFD is an incomplete UTF-8
sequence (a multi-byte character split across tokens): nothing is emitted, and the next
token extends the window until the character is whole. So no U+FFFD is ever emitted for an
incomplete sequence; `flush()` at the end of generation emits whatever is still held back
(then exactly as a full decode shows it, U+FFFD included).

The concatenated deltas plus `flush()` equal `decode(all ids)` for the tokenizers tested
(byte-level BPE: SmolLM2, Qwen2.5; the tests' byte codec).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    """Text deltas of one output sequence. `decode` maps token ids to text (a codec's
    `decode`, e.g. `TextCodec.decode`, which skips special tokens)."""

    __slots__ = ("_decode", "ids", "_prefix", "_read", "_prefix_text", "_parts")

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""  # decode(ids[prefix:read]), cached
        self._parts: list[str] = []  # every emitted delta

    @property
    def text(self) -> str:
        """All text emitted so far (without what is held back)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def add(self, token: int) -> str:
        """Append one token id; return the new text it completes ("" while a multi-byte
        character is still incomplete)."""
        self.ids.append(token)
        window = self._decode(self.ids[self._prefix :])
        if len(window) <= len(self._prefix_text) or window.endswith(REPLACEMENT):
            return ""  # nothing new yet, or an incomplete character: wait for more tokens
        return self._emit(window)

    def flush(self) -> str:
        """At the end: the text still held back (an incomplete character shows as U+FFFD,
        as in a full decode)."""
        if self._read == len(self.ids):
            return ""
        return self._emit(self._decode(self.ids[self._prefix :]))

    def _emit(self, window: str) -> str:
        """Emit the window's text past [prefix, read); the emitted tokens become the next
        window's context."""
        delta = window[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        if delta:
            self._parts.append(delta)
        return delta
